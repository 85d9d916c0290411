"""Faster R-CNN with Cascade Sparse Query in the RPN (spec §5.2): RPN head / labels / losses /
proposals vs formulas, CSQ exactness of the sparse RPN, CSQ vs dense detections, config errors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler

from sparsedet.config import ConfigError
from sparsedet.layers.box_coder import BoxCoder
from sparsedet.layers.sparse_conv import gather_sites
from sparsedet.models import build_model
from sparsedet.models.dense.iou_matcher import IoUMatcher
from sparsedet.models.faster_rcnn import RPNLevelOutputs, label_rpn_anchors, rpn_losses, select_proposals

from overfit_helpers import train_steps

TINY = {"name": "faster_rcnn", "num_classes": 5, "backbone": {"depth": 18, "weights": None},
        "fpn": {"channels": 32}, "roi_heads": {"representation_size": 64, "batch_size_per_image": 64},
        "rpn": {"pre_nms_topk_train": 300, "post_nms_topk_train": 100, "pre_nms_topk_test": 200,
                "post_nms_topk_test": 60}}


def tiny(**model):
    cfg = {**TINY, **model}
    if "rpn" in model:
        cfg["rpn"] = {**TINY["rpn"], **model["rpn"]}
    return build_model({"model": cfg})


@pytest.fixture(autouse=True)
def _threads(single_thread):
    yield


def randomize_rpn(model, seed=0):
    """Random RPN weights (std 0.1) so that outputs differ across positions (no ties)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.rpn_head.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.1)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


def same_size_images():
    g = torch.Generator().manual_seed(3)
    return [torch.rand(3, 64, 96, generator=g) * 255, torch.rand(3, 64, 96, generator=g) * 255]


# --------------------------------------------------------------------------- head, anchors, training

def test_rpn_head_layout_and_defaults():
    model = tiny()
    assert model.levels == (2, 3, 4, 5, 6)
    tower = model.rpn_head.tower
    assert len(tower.subnet) == 3
    assert [p.out_channels for p in tower.predictors] == [3, 12, 1]
    assert all(p.kernel_size == (1, 1) for p in tower.predictors)
    assert model.anchor_generator.num_anchors == 3
    assert model.anchor_generator.cell_anchors(2)[1].tolist() == [-16.0, -16.0, 16.0, 16.0]
    assert model.anchor_generator.cell_anchors(6)[1].tolist() == [-256.0, -256.0, 256.0, 256.0]
    assert model.cfg.csq.threshold == 0.15 and model.cfg.csq.context == 7
    # The views share the trunk and add nothing to the state_dict.
    assert model.rpn_head.query_view.subnet is tower.subnet
    assert model.rpn_head.query_view.predictors[0] is tower.predictors[2]
    assert not any("view" in k for k in model.state_dict())
    assert tiny(query={"levels": [], "small_object_bounds": [], "radius_scale": []}).rpn_head.query_view is None


def test_label_rpn_anchors_thresholds_and_sampling():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0],     # IoU 1 with the GT: positive
                            [0.0, 0.0, 10.0, 12.0],     # IoU 10/12 = 0.83: positive
                            [0.0, 0.0, 10.0, 20.0],     # IoU 0.5: ignored
                            [50.0, 50.0, 60.0, 60.0],   # IoU 0: negative
                            [55.0, 50.0, 65.0, 60.0]])  # IoU 0: negative
    target = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([0])}]
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    labels, deltas = label_rpn_anchors(anchors, target, IoUMatcher((0.3, 0.7)),
                                       BalancedPositiveNegativeSampler(256, 0.5), coder)
    assert labels.tolist() == [[1.0, 1.0, -1.0, 0.0, 0.0]]
    assert torch.allclose(deltas[0, 1], torch.tensor([0.0, -1.0 / 12, 0.0, math.log(10 / 12)]))
    # Sampling: at most 2 anchors, at most 1 positive (fraction 0.5).
    labels, _ = label_rpn_anchors(anchors, target, IoUMatcher((0.3, 0.7)), BalancedPositiveNegativeSampler(2, 0.5), coder)
    assert int((labels == 1).sum()) == 1 and int((labels == 0).sum()) == 1


