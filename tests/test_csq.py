"""Cascade Sparse Query driver (sparsedet.models.csq): cascade semantics, query methods, config.

Reference: a brute-force cascade built from dense towers and the masked-dense evaluation of
sparse_conv (scatter to a zero map, conv2d, re-mask after every layer). fp32, atol 1e-5.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from sparsedet.config import ConfigError, from_dict
from sparsedet.layers.sparse_conv import gather_sites, masked_dense_tower
from sparsedet.models.csq import CSQConfig, cascade_sparse_query, crop_tower

from test_sparse_conv import make_tower

ATOL = RTOL = 1e-5
C = 8


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def towers():
    """(query tower, [cls tower (A*K = 6), box tower (A*4 = 4, + 1-channel centerness)])."""
    return (make_tower(C, 4, (1,), seed=10), [make_tower(C, 4, (6,), seed=11), make_tower(C, 4, (4, 1), seed=12)])


def pyramid(batch=2, p4=(6, 7), seed=0):
    """FPN-like maps P2..P5 of a (32 * p4) input: P_l is exactly twice P_{l+1}."""
    g = torch.Generator().manual_seed(seed)
    h, w = p4
    sizes = {2: (4 * h, 4 * w), 3: (2 * h, 2 * w), 4: (h, w), 5: ((h + 1) // 2, (w + 1) // 2)}
    return {lv: torch.randn(batch, C, *hw, generator=g) for lv, hw in sizes.items()}


def tuples(sites):
    return [tuple(s) for s in sites.tolist()]


def reference_cascade(features, query_tower, value_towers, levels, start, sigma, context):
    """Brute-force CSQ with python sets and masked-dense towers: {level: (children, values, query)}."""
    q = query_tower(features[start])[0][:, 0]
    parents = [tuple(s) for s in (q.sigmoid() > sigma).nonzero().tolist()]
    out = {}
    for i, v in enumerate(levels):
        if not parents:
            break
        b, _, h, w = features[v].shape
        children = [(pb, 2 * py + i2, 2 * px + j2) for i2, j2 in ((0, 0), (0, 1), (1, 0), (1, 1))
                    for pb, py, px in parents]
        r = context // 2
        mask = torch.zeros(b, h, w, dtype=torch.bool)
        for cb, cy, cx in children:
            mask[cb, max(cy - r, 0):cy + r + 1, max(cx - r, 0):cx + r + 1] = True
        sites = torch.tensor(children)
        values = [[gather_sites(m, sites) for m in masked_dense_tower(t, features[v], mask)] for t in value_towers]
        last = i == len(levels) - 1
        query = None if last else gather_sites(masked_dense_tower(query_tower, features[v], mask)[0], sites)[:, 0]
        out[v] = (children, values, query)
        if not last:
            parents = [c for c, s in zip(children, query.sigmoid().tolist()) if s > sigma]
    return out


def logit(p):
    return float(torch.logit(torch.tensor(p)))


# --------------------------------------------------------------------------------------------
# cascade


@pytest.mark.parametrize("context", [5, 1])
def test_cascade_matches_brute_force(towers, context):
    query, values = towers
    feats = pyramid()
    # A sigma near the median of the start map: some positions fire, some don't, in both images.
    sigma = float(query(feats[4])[0].sigmoid().median())
    with torch.inference_mode():
        out = cascade_sparse_query(feats, query, values, [3, 2], start_level=4, threshold=sigma, context=context)
    ref = reference_cascade(feats, query, values, [3, 2], 4, sigma, context)
    assert [lv.level for lv in out.levels] == list(ref)
    assert 3 in ref
    for lv in out.levels:
        children, vals, q = ref[lv.level]
        assert tuples(lv.positions) == children
        assert set(lv.positions[:, 0].tolist()) == {0, 1}                # both images queried
        for got_t, ref_t in zip(lv.values, vals):
            for g, r in zip(got_t, ref_t):
                torch.testing.assert_close(g, r, atol=ATOL, rtol=RTOL)
        if q is None:
            assert lv.query_logits is None
        else:
            torch.testing.assert_close(lv.query_logits, q, atol=ATOL, rtol=RTOL)
    assert [v.shape[1] for v in out.levels[0].values[1]] == [4, 1]       # box + centerness


def test_children_of_each_level_are_children_of_fired_queries(towers):
    query, values = towers
    feats = pyramid(seed=3)
    sigma = float(query(feats[4])[0].sigmoid().quantile(0.7))
    out = cascade_sparse_query(feats, query, values, [3, 2], threshold=sigma)
    fired4 = set(tuples((out.start_query_logits.sigmoid() > sigma).nonzero()))
    p3 = out.level(3)
    assert {(b, y // 2, x // 2) for b, y, x in tuples(p3.positions)} == fired4
    assert len(p3.positions) == 4 * len(fired4)
    p2 = out.level(2)
    if p2 is not None:
        fired3 = {s for s, q in zip(tuples(p3.positions), p3.query_logits.sigmoid().tolist()) if q > sigma}
        assert {(b, y // 2, x // 2) for b, y, x in tuples(p2.positions)} == fired3


def test_everything_queried_with_exact_context_equals_dense(towers):
    """sigma = 0 queries every position; an 11x11 context reproduces the dense towers exactly."""
    query, values = towers
    feats = pyramid(p4=(3, 4))
    out = cascade_sparse_query(feats, query, values, [3, 2], threshold=0.0, context=11)
    for lv in out.levels:
        b, h, w = lv.shape
        assert lv.num_children == b * h * w
        for t, got in zip(values, lv.values):
            for g, d in zip(got, t(feats[lv.level])):
                torch.testing.assert_close(g, gather_sites(d, lv.positions), atol=ATOL, rtol=RTOL)
    assert out.stats()["share"] == 1.0


@pytest.mark.parametrize("method", ["crop", "complete_conv"])
def test_exact_methods_equal_dense_at_children(towers, method):
    query, values = towers
    feats = pyramid(seed=5)
    sigma = float(query(feats[4])[0].sigmoid().median())
    out = cascade_sparse_query(feats, query, values, [3, 2], threshold=sigma, method=method)
    exact = cascade_sparse_query(feats, query, values, [3, 2], threshold=sigma, context=11)  # CSQ, exact window
    assert [lv.level for lv in out.levels] == [lv.level for lv in exact.levels] == [3, 2]
    for lv, ex in zip(out.levels, exact.levels):
        assert torch.equal(lv.positions, ex.positions)
        dense = [t(feats[lv.level]) for t in values]
        for got_t, dense_t in zip(lv.values, dense):
            for g, d in zip(got_t, dense_t):
                torch.testing.assert_close(g, gather_sites(d, lv.positions), atol=ATOL, rtol=RTOL)
        for got_t, ex_t in zip(lv.values, ex.values):
            for g, e in zip(got_t, ex_t):
                torch.testing.assert_close(g, e, atol=ATOL, rtol=RTOL)
    stats = out.stats()
    if method == "complete_conv":
        assert stats["share"] == 1.0


def test_crop_tower_at_borders_equals_dense():
    tower = make_tower(C, 2, (3, 2), pred_k=1, seed=4)
    feat = torch.randn(2, C, 7, 9)
    positions = torch.tensor(list(itertools.product(range(2), range(7), range(9))))
    for g, d in zip(crop_tower(tower, feat, positions, chunk=50), tower(feat)):
        torch.testing.assert_close(g, gather_sites(d, positions), atol=ATOL, rtol=RTOL)


def test_empty_queries_stop_cleanly(towers):
    query, values = towers
    feats = pyramid()
    out = cascade_sparse_query(feats, query, values, [3, 2], start_query_logits=torch.full((2, 6, 7), -30.0))
    assert out.levels == [] and out.level(3) is None
    stats = out.stats()
    assert stats["start_queries"] == 0 and stats["share"] == 0.0
    assert stats["levels"][3] == dict(queries=0, children=0, active=0, positions=2 * 12 * 14, share=0.0)


def test_cascade_stops_after_a_level_without_queries(towers):
    """P4 fires in image 1 only; the shared query head fires nowhere on P3: P3 present, P2 absent."""
    _, values = towers
    query = make_tower(C, 1, (1,), seed=7)
    with torch.no_grad():
        query.predictors[0].weight.zero_()
        query.predictors[0].bias.fill_(-20.0)
    feats = pyramid()
    start = torch.full((2, 6, 7), -20.0)
    start[1, 2, 3] = start[1, 5, 6] = 5.0
    out = cascade_sparse_query(feats, query, values, [3, 2], start_query_logits=start, threshold=0.12)
    assert [lv.level for lv in out.levels] == [3]
    p3 = out.level(3)
    assert p3.num_queries == 2 and p3.num_children == 8 and (p3.positions[:, 0] == 1).all()
    assert p3.query_logits.shape == (8,)
    qmap = p3.query_map()
    assert qmap.shape == (2, 12, 14) and torch.isinf(qmap[0]).all() and torch.isfinite(qmap).sum() == 8
    stats = out.stats()
    assert stats["levels"][2]["children"] == 0 and stats["levels"][3]["active"] == p3.num_active
    # two isolated queries in the same image: two 6x6 windows (the one of (5, 6) clipped to 4x4 in the corner)
    assert p3.num_active == 36 + 4 * 4


def test_driver_argument_errors(towers):
    query, values = towers
    feats = pyramid()
    with pytest.raises(ValueError, match="consecutive"):
        cascade_sparse_query(feats, query, values, [2])
    with pytest.raises(ValueError, match="lack levels"):
        cascade_sparse_query({4: feats[4], 3: feats[3]}, query, values, [3, 2])
    with pytest.raises(ValueError, match="one output channel"):
        cascade_sparse_query(feats, values[1], values, [3, 2])
    with pytest.raises(ValueError, match="method"):
        cascade_sparse_query(feats, query, values, [3, 2], method="dense")


# --------------------------------------------------------------------------------------------
# config


def test_config_defaults_and_yaml_section():
    cfg = from_dict(CSQConfig, {"enabled": True, "threshold": 0.15, "context": 3, "method": "crop"}, "model.csq")
    assert (cfg.enabled, cfg.threshold, cfg.start_level, cfg.context, cfg.method) == (True, 0.15, 4, 3, "crop")
    assert CSQConfig().driver_kwargs() == dict(start_level=4, threshold=0.12, context=5, method="csq")


@pytest.mark.parametrize("field, value", [
    ("threshold", 0.0), ("threshold", 1.0), ("threshold", -0.1), ("threshold", "high"), ("threshold", True),
    ("context", 4), ("context", 0), ("context", 2.0), ("method", "sparse"), ("start_level", 0), ("enabled", "yes"),
])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"model\.csq\.{field}"):
        CSQConfig(**{field: value})
    with pytest.raises(ConfigError, match="did you mean model.csq.threshold"):
        from_dict(CSQConfig, {"treshold": 0.1}, "model.csq")


# --------------------------------------------------------------------------------------------
# QueryDet detector with CSQ (wiring of QueryDet._csq_inference)

TINY_QUERYDET = {"model": {
    "name": "querydet", "num_classes": 3, "backbone": {"depth": 18}, "fpn": {"channels": 16},
    "head": {"num_convs": 2}, "query": {"num_convs": 2},
    # Context 7 covers the receptive field of 2 trunk convs + a 3x3 predictor (radius 3): exact.
    "csq": {"enabled": True, "context": 7},
}}


@pytest.fixture(scope="module")
def querydet():
    """Tiny random QueryDet (R-18, 16 channels, 2-conv towers, K=3) in eval mode, with head weights
    scaled up so that scores spread over (0, 1) instead of sitting at the prior."""
    import sparsedet

    torch.manual_seed(0)
    model = sparsedet.build_model(TINY_QUERYDET, ["model.test.score_threshold=0.3"]).eval()
    with torch.no_grad():
        for tower in (model.head.cls_tower, model.head.box_tower):
            for conv in tower.subnet:
                conv.weight.normal_(0.0, (2.0 / conv.weight[0].numel()) ** 0.5)
        # Rescale the predictors so that logits ~ N(-1, 1) (no saturated sigmoids: ties would make
        # top-k order-dependent) and deltas ~ N(0, 0.1) (boxes near their anchors, not clipped).
        cls, box = model.head.cls_tower.predictors[0], model.head.box_tower.predictors[0]
        cls.bias.zero_()
        box.bias.zero_()
        batch, _ = model.preprocess(images2())
        levels = model.dense_levels(model.backbone(batch))
        logits = torch.cat([lv.logits.flatten() for image in levels for lv in image])
        deltas = torch.cat([lv.deltas.flatten() for image in levels for lv in image])
        cls.weight.div_(logits.std())
        cls.bias.fill_(-1.0)
        box.weight.mul_(0.1 / deltas.std())
    return model


@pytest.fixture
def query_bias(querydet):
    """``query_bias(value)`` sets the query predictor's bias (how much fires); restored afterwards."""
    bias = querydet.query_head.predictors[0].bias
    saved = bias.detach().clone()

    def set_bias(value):
        bias.data.fill_(value)

    yield set_bias
    bias.data.copy_(saved)


