"""A small ASAG-A must learn real photos: it overfits two tiny_coco images (recipe in
``overfit_helpers``).

The CPU config (frozen MobileNetV2-FPN with ImageNet weights when the package is installed, else a
ResNet-18 from scratch), 64-d queries, images at short side 256; ground-truth patches stand in for
generated ones during the first 40 steps, as the official code does in epoch 0.
"""
from __future__ import annotations

import pytest

from overfit_helpers import RESNET18_FROM_SCRATCH, assert_learned, has_imagenet_mobilenet, overfit
from sparsedet import build_model

ITERATIONS = 100
MIN_AP50 = 0.5           # COCO AP50 on the two training images, in [0, 1]


@pytest.mark.slow
def test_asag_overfits_real_images(overfit_batch):
    overrides = [f"model.num_classes={overfit_batch.dataset.num_classes}", "model.anchors.target_patch_iters=40"]
    if not has_imagenet_mobilenet():
        overrides += RESNET18_FROM_SCRATCH
    model = build_model("asag/a_mobilenetv2_fpn_cpu", overrides)
    history, metrics = overfit(model, overfit_batch, ITERATIONS, base_lr=1e-3)
    assert_learned(history, metrics, max_loss_ratio=0.25, min_ap50=MIN_AP50)
