"""FCOS / QueryDet-FCOS (spec §5.1): targets on hand-made boxes, losses vs formulas, model contract,
Cascade Sparse Query exactness against the dense head, config errors, a short overfit."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sparsedet.config import ConfigError
from sparsedet.layers.sparse_conv import gather_sites
from sparsedet.models import build_model
from sparsedet.models.fcos import centerness_targets, fcos_losses, fcos_targets, level_points
from sparsedet.models.fcos.config import default_regression_ranges
from sparsedet.models.fcos.losses import box_loss
from sparsedet.models.fcos.postprocess import fcos_postprocess_image

from overfit_helpers import train_steps

TINY = {"num_classes": 5, "backbone": {"depth": 18, "weights": None}, "fpn": {"channels": 32},
        "head": {"num_convs": 2}}
QUERY = {"name": "querydet_fcos", "query": {"num_convs": 2}}
INF = math.inf


def tiny(**model):
    base = {**TINY, **QUERY} if model.get("name", "querydet_fcos") == "querydet_fcos" else dict(TINY)
    return build_model({"model": {**base, **model}})


@pytest.fixture(autouse=True)
def _threads(single_thread):
    yield


def randomize_head(model, seed=0):
    """Random head weights (std 0.06): outputs vary across positions, so there are no score ties and
    the comparisons below are meaningful (the default N(0, 0.01) init makes every score ~equal)."""
    g = torch.Generator().manual_seed(seed)
    towers = [model.head] + ([model.query_head] if model.query_head is not None else [])
    with torch.no_grad():
        for tower in towers:
            for m in tower.modules():
                if isinstance(m, torch.nn.Conv2d):
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.06)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


# --------------------------------------------------------------------------- targets

def test_default_regression_ranges():
    assert default_regression_ranges((3, 4, 5, 6, 7)) == ((0, 64), (64, 128), (128, 256), (256, 512), (512, INF))
    assert default_regression_ranges((2, 3, 4, 5, 6, 7))[:2] == ((0, 32), (32, 64))
    assert default_regression_ranges((2, 3, 4, 5, 6, 7))[-1] == (512, INF)


def test_level_points_follow_fcos_convention():
    p = level_points(2, 3, 8)
    assert p.tolist() == [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12]]


def brute_force_targets(points, strides, ranges, boxes, labels, k, radius):
    """Python-loop reference of the FCOS rule."""
    out_cls, out_ltrb = [], []
    for pts, s, (lo, hi) in zip(points, strides, ranges):
        for x, y in pts.tolist():
            best, best_area = None, INF
            for g, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
                ltrb = (x - x1, y - y1, x2 - x, y2 - y)
                if radius > 0:
                    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
                    r = radius * s
                    region = (max(cx - r, x1), max(cy - r, y1), min(cx + r, x2), min(cy + r, y2))
                    inside = min(x - region[0], y - region[1], region[2] - x, region[3] - y) > 0
                else:
                    inside = min(ltrb) > 0
                area = (x2 - x1) * (y2 - y1)
                if inside and lo <= max(ltrb) <= hi and area < best_area:
                    best, best_area = (g, ltrb), area
            out_cls.append(k if best is None else int(labels[best[0]]))
            out_ltrb.append([0.0] * 4 if best is None else list(best[1]))
    return out_cls, out_ltrb


@pytest.mark.parametrize("radius", [0.0, 1.5])
def test_fcos_targets_match_brute_force(radius):
    strides, ranges = (4, 8, 16), ((0, 32), (32, 64), (64, INF))
    points = [level_points(24, 24, 4), level_points(12, 12, 8), level_points(6, 6, 16)]
    boxes = torch.tensor([[10.0, 10.0, 40.0, 36.0], [5.0, 5.0, 90.0, 80.0], [50.0, 20.0, 70.0, 90.0],
                          [20.0, 20.0, 30.0, 30.0]])
    labels = torch.tensor([0, 1, 2, 3])
    cls, ltrb = fcos_targets(points, strides, ranges, boxes, labels, 5, radius)
    ref_cls, ref_ltrb = brute_force_targets(points, strides, ranges, boxes, labels, 5, radius)
    assert torch.cat(cls).tolist() == ref_cls
    assert torch.allclose(torch.cat(ltrb), torch.tensor(ref_ltrb))
    assert sum(int((c < 5).sum()) for c in cls) > 10  # the case is not trivially all background


def test_regression_range_picks_the_level_and_ltrb_values():
    # A 40x40 box centred at (50, 50): at the centre max(ltrb) = 20 -> the [0, 32] level (stride 4),
    # not the [32, 64] one (stride 8); a 100x100 box: max side 50 at its centre -> stride 8 only.
    strides, ranges = (4, 8), ((0, 32), (32, 64))
    points = [torch.tensor([[50.0, 50.0]]), torch.tensor([[50.0, 50.0]])]
    cls, ltrb = fcos_targets(points, strides, ranges, torch.tensor([[30.0, 30.0, 70.0, 70.0]]), torch.tensor([3]), 5, 0.0)
    assert [c.tolist() for c in cls] == [[3], [5]]
    assert ltrb[0].tolist() == [[20.0, 20.0, 20.0, 20.0]] and ltrb[1].tolist() == [[0.0] * 4]
    cls, ltrb = fcos_targets(points, strides, ranges, torch.tensor([[0.0, 10.0, 100.0, 110.0]]), torch.tensor([1]), 5, 0.0)
    assert [c.tolist() for c in cls] == [[5], [1]]
    assert ltrb[1].tolist() == [[50.0, 40.0, 50.0, 60.0]]
    # The range is inclusive at both ends (max side exactly 32 is on both levels).
    cls, _ = fcos_targets(points, strides, ranges, torch.tensor([[18.0, 18.0, 82.0, 82.0]]), torch.tensor([0]), 5, 0.0)
    assert [c.tolist() for c in cls] == [[0], [0]]


def test_min_area_tie_break():
    pts = [torch.tensor([[50.0, 50.0]])]
    big, small = [20.0, 20.0, 90.0, 90.0], [40.0, 40.0, 62.0, 62.0]
    for boxes, labels in (([big, small], [0, 1]), ([small, big], [1, 0])):
        cls, ltrb = fcos_targets(pts, (8,), ((0, INF),), torch.tensor(boxes), torch.tensor(labels), 5, 0.0)
        assert cls[0].tolist() == [1] and ltrb[0].tolist() == [[10.0, 10.0, 12.0, 12.0]]
    # Equal areas: the first GT wins.
    cls, _ = fcos_targets(pts, (8,), ((0, INF),), torch.tensor([[40.0, 40.0, 60.0, 60.0], [41.0, 41.0, 61.0, 61.0]]),
                          torch.tensor([2, 4]), 5, 0.0)
    assert cls[0].tolist() == [2]


def test_center_sampling_shrinks_the_positive_region():
    # Box 0..100 (centre 50); stride 8, radius 1.5 -> centre region [38, 62]: x = 30 is inside the box
    # but outside the region.
    pts = [torch.tensor([[30.0, 50.0], [45.0, 50.0]])]
    box = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    assert fcos_targets(pts, (8,), ((0, INF),), box, torch.tensor([0]), 5, 0.0)[0][0].tolist() == [0, 0]
    assert fcos_targets(pts, (8,), ((0, INF),), box, torch.tensor([0]), 5, 1.5)[0][0].tolist() == [5, 0]


def test_empty_image_is_all_background():
    cls, ltrb = fcos_targets([level_points(4, 4, 8)], (8,), ((0, INF),), torch.zeros(0, 4),
                             torch.zeros(0, dtype=torch.int64), 5)
    assert (cls[0] == 5).all() and (ltrb[0] == 0).all()


def test_centerness_formula():
    t = torch.tensor([[10.0, 20.0, 30.0, 40.0], [5.0, 5.0, 5.0, 5.0]])
    assert centerness_targets(t).tolist() == pytest.approx([math.sqrt(10 / 30 * 20 / 40), 1.0])


# --------------------------------------------------------------------------- losses

def test_box_losses_vs_formulas():
    pred = torch.tensor([[10.0, 10.0, 10.0, 10.0]])
    target = torch.tensor([[5.0, 5.0, 15.0, 15.0]])
    # Boxes (-10,-10,10,10) and (-5,-5,15,15): intersection 15x15, union 400 + 400 - 225, hull 25x25.
    iou = 225 / 575
    giou = iou - (625 - 575) / 625
    assert box_loss(pred, target, "giou").item() == pytest.approx(1 - giou, rel=1e-5)
    assert box_loss(pred, target, "iou").item() == pytest.approx(-math.log(iou), rel=1e-5)


def test_fcos_losses_vs_formulas():
    g = torch.Generator().manual_seed(0)
    k = 3
    logits = [torch.randn(6, k, generator=g), torch.randn(4, k, generator=g)]
    ltrb = [torch.rand(6, 4, generator=g) * 20 + 1, torch.rand(4, 4, generator=g) * 40 + 1]
    ctr = [torch.randn(6, generator=g), torch.randn(4, generator=g)]
    gt_cls = [torch.tensor([3, 0, 3, 2, 3, 3]), torch.tensor([1, 3, 3, 3])]
    gt_ltrb = [torch.rand(6, 4, generator=g) * 20 + 1, torch.rand(4, 4, generator=g) * 40 + 1]
    beta = (1.0, 2.0)
    out = fcos_losses(logits, ltrb, ctr, gt_cls, gt_ltrb, beta, 0.25, 2.0, "giou")

    def focal(x, t):
        p = x.sigmoid()
        ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
        pt = p * t + (1 - p) * (1 - t)
        return ((0.25 * t + 0.75 * (1 - t)) * ce * (1 - pt) ** 2).sum()

    num_pos = 3
    cls = box = cen = 0.0
    ctr_sum = 0.0
    for lg, pr, c, gc, gl, b in zip(logits, ltrb, ctr, gt_cls, gt_ltrb, beta):
        onehot = torch.zeros(len(gc), k)
        for i, lab in enumerate(gc.tolist()):
            if lab < k:
                onehot[i, lab] = 1
        cls += b * focal(lg, onehot)
        for i, lab in enumerate(gc.tolist()):
            if lab < k:
                l_, t_, r_, b_ = gl[i].tolist()
                c_t = math.sqrt(min(l_, r_) / max(l_, r_) * min(t_, b_) / max(t_, b_))
                ctr_sum += c_t
                box += b * c_t * box_loss(pr[i:i + 1], gl[i:i + 1], "giou").item()
                cen += b * F.binary_cross_entropy_with_logits(c[i], torch.tensor(c_t)).item()
    assert out["loss_cls"].item() == pytest.approx(float(cls) / num_pos, rel=1e-5)
    assert out["loss_box_reg"].item() == pytest.approx(box / ctr_sum, rel=1e-5)
    assert out["loss_centerness"].item() == pytest.approx(cen / num_pos, rel=1e-5)


# --------------------------------------------------------------------------- model

def test_fcos_and_querydet_fcos_defaults():
    plain = tiny(name="fcos")
    assert plain.levels == (3, 4, 5, 6, 7) and plain.query_head is None
    assert plain.regression_ranges[0] == (0.0, 64.0) and plain.level_loss_weights == (1.0,) * 5
    qd = tiny()
    assert qd.levels == (2, 3, 4, 5, 6, 7) and qd.query_levels == (3, 4)
    assert qd.regression_ranges[:2] == ((0.0, 32.0), (32.0, 64.0))
    assert qd.level_loss_weights == (1.0, 1.4, 2.1, 2.5, 2.9, 3.2)
    assert len(qd.head.box_tower.predictors) == 2 and qd.head.box_tower.predictors[1].out_channels == 1
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in qd.modules())


def test_train_and_eval_contract(images, targets):
    model = tiny()
    losses = model(images, targets)
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_centerness", "loss_query"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.query_head.predictors[0].weight.grad is not None
    assert model.head.scales.grad is not None
    plain = tiny(name="fcos")
    assert set(plain(images, targets)) == {"loss_cls", "loss_box_reg", "loss_centerness"}
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    assert all(torch.isfinite(v) for v in plain(images, empty).values())
    model.eval()
    with torch.no_grad():
        out = model(images, original_sizes=[(64, 96), (96, 160)])
    for det, (h, w) in zip(out, [(64, 96), (96, 160)]):
        n = det["scores"].shape[0]
        assert det["boxes"].shape == (n, 4) and det["labels"].shape == (n,) and n <= 100
        assert (det["boxes"][:, 2] <= w).all() and (det["boxes"][:, 3] <= h).all()
        assert det["labels"].dtype == torch.int64 and (det["labels"] < 5).all()


@pytest.fixture(scope="module")
def csq_model():
    model = tiny(csq={"enabled": True, "context": 11}).eval()
    randomize_head(model)
    return model


def features_of(model, images):
    batch, sizes = model.preprocess(images)
    return model.backbone(batch), sizes


@torch.no_grad()
def test_csq_sparse_outputs_equal_dense_head_at_children(csq_model, images):
    # Context 11 covers the receptive field of 2 trunk convs + a 3x3 predictor (radius 3) and more;
    # pick sigma at the median of the start-level query probabilities so that only part of P4 fires.
    model = csq_model
    feats, _ = features_of(model, images)
    q4 = model.query_head(feats["p4"])[0].sigmoid()
    model.cfg.csq.threshold = float(q4.median())
    model._csq_inference(feats)
    out = model.last_csq
    assert [lv.level for lv in out.levels] == [3, 2]
    for lv in out.levels:
        assert 0 < lv.num_children < lv.num_positions     # genuinely sparse
        cls_map = model.head.cls_tower(feats[f"p{lv.level}"])
        box_map = model.head.box_tower(feats[f"p{lv.level}"])
        dense = [gather_sites(m, lv.positions) for m in cls_map + box_map]
        for sparse, ref in zip(lv.values[0] + lv.values[1], dense):
            torch.testing.assert_close(sparse, ref, atol=1e-5, rtol=1e-4)
    assert {int(b) for b in out.levels[0].positions[:, 0]} == {0, 1}  # both images of the batch


def same_size_images():
    g = torch.Generator().manual_seed(3)
    # Multiples of 32, so no padded area (whose identical features would tie scores).
    return [torch.rand(3, 64, 96, generator=g) * 255, torch.rand(3, 64, 96, generator=g) * 255]


@torch.no_grad()
def test_csq_with_every_position_queried_equals_dense(csq_model):
    model = csq_model
    images = same_size_images()
    bias = model.query_head.predictors[0].bias
    saved = bias.clone()
    try:
        bias.fill_(50.0)                       # sigmoid = 1 > sigma everywhere: the cascade covers P3, P2
        model.cfg.csq.threshold, model.cfg.csq.context = 0.12, 5   # any context: nothing is outside
        model.cfg.csq.enabled = False
        dense = model(images)
        model.cfg.csq.enabled = True
        sparse = model(images)
        stats = model.last_csq.stats()
    finally:
        bias.copy_(saved)
        model.cfg.csq.context = 11
    assert stats["levels"][3]["share"] == 1.0 and stats["levels"][2]["share"] == 1.0
    for d, s in zip(dense, sparse):
        assert d["scores"].shape[0] > 10
        torch.testing.assert_close(s["scores"], d["scores"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s["boxes"], d["boxes"], atol=1e-3, rtol=1e-5)
        assert torch.equal(s["labels"], d["labels"])


@torch.no_grad()
def test_csq_with_no_query_uses_dense_levels_only(csq_model):
    model = csq_model
    images = same_size_images()
    bias = model.query_head.predictors[0].bias
    saved = bias.clone()
    try:
        bias.fill_(-50.0)
        model.cfg.csq.threshold = 0.12
        out = model(images)
        assert model.last_csq.levels == [] and model.last_csq.stats()["start_queries"] == 0
        feats, sizes = features_of(model, images)
    finally:
        bias.copy_(saved)
    test = model.cfg.test
    for b, det in enumerate(out):
        ref = fcos_postprocess_image(model.dense_levels(feats, (4, 5, 6, 7))[b], test.topk_candidates,
                                     test.score_threshold, test.nms_threshold, test.max_detections, sizes[b])
        torch.testing.assert_close(det["boxes"], ref["boxes"])
        assert torch.equal(det["labels"], ref["labels"])


def test_config_errors():
    with pytest.raises(ConfigError, match="query"):
        tiny(name="fcos", csq={"enabled": True})                 # CSQ without a query head
    with pytest.raises(ConfigError, match="model.csq.start_level"):
        tiny(csq={"enabled": True, "start_level": 5})             # no query head on P5
    with pytest.raises(ConfigError, match="model.csq.start_level"):
        tiny(csq={"enabled": True, "start_level": 2, "threshold": 0.1}, query={"levels": [2, 3], "num_convs": 2})
    with pytest.raises(ConfigError, match="model.csq.threshold"):
        tiny(csq={"threshold": 0.0})
    with pytest.raises(ConfigError, match="model.targets.regression_ranges"):
        tiny(targets={"regression_ranges": [[0, 32], [32, 64]]})
    with pytest.raises(ConfigError, match="model.head.box_activation"):
        tiny(head={"box_activation": "softplus"})
    with pytest.raises(ConfigError, match="model.loss.level_loss_weights"):
        tiny(name="fcos", loss={"level_loss_weights": [1.0, 2.0]})
    with pytest.raises(ConfigError, match="model.head.norm_groups"):
        tiny(name="fcos", head={"num_convs": 2, "norm_groups": 5})   # does not divide 32 channels
    with pytest.raises(ConfigError, match="norm_groups=0"):
        tiny(head={"num_convs": 2, "norm_groups": 8}, csq={"enabled": True})  # GN cannot run sparsely


def test_group_norm_head_is_opt_in():
    """The default head has no norm layers (its state dict is the official one); norm_groups=G puts
    GroupNorm(G) between every tower conv and its ReLU, so each group of the trunk's pre-activation
    output has zero mean and unit variance at init (affine 1, 0)."""
    plain = tiny(name="fcos", head={"num_convs": 2}).head
    assert not any("norms" in key for key in plain.state_dict())
    head = tiny(name="fcos", head={"num_convs": 2, "norm_groups": 8}).head
    assert len(head.cls_tower.norms) == len(head.box_tower.norms) == 2
    assert all(norm.num_groups == 8 for norm in head.cls_tower.norms)
    x = torch.randn(2, 32, 9, 11) * 7 + 3
    tower = head.box_tower
    pre = tower.norms[0](tower.subnet[0](x)).view(2, 8, -1)
    assert torch.allclose(pre.mean(-1), torch.zeros(2, 8), atol=1e-5)
    assert torch.allclose(pre.var(-1, unbiased=False), torch.ones(2, 8), atol=1e-3)
    expected = tower.norms[1](tower.subnet[1](pre.view(2, 32, 9, 11).relu())).relu()
    assert torch.allclose(tower.trunk(x), expected, atol=1e-6)


def test_overfit_one_image():
    """Head-only Adam on one image: the class loss collapses and the box loss leaves its plateau.
    (With relu box outputs the initial boxes are ~0.1 px, so the GIoU loss starts at ~1 and only moves
    once the boxes have grown: the FCOS init dynamics.)"""
    torch.manual_seed(0)
    model = tiny(name="fcos")
    g = torch.Generator().manual_seed(5)
    images = [torch.rand(3, 64, 64, generator=g) * 255]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 48.0]]), "labels": torch.tensor([2])}]
    history = train_steps(model, images, targets, torch.optim.Adam(model.head.parameters(), lr=1e-3), 30)
    first, last = history[0], history[-1]
    assert last["loss_cls"] < 0.3 * first["loss_cls"], history
    assert last["loss_box_reg"] < 0.9 * first["loss_box_reg"], history
    assert sum(last.values()) < 0.7 * sum(first.values()), history


@pytest.mark.parametrize("name", ["fcos/r50_fpn_1x_coco", "fcos/querydet_r50_fpn_1x_coco", "fcos/mobilenetv2_fpn_cpu",
                                  "fcos/mobilenetv2_fpn_small_data"])
def test_bundled_configs_build(name):
    small = ["model.backbone.weights=null", "model.fpn.channels=32", "model.head.num_convs=1"]
    if "r50" in name:
        small += ["model.backbone.depth=18", "model.backbone.layout=torchvision"]
    model = build_model(name, small)
    assert model.cfg.name == ("querydet_fcos" if "querydet" in name or "cpu" in name else "fcos")
    assert model.cfg.csq.enabled is False


def test_box_distances_relu_stride_and_exp():
    head = tiny().head                                  # strides (4, 8, ...), scales 1
    raw = torch.tensor([[1.5, -2.0, 0.0, 3.0]])
    assert head.box_distances(raw, 1).tolist() == [[12.0, 0.0, 0.0, 24.0]]   # relu(x) * 8
    exp_head = tiny(head={"num_convs": 2, "box_activation": "exp"}).head
    assert torch.allclose(exp_head.box_distances(raw, 1), raw.exp())
