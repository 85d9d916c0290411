"""A small TSP-RCNN learns real photos: it overfits two tiny_coco images (recipe in
``overfit_helpers``): MobileNetV2-FPN with ImageNet weights, frozen backbone, short side 256, the CPU
config's 2-layer 128-d encoder, dropout and random keep off so that the fixed batch is fit
deterministically."""
from __future__ import annotations

import pytest

from overfit_helpers import assert_learned, has_imagenet_mobilenet, overfit
from sparsedet import build_model

ITERATIONS = 70
# On the two training images themselves (COCO AP in [0, 1]).
MIN_AP50 = 0.8
MIN_AP = 0.4


@pytest.mark.slow
def test_tsp_rcnn_overfits_real_images(overfit_batch):
    if not has_imagenet_mobilenet():
        pytest.skip("needs the MobileNetV2 ImageNet weights package")
    model = build_model("tsp_rcnn/mobilenetv2_fpn_cpu", [f"model.num_classes={overfit_batch.dataset.num_classes}",
                                                         "model.roi_heads.dropout=0.0",
                                                         "model.roi_heads.keep_ratio_min=1.0",
                                                         # the CPU config's former 100 proposals (it now has 300)
                                                         "model.rpn.pre_nms_topk_train=500",
                                                         "model.rpn.pre_nms_topk_test=300",
                                                         "model.rpn.num_proposals=100",
                                                         "model.roi_heads.batch_size_per_image=100"])
    encoder_group = dict(model.config["solver"]["param_groups"][0], lr=1.5e-3)   # AdamW encoder, faster for one batch
    history, metrics = overfit(model, overfit_batch, ITERATIONS, base_lr=0.02, param_groups=[encoder_group])
    assert_learned(history, metrics, max_loss_ratio=0.3, min_ap50=MIN_AP50, min_ap=MIN_AP)