def test_rpn_losses_vs_formula():
    g = torch.Generator().manual_seed(0)
    obj = torch.randn(2, 6, generator=g)
    deltas = torch.randn(2, 6, 4, generator=g)
    gt = torch.randn(2, 6, 4, generator=g)
    labels = torch.tensor([[1.0, 0.0, -1.0, 0.0, 1.0, -1.0], [0.0, -1.0, -1.0, 1.0, -1.0, -1.0]])
    out = rpn_losses(obj, deltas, labels, gt, batch_size_per_image=4, smooth_l1_beta=0.0)
    valid, pos = labels >= 0, labels == 1
    bce = F.binary_cross_entropy_with_logits(obj[valid], labels[valid], reduction="sum") / 8
    l1 = (deltas[pos] - gt[pos]).abs().sum() / 8
    assert out["loss_rpn_cls"].item() == pytest.approx(bce.item(), rel=1e-6)
    assert out["loss_rpn_loc"].item() == pytest.approx(l1.item(), rel=1e-6)


def test_select_proposals_nms_per_level_and_topk():
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    box = torch.tensor([[10.0, 10.0, 30.0, 30.0]])
    a = RPNLevelOutputs(torch.tensor([2.0, 1.0, 0.5]), torch.zeros(3, 4),
                        torch.cat([box, box + 0.5, torch.tensor([[60.0, 10.0, 80.0, 30.0]])]), 2)
    b = RPNLevelOutputs(torch.tensor([3.0]), torch.zeros(1, 4), box.clone(), 3)
    boxes, scores, levels = select_proposals([a, b], coder, (64, 96), pre_nms_topk=10, post_nms_topk=10, nms_threshold=0.7)
    # The near-duplicate in level 2 is suppressed; the identical box of level 3 is not (NMS per level).
    assert scores.tolist() == [3.0, 2.0, 0.5] and levels.tolist() == [3, 2, 2]
    boxes, scores, _ = select_proposals([a, b], coder, (64, 96), pre_nms_topk=1, post_nms_topk=10, nms_threshold=0.7)
    assert scores.tolist() == [3.0, 2.0]                      # per-level pre-NMS top-1
    boxes, _, _ = select_proposals([a], coder, (20, 25), 10, 1, 0.7)
    assert boxes.tolist() == [[10.0, 10.0, 25.0, 20.0]]       # clipped to the image, post-NMS top-1


def test_train_and_eval_contract(images, targets):
    model = tiny()
    losses = model(images, targets)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc", "loss_query", "loss_cls", "loss_box_reg"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.rpn_head.tower.predictors[2].weight.grad.abs().sum() > 0   # the query branch trains
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    assert all(torch.isfinite(v) for v in model(images, empty).values())
    model.eval()
    with torch.no_grad():
        out = model(images, original_sizes=[(64, 96), (96, 160)])
    for det, (h, w) in zip(out, [(64, 96), (96, 160)]):
        n = det["scores"].shape[0]
        assert det["boxes"].shape == (n, 4) and det["labels"].shape == (n,) and n <= 100
        assert (det["boxes"][:, 2] <= w).all() and (det["boxes"][:, 3] <= h).all()
        assert ((det["labels"] >= 0) & (det["labels"] < 5)).all()
    assert model.last_stats["csq"] is None and len(model.last_stats["num_proposals"]) == 2


# --------------------------------------------------------------------------- CSQ

@pytest.fixture(scope="module")
def csq_model():
    model = tiny(csq={"enabled": True}).eval()
    randomize_rpn(model)
    return model


def features_of(model, images):
    batch, sizes = model.preprocess(images)
    return model.backbone(batch), sizes


@torch.no_grad()
@pytest.mark.parametrize("context,exact", [(7, True), (5, False), (3, False)])
def test_sparse_rpn_exact_with_context_7(csq_model, images, context, exact):
    """3 trunk 3x3 convs + 1x1 predictors read a radius-3 window: a 7x7 context (radius 3) reproduces
    the dense RPN at the children exactly (atol 1e-5); 5x5 and 3x3 do not (random weights)."""
    model = csq_model
    model.cfg.csq.context = context
    feats, _ = features_of(model, images)
    q4 = model.rpn_head.tower(feats["p4"])[2].sigmoid()
    model.cfg.csq.threshold = float(q4.median())         # part of P4 fires
    try:
        model._csq_rpn_levels(feats)
    finally:
        model.cfg.csq.context = 7
    out = model.last_csq
    assert [lv.level for lv in out.levels] == [3, 2]
    worst = 0.0
    for lv in out.levels:
        assert 0 < lv.num_children < lv.num_positions
        dense = [gather_sites(m, lv.positions) for m in model.rpn_head.tower(feats[f"p{lv.level}"])]
        for sparse, ref in zip(lv.values[0], dense[:2]):          # objectness, deltas
            worst = max(worst, float((sparse - ref).abs().max()))
        if lv.query_logits is not None:
            worst = max(worst, float((lv.query_logits - dense[2][:, 0]).abs().max()))
    assert (worst < 1e-5) if exact else (worst > 1e-3), worst


