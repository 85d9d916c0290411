"""A small Sparse R-CNN must learn real photos: it overfits two tiny_coco images (recipe in
``overfit_helpers``).

MobileNetV2-FPN with ImageNet weights when the weights package is installed (else ResNet-18 from
scratch, with more steps), frozen backbone, 30 proposals, 3 stages, 64-d, images at short side 256.
"""
from __future__ import annotations

import pytest

from overfit_helpers import RESNET18_FROM_SCRATCH, assert_learned, has_imagenet_mobilenet, overfit
from sparsedet import build_model

# Thresholds on the training images themselves (COCO AP in [0, 1]).
MIN_AP50 = 0.9
MIN_AP = 0.5


@pytest.mark.slow
def test_sparse_rcnn_overfits_real_images(overfit_batch):
    overrides = [f"model.num_classes={overfit_batch.dataset.num_classes}", "model.num_proposals=30",
                 "model.num_stages=3", "model.backbone.freeze_at=5", "model.hidden_dim=64", "model.fpn.channels=64",
                 "model.dim_dynamic=16", "model.dim_feedforward=256"]
    iterations = 150 if has_imagenet_mobilenet() else 400
    if not has_imagenet_mobilenet():
        overrides += RESNET18_FROM_SCRATCH
    model = build_model("sparse_rcnn/mobilenetv2_fpn_cpu", overrides)
    history, metrics = overfit(model, overfit_batch, iterations, base_lr=1e-3)
    assert_learned(history, metrics, max_loss_ratio=0.25, min_ap50=MIN_AP50, min_ap=MIN_AP)
