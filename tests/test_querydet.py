"""QueryDet: query targets (spec §2.2), query loss, model contract, CSQ config checks and hook."""
from __future__ import annotations

import math

import pytest
import torch

from sparsedet.config import ConfigError
from sparsedet.models import build_model
from sparsedet.models.dense import query_loss
from sparsedet.models.querydet import query_targets
from sparsedet.models.querydet.config import COCO_LEVEL_WEIGHTS

TINY = {"name": "querydet", "num_classes": 5, "backbone": {"depth": 18, "weights": None},
        "fpn": {"channels": 32}, "head": {"num_convs": 2}, "query": {"num_convs": 2}}


def tiny_querydet(**model):
    return build_model({"model": {**TINY, **model}})


def box(cx, cy, side):
    return [cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]


# --------------------------------------------------------------------------- query targets

def test_20px_box_gives_disk_of_radius_20_on_stride_8():
    boxes = [torch.tensor([box(50.0, 42.0, 20.0)])]
    t = query_targets(boxes, 16, 16, 8, 32.0)
    assert t.shape == (1, 16, 16)
    for y in range(16):
        for x in range(16):
            d = math.hypot((x + 0.5) * 8 - 50.0, (y + 0.5) * 8 - 42.0)
            assert t[0, y, x].item() == float(d < 20.0), (y, x, d)
    assert t.sum() > 0


def test_small_bound_is_strict_and_per_level():
    # sqrt(area) = 40: small for P4 (< 64), not for P3 (< 32).
    boxes = [torch.tensor([box(64.0, 64.0, 40.0)])]
    assert query_targets(boxes, 16, 16, 8, 32.0).sum() == 0
    assert query_targets(boxes, 8, 8, 16, 64.0).sum() > 0
    # sqrt(area) == 32 exactly is not small on P3 (strict <).
    assert query_targets([torch.tensor([box(64.0, 64.0, 32.0)])], 16, 16, 8, 32.0).sum() == 0


def test_nearest_small_object_sets_the_radius():
    # A 4-px object right next to a 30-px one: positions near the tiny one use radius 4.
    boxes = [torch.tensor([box(20.0, 20.0, 4.0), box(100.0, 20.0, 30.0)])]
    t = query_targets(boxes, 8, 16, 8, 32.0)
    gt = torch.tensor([[20.0, 20.0, 4.0], [100.0, 20.0, 30.0]])
    for y in range(8):
        for x in range(16):
            c = torch.tensor([(x + 0.5) * 8, (y + 0.5) * 8])
            d = (gt[:, :2] - c).norm(dim=1)
            j = d.argmin()
            assert t[0, y, x].item() == float(d[j] < gt[j, 2]), (y, x)


def test_paper_radius_mode_uses_level_constant():
    boxes = [torch.tensor([box(40.0, 40.0, 6.0)])]
    code = query_targets(boxes, 10, 10, 8, 32.0, "code")
    paper = query_targets(boxes, 10, 10, 8, 32.0, "paper")
    assert code.sum() < paper.sum()
    for y in range(10):
        for x in range(10):
            assert paper[0, y, x].item() == float(math.hypot((x + 0.5) * 8 - 40, (y + 0.5) * 8 - 40) < 32.0)


def test_empty_and_no_small_images_are_all_zero():
    t = query_targets([torch.zeros(0, 4), torch.tensor([box(60.0, 60.0, 100.0)])], 8, 8, 8, 32.0)
    assert t.shape == (2, 8, 8) and t.sum() == 0


def test_query_loss_is_mean_focal_times_weight_summed_over_levels():
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(2, 1, 4, 5, generator=g), torch.randn(2, 1, 2, 3, generator=g)]
    targets = [(torch.rand(2, 4, 5, generator=g) > 0.7).float(), torch.zeros(2, 2, 3)]
    expected = 0.0
    for x, t in zip(logits, targets):
        x = x.reshape(t.shape)
        p = x.sigmoid()
        pt = p * t + (1 - p) * (1 - t)
        ce = -(t * p.log() + (1 - t) * (1 - p).log())
        expected += 10.0 * ((0.25 * t + 0.75 * (1 - t)) * (1 - pt) ** 1.2 * ce).mean().item()
    assert query_loss(logits, targets, 10.0, 0.25, 1.2).item() == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------- model

def test_querydet_defaults_and_init():
    model = tiny_querydet()
    assert model.levels == (2, 3, 4, 5, 6, 7)
    assert model.query_levels == (3, 4)
    assert model.level_loss_weights == COCO_LEVEL_WEIGHTS
    assert model.cfg.test.score_threshold == 1e-4
    assert model.anchor_generator.cell_anchors(2)[1].tolist() == [-8.0, -8.0, 8.0, 8.0]
    q = model.query_head
    assert len(q.subnet) == 2 and q.predictors[0].out_channels == 1
    assert all(float(m.bias.detach().abs().max()) == 0 for m in list(q.subnet) + list(q.predictors))
    # Xavier-normal: std = sqrt(2 / (fan_in + fan_out)) = sqrt(2 / (9*32 + 9*32)).
    std = q.subnet[1].weight.std().item()
    assert std == pytest.approx(math.sqrt(2 / (2 * 9 * 32)), rel=0.1)
    # Partial sections keep QueryDet defaults (config subclasses).
    model = tiny_querydet(test={"max_detections": 50}, loss={"focal_gamma": 2.0})
    assert model.cfg.test.score_threshold == 1e-4 and model.level_loss_weights == COCO_LEVEL_WEIGHTS