@torch.no_grad()
def test_csq_with_every_position_queried_equals_dense(csq_model):
    model = csq_model
    images = same_size_images()
    bias = model.rpn_head.tower.predictors[2].bias
    saved = bias.clone()
    try:
        bias.fill_(50.0)                      # sigmoid = 1 > sigma: the cascade covers all of P3 and P2
        model.cfg.csq.threshold = 0.15
        model.cfg.csq.enabled = False
        dense = model(images)
        dense_stats = model.last_stats
        model.cfg.csq.enabled = True
        sparse = model(images)
        stats = model.last_stats
    finally:
        bias.copy_(saved)
    assert stats["csq"]["levels"][3]["share"] == 1.0 and stats["csq"]["levels"][2]["share"] == 1.0
    assert stats["num_proposals"] == dense_stats["num_proposals"]
    assert stats["proposals_per_level"] == dense_stats["proposals_per_level"]
    for d, s in zip(dense, sparse):
        assert d["scores"].shape[0] > 10
        torch.testing.assert_close(s["scores"], d["scores"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(s["boxes"], d["boxes"], atol=1e-3, rtol=1e-5)
        assert torch.equal(s["labels"], d["labels"])


@torch.no_grad()
def test_csq_with_no_query_keeps_dense_levels_only(csq_model):
    model = csq_model
    images = same_size_images()
    bias = model.rpn_head.tower.predictors[2].bias
    saved = bias.clone()
    try:
        bias.fill_(-50.0)
        out = model(images)
    finally:
        bias.copy_(saved)
    stats = model.last_stats
    assert model.last_csq.levels == [] and stats["csq"]["start_queries"] == 0
    for per_level, n in zip(stats["proposals_per_level"], stats["num_proposals"]):
        assert per_level[2] == per_level[3] == 0 and n == per_level[4] + per_level[5] + per_level[6] > 0
    assert len(out) == 2 and all(set(d) == {"boxes", "scores", "labels"} for d in out)


def test_config_errors():
    no_query = {"levels": [], "small_object_bounds": [], "radius_scale": []}
    with pytest.raises(ConfigError, match="query"):
        tiny(query=no_query, csq={"enabled": True})
    with pytest.raises(ConfigError, match="model.csq.start_level"):
        tiny(csq={"enabled": True, "start_level": 5})
    with pytest.raises(ConfigError, match="model.csq.start_level"):
        tiny(query={"levels": [2, 3], "small_object_bounds": [32, 64], "radius_scale": [1, 1]},
             csq={"enabled": True, "start_level": 2})
    with pytest.raises(ConfigError, match="model.rpn.anchor_sizes"):
        tiny(rpn={"anchor_sizes": [32, 64]})
    with pytest.raises(ConfigError, match="model.roi_heads.in_levels"):
        tiny(roi_heads={"in_levels": [2, 3, 4, 5, 7]})
    with pytest.raises(ConfigError, match="model.csq.context"):
        tiny(csq={"context": 4})


def test_overfit_one_image():
    torch.manual_seed(0)
    model = tiny()
    g = torch.Generator().manual_seed(5)
    images = [torch.rand(3, 64, 64, generator=g) * 255]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 48.0], [36.0, 30.0, 60.0, 60.0]]), "labels": torch.tensor([2, 1])}]
    params = list(model.rpn_head.parameters()) + list(model.roi_heads.parameters())
    history = train_steps(model, images, targets, torch.optim.Adam(params, lr=1e-3), 30)
    first, last = history[0], history[-1]
    assert sum(last.values()) < 0.6 * sum(first.values()), history
    assert last["loss_rpn_cls"] < 0.7 * first["loss_rpn_cls"], history


@pytest.mark.parametrize("name", ["faster_rcnn/r50_fpn_1x_coco", "faster_rcnn/mobilenetv2_fpn_cpu"])
def test_bundled_configs_build(name):
    small = ["model.backbone.weights=null", "model.fpn.channels=32", "model.roi_heads.representation_size=32"]
    if "r50" in name:
        small += ["model.backbone.depth=18", "model.backbone.layout=torchvision"]
    model = build_model(name, small + ["model.csq.enabled=true"])
    assert model.cfg.csq.threshold == 0.15 and model.cfg.csq.start_level == 4
    assert len(model.rpn_head.tower.subnet) == (3 if "r50" in name else 2)
