"""Sparse R-CNN's small-data aids (opt-in, off in the official configs) and the small-data recipe."""
from __future__ import annotations

import pytest
import torch

from sparsedet.config import ConfigError, load_config
from sparsedet.models import build_model

pytestmark = pytest.mark.usefixtures("single_thread")


def stage_boxes(model, images):
    """(num_stages, B, N, 4) boxes each stage outputs, and the (B, N, 4) initial proposals."""
    inputs, captured = [], []
    model.head.register_forward_pre_hook(lambda module, args: inputs.append(args[1]))
    model.head.register_forward_hook(lambda module, args, result: captured.append(result))
    model.eval()
    with torch.no_grad():
        model(images)
    return torch.stack([o["pred_boxes"] for o in captured[0]]), inputs[0]


def test_zero_box_delta_init_makes_every_stage_the_identity(make_tiny, images):
    torch.manual_seed(0)
    model = make_tiny("model.num_stages=3", "model.box_delta_init=zero")
    boxes, proposals = stage_boxes(model, images)
    for stage in range(3):
        torch.testing.assert_close(boxes[stage], proposals)


def test_official_xavier_box_delta_init_moves_the_boxes(make_tiny, images):
    torch.manual_seed(0)
    model = make_tiny("model.num_stages=3")
    assert model.cfg.box_delta_init == "xavier"
    boxes, proposals = stage_boxes(model, images)
    # Random deltas compound: each stage is further from the proposals than the one before.
    distance = [(boxes[k] - proposals).abs().mean().item() for k in range(3)]
    assert distance[0] > 1.0
    assert all(stage.bboxes_delta.weight.abs().sum() > 0 for stage in model.head.head_series)


def test_zero_box_delta_init_still_learns_the_box_layer(make_tiny, images, targets):
    model = make_tiny("model.box_delta_init=zero")
    sum(model(images, targets).values()).backward()
    for stage in model.head.head_series:
        assert stage.bboxes_delta.weight.grad.abs().sum() > 0
        assert stage.bboxes_delta.bias.grad.abs().sum() > 0


def test_bad_box_delta_init_is_a_config_error(make_tiny):
    with pytest.raises(ConfigError, match="model.box_delta_init"):
        make_tiny("model.box_delta_init=ones")


def test_official_and_cpu_configs_keep_the_official_init():
    for name in ("sparse_rcnn/r50_fpn_100pro_3x", "sparse_rcnn/r50_fpn_300pro_crop_3x",
                 "sparse_rcnn/mobilenetv2_fpn_cpu", "sparse_rcnn/mobilenetv2_fpn_tiny_coco"):
        assert load_config(name)["model"].get("box_delta_init", "xavier") == "xavier", name