def images2():
    g = torch.Generator().manual_seed(4)
    return [torch.rand(3, 128, 160, generator=g) * 255, torch.rand(3, 96, 128, generator=g) * 255]


def run_levels(model, images, csq: bool):
    """(per-image LevelOutputs, image_sizes) with CSQ on or off, same weights."""
    batch, sizes = model.preprocess(images)
    features = model.backbone(batch)
    model.cfg.csq.enabled = csq
    try:
        return model.inference_levels(features, sizes), sizes
    finally:
        model.cfg.csq.enabled = True


def dense_rows_at(level_outputs, positions, width, num_anchors):
    """Rows of a dense LevelOutputs at (n, 2) positions (y, x), child-major, anchor-minor."""
    base = (positions[:, 0] * width + positions[:, 1]) * num_anchors
    rows = (base[:, None] + torch.arange(num_anchors)).reshape(-1)
    return [t[rows] for t in level_outputs]


def test_build_from_api_and_config_plumbing():
    import sparsedet

    model = sparsedet.build_model(TINY_QUERYDET, ["model.csq.enabled=true", "model.csq.threshold=0.2"])
    assert model.cfg.csq.enabled and model.cfg.csq.threshold == 0.2 and model.last_csq is None
    with pytest.raises(ConfigError, match="model.csq.context"):
        sparsedet.build_model(TINY_QUERYDET, ["model.csq.context=4"])


