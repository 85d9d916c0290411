"""ASAG tooling: anchor recall (mmdet AR), the --explain figure, the demo and CPU configs."""
from __future__ import annotations

import math

import pytest
import torch

from sparsedet.config import load_config
from sparsedet.evaluation.recall import average_recall, greedy_matched_ious
from sparsedet.models import build_model

TINY = ["model.backbone.depth=18", "model.hidden_dim=64", "model.fpn.channels=64", "model.dim_feedforward=128",
        "model.anchors.compress_hidden=8", "model.num_classes=3"]


def test_average_recall_hand_case():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    # proposal 0 = gt 0 exactly; proposal 1 overlaps gt 1 with IoU 0.6; proposal 2 duplicates proposal 0
    shift = 10 * (1 - 0.6) / (1 + 0.6)                                # IoU of two 10x10 boxes offset in x = 0.6
    proposals = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0 + shift, 20.0, 30.0 + shift, 30.0], [0.0, 0.0, 10.0, 10.0]])
    ar = average_recall([proposals], [gt], budgets=(1, 2, 3))
    assert math.isclose(ar[1], 0.5, abs_tol=1e-6)                      # only gt 0 found, at every threshold
    assert math.isclose(ar[2], (10 + 3) / 20, abs_tol=1e-6)            # gt 1 at t = 0.5, 0.55, 0.6
    assert math.isclose(ar[3], ar[2], abs_tol=1e-6)                    # one-to-one: the duplicate adds nothing
    both_want_one = torch.tensor([[0.9, 0.1], [0.8, 0.0]])
    assert greedy_matched_ious(both_want_one).tolist() == pytest.approx([0.9, 0.0])
    assert average_recall([torch.zeros(0, 4)], [gt])[100] == 0.0


def test_explain_draws_patches_and_anchors():
    from sparsedet.explain import explain_prediction

    model = build_model("asag/a_r50_fpn_100q_1x", TINY)
    model.config["input"] = {"min_size_test": 160, "max_size_test": 224}
    picture = explain_prediction(model, torch.rand(3, 200, 280) * 255)
    assert picture.size[0] > 300 and picture.size[1] > 300
    assert model.training                                              # left as it was


def test_anchor_recall_engine_on_synthetic_data(tmp_path):
    from sparsedet.data import read_dataset
    from sparsedet.data.synthetic import write_synthetic_coco
    from sparsedet.engine.recall import anchor_recall

    data = write_synthetic_coco(tmp_path, num_train=1, num_val=2, height=128, width=128)
    dataset = read_dataset({"format": "coco", **data["val"]}, None, "data.val")
    model = build_model("asag/a_r50_fpn_100q_1x", TINY)
    result = anchor_recall(model, dataset, {"input": {"min_size_test": 128, "max_size_test": 128}}, progress=False)
    assert set(result) == {"anchors", "proposals"}
    for values in result.values():
        assert set(values) == {100, 300, 1000} and all(0.0 <= v <= 1.0 for v in values.values())


@pytest.mark.parametrize("name", ["asag/a_mobilenetv2_fpn_cpu", "asag/s_mobilenetv2_fpn_cpu",
                                  "asag/a_mobilenetv2_fpn_demo", "asag/s_mobilenetv2_fpn_demo",
                                  "asag/a_r50_fpn_300q_1x", "asag/a_r50_fpn_100q_3x", "asag/a_r50_fpn_300q_3x",
                                  "asag/a_r101_fpn_300q_3x", "asag/s_r50_fpn_100q_3x", "asag/s_r50_fpn_300q_3x"])
def test_bundled_configs_resolve(name):
    from sparsedet.models.build import model_config

    cfg = model_config(load_config(name))
    assert cfg.setting in (100, 300)
    expected_head = {"asag/a_r50_fpn_100q_3x": "main"}.get(name, "main" if "mobilenet" in name else "aux_2")
    assert cfg.test_head == expected_head


def test_demo_config_for_asag(tmp_path):
    from sparsedet.demo import demo_config, describe_model

    data = {s: {"annotations": f"{s}.json", "images": s} for s in ("train", "val")}
    config = demo_config(data, 10, 0, "asag_s")
    assert config["model"]["decoder_type"] == "sparse_rcnn" and config["solver"]["max_iter"] == 10
    assert describe_model(config).startswith("ASAG-S")


def test_postprocess_drops_padding_and_applies_nms():
    from sparsedet.models.asag.postprocess import postprocess

    logits = torch.tensor([[[2.0, -1.0], [1.5, 1.0], [9.0, 9.0]]])              # query 2 is padding
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.51, 0.5, 0.2, 0.2], [0.5, 0.5, 1.0, 1.0]]])
    valid = torch.tensor([[True, True, False]])
    out = postprocess(logits, boxes, valid, [(100, 200)], detections_per_image=3)[0]
    assert out["scores"].tolist() == pytest.approx(torch.sigmoid(torch.tensor([2.0, 1.5, 1.0])).tolist())
    assert out["labels"].tolist() == [0, 0, 1]
    assert torch.allclose(out["boxes"][0], torch.tensor([80.0, 40.0, 120.0, 60.0]))
    # class-wise NMS (setting 300): the second class-0 box overlaps the first; class 1 stays
    out = postprocess(logits, boxes, valid, [(100, 200)], detections_per_image=3, nms_threshold=0.7)[0]
    assert out["labels"].tolist() == [0, 1]
