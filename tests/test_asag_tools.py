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


def test_crowdhuman_config_has_the_spec_values():
    """asag/s_r50_fpn_crowdhuman (spec asag.md 1.4.1, 4, 5.1, 5.3): ASAG-S, one class, K1/K2 150/50,
    eta_f 0.05, 50..600 anchors, NMS 0.8, every query kept, aux_0, 50 epochs with drops at 40 and 46,
    CrowdHuman sizes and data; the model built from it (small widths) resolves the same values."""
    from sparsedet.config_schema import validate_config
    from sparsedet.models.build import model_config

    config = load_config("asag/s_r50_fpn_crowdhuman")
    validate_config(config)
    cfg = model_config(config)
    assert (cfg.decoder_type, cfg.num_classes, cfg.test_head) == ("sparse_rcnn", 1, "aux_0")
    assert cfg.backbone.depth == 50 and cfg.test_nms_threshold == 0.8
    assert cfg.anchors.max_patches == 60                             # the official CrowdHuman patch cap
    assert cfg.detections_per_image >= cfg.setting_value("max_anchors") * cfg.num_classes   # all Q kept
    sizes, solver = config["input"], config["solver"]
    assert sizes["min_size_train"] == list(range(640, 801, 32)) and sizes["max_size_train"] == 1500
    assert (sizes["min_size_test"], sizes["max_size_test"]) == (800, 1500)
    epoch = cfg.anchors.target_patch_iters                           # one epoch: 15,000 images at 16
    assert epoch == math.ceil(15000 / 16) and solver["images_per_batch"] == 16
    assert solver["max_iter"] == 50 * epoch and solver["steps"] == [40 * epoch, 46 * epoch]
    assert {config["data"][s]["format"] for s in ("train", "val")} == {"crowdhuman"}
    assert config["test"]["metric"] == "auto"

    model = build_model("asag/s_r50_fpn_crowdhuman", [o for o in TINY if "num_classes" not in o])
    generator = model.anchor_generator
    assert (generator.k_fixed, generator.k_probe, generator.keep_threshold) == (150, 50, 0.05)
    assert (generator.min_anchors, generator.max_anchors) == (50, 600)
    assert model.nms_threshold == 0.8 and model.cfg.head_names()[model.test_head_index] == "aux_0"