@pytest.mark.parametrize("bias", [30.0, 0.0])
def test_sparse_levels_equal_dense_head_at_queried_positions(querydet, query_bias, bias):
    """bias 30: everything is queried; bias 0: a random part fires (both images, P3 and P2)."""
    query_bias(bias)
    images = images2()
    sparse, _ = run_levels(querydet, images, csq=True)
    out = querydet.last_csq
    dense, _ = run_levels(querydet, images, csq=False)
    a = querydet.num_anchors
    reached = [lv.level for lv in out.levels]
    assert reached == [3, 2]
    for i in range(2):
        dense_by_level = dict(zip(querydet.levels, dense[i]))
        k = 0
        for lv in out.levels:
            mine = lv.positions[lv.positions[:, 0] == i][:, 1:]
            if bias == 30.0:
                assert len(mine) == lv.shape[1] * lv.shape[2]
            ref = dense_rows_at(dense_by_level[lv.level], mine, lv.shape[2], a)
            for got, exp in zip(sparse[i][k], ref):
                torch.testing.assert_close(got, exp, atol=ATOL, rtol=RTOL)
            k += 1
        # then the dense levels from the start level up, unchanged
        for got, lvl in zip(sparse[i][k:], [l for l in querydet.levels if l >= 4]):
            for g, e in zip(got, dense_by_level[lvl]):
                torch.testing.assert_close(g, e, atol=ATOL, rtol=RTOL)
    stats = out.stats()
    assert stats["start_queries"] > 0 and 0 < stats["share"] <= 1