def test_querydet_train_and_dense_eval_contract(images, targets, single_thread):
    model = tiny_querydet()
    losses = model(images, targets)
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_query"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.query_head.predictors[0].weight.grad is not None
    model.eval()
    with torch.no_grad():
        out = model(images, original_sizes=[(64, 96), (96, 160)])
    for det, (h, w) in zip(out, [(64, 96), (96, 160)]):
        k = det["scores"].shape[0]
        assert det["boxes"].shape == (k, 4) and det["labels"].shape == (k,) and 0 < k <= 200
        assert (det["boxes"][:, 2] <= w).all() and (det["boxes"][:, 3] <= h).all()
        assert (det["boxes"][:, 2] > det["boxes"][:, 0]).all()


def test_querydet_without_query_head_has_no_query_loss(images, targets, single_thread):
    model = tiny_querydet(query={"levels": [], "small_object_bounds": [], "radius_scale": []})
    assert model.query_head is None
    assert set(model(images, targets)) == {"loss_cls", "loss_box_reg"}


def test_csq_hook_is_called_in_eval(images, monkeypatch):
    model = tiny_querydet(csq={"enabled": True}).eval()
    seen = {}

    def fake_csq(features, image_sizes):
        seen["levels"] = sorted(features)
        seen["sizes"] = list(image_sizes)
        return model.dense_levels(features)

    monkeypatch.setattr(model, "_csq_inference", fake_csq)
    with torch.no_grad():
        out = model(images)
    assert seen == {"levels": ["p2", "p3", "p4", "p5", "p6", "p7"], "sizes": [(64, 96), (48, 80)]}
    assert len(out) == 2
    model.train()  # training never uses CSQ
    assert "loss_query" in model(images, [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2)


@pytest.mark.parametrize("csq, match", [
    ({"enabled": True, "threshold": 0.0}, "model.csq.threshold"),
    ({"enabled": True, "threshold": 1.5}, "model.csq.threshold"),
    ({"enabled": True, "start_level": 5}, "model.csq.start_level"),
    ({"enabled": True, "start_level": 2}, "model.csq.start_level"),
    ({"enabled": True, "context": 4}, "model.csq.context"),
    ({"enabled": True, "context": 0}, "model.csq.context"),
    ({"method": "magic"}, "model.csq.method"),
    ({"enabled": True, "typo": 1}, "model.csq.typo"),
])
def test_csq_config_errors(csq, match):
    with pytest.raises(ConfigError, match=match):
        tiny_querydet(csq=csq)


def test_csq_needs_a_query_head_and_query_levels_checked():
    with pytest.raises(ConfigError, match="model.csq.enabled"):
        tiny_querydet(query={"levels": [], "small_object_bounds": [], "radius_scale": []}, csq={"enabled": True})
    with pytest.raises(ConfigError, match="model.query.levels"):
        tiny_querydet(query={"levels": [3, 9]})
    with pytest.raises(ConfigError, match="model.query.small_object_bounds"):
        tiny_querydet(query={"levels": [3]})
    # Start at P4 with a query head only on P4: P3 could not query P2.
    with pytest.raises(ConfigError, match="query heads on levels \\[3\\]"):
        tiny_querydet(query={"levels": [4], "small_object_bounds": [64], "radius_scale": [1.0]}, csq={"enabled": True})


def test_bundled_configs_build_on_meta():
    for name, cls in (("retinanet/r50_fpn_1x_coco", "RetinaNet"), ("querydet/r50_fpn_1x_coco", "QueryDet"),
                      ("querydet/r50_fpn_visdrone", "QueryDet"), ("retinanet/mobilenetv2_fpn_cpu", "RetinaNet"),
                      ("querydet/mobilenetv2_fpn_cpu", "QueryDet")):
        with torch.device("meta"):
            model = build_model(name, ["model.backbone.weights=null"])
        assert type(model).__name__ == cls
    with torch.device("meta"):
        visdrone = build_model("querydet/r50_fpn_visdrone")
    assert visdrone.level_loss_weights == (1.0, 1.4, 1.8, 2.2, 2.6, 2.6)
    assert visdrone.cfg.query.focal_gamma == 1.3 and visdrone.cfg.test.max_detections == 500
    assert visdrone.config["solver"]["clip_grad_value"] == 35.0
    assert visdrone.preprocess.input_format == "BGR"
    assert visdrone.backbone.body.layer2[0].conv1.stride == (2, 2)      # caffe: stride in the 1x1
