"""A small TSP-FCOS must learn real photos: it overfits two tiny_coco images (recipe in
``overfit_helpers``).

MobileNetV2-FPN with ImageNet weights (frozen), 64 FPN channels, 2-conv GN towers, a 2-layer 64-d
encoder over 100 FoIs, images at short side 256, the official optimiser split (SGD + AdamW on the
transformer) with higher learning rates for a 2-image batch.
"""
from __future__ import annotations

import pytest

from overfit_helpers import assert_learned, has_imagenet_mobilenet, overfit
from sparsedet import build_model

ITERATIONS = 80
# Thresholds on the training images themselves (COCO AP in [0, 1]).
MIN_AP50 = 0.8
MIN_AP = 0.4


@pytest.mark.slow
def test_tsp_fcos_overfits_real_images(overfit_batch):
    if not has_imagenet_mobilenet():
        pytest.skip("needs the MobileNetV2 ImageNet weights package")
    model = build_model("tsp_fcos/mobilenetv2_fpn_cpu", [
        f"model.num_classes={overfit_batch.dataset.num_classes}", "model.transformer.d_model=64",
        "model.transformer.nhead=4", "model.transformer.dim_feedforward=128", "model.foi.num_foi=100"])
    history, metrics = overfit(model, overfit_batch, ITERATIONS, base_lr=0.015,
                               param_groups=[{"match": "transformer", "optimizer": "adamw", "lr": 1.5e-3,
                                              "clip_grad_norm": 0.1}])
    assert_learned(history, metrics, max_loss_ratio=0.3, min_ap50=MIN_AP50, min_ap=MIN_AP)