def assert_same_detections(got, expected):
    assert len(got["scores"]) == len(expected["scores"]) > 0
    # Pair each expected detection with one of the same label, box and score (fp noise may swap
    # near-equal scores; boxes clipped to the image can coincide, so the box alone is ambiguous).
    for box, score, label in zip(expected["boxes"], expected["scores"], expected["labels"]):
        close = (got["labels"] == label) & ((got["boxes"] - box).abs().sum(1) < 1e-3) \
            & ((got["scores"] - score).abs() < 1e-5)
        assert bool(close.any()), (box, score, label)


def test_everything_queried_gives_dense_detections(querydet, query_bias):
    query_bias(30.0)
    images = images2()
    csq = querydet(images)
    querydet.cfg.csq.enabled = False
    try:
        dense = querydet(images)
    finally:
        querydet.cfg.csq.enabled = True
    for c, d in zip(csq, dense):
        assert_same_detections(c, d)


def test_detections_equal_dense_restricted_to_queried_positions(querydet, query_bias):
    query_bias(0.0)
    images = images2()
    csq = querydet(images)
    out = querydet.last_csq
    dense, sizes = run_levels(querydet, images, csq=False)
    a = querydet.num_anchors
    restricted = []
    for i in range(2):
        by_level = dict(zip(querydet.levels, dense[i]))
        levels = []
        for lv in out.levels:
            mine = lv.positions[lv.positions[:, 0] == i][:, 1:]
            levels.append(type(by_level[lv.level])(*dense_rows_at(by_level[lv.level], mine, lv.shape[2], a)))
        restricted.append(levels + [by_level[l] for l in querydet.levels if l >= 4])
    for c, d in zip(csq, querydet.postprocess(restricted, sizes)):
        assert_same_detections(c, d)


def test_no_queries_gives_dense_upper_levels_only(querydet, query_bias):
    query_bias(-30.0)
    images = images2()
    csq = querydet(images)
    assert querydet.last_csq.levels == [] and querydet.last_csq.stats()["share"] == 0.0
    dense, sizes = run_levels(querydet, images, csq=False)
    upper = [[lv for lvl, lv in zip(querydet.levels, d) if lvl >= 4] for d in dense]
    for c, d in zip(csq, querydet.postprocess(upper, sizes)):
        assert_same_detections(c, d)
