"""Submanifold sparse convolution (sparsedet.layers.sparse_conv) against dense and brute-force references.

Tolerance: fp32, atol 1e-5 / rtol 1e-5 on activations of order 1 (weights are scaled so that every
layer keeps unit variance; default PyTorch init would shrink them and make any tolerance vacuous).
"""
from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sparsedet.layers import sparse_conv
from sparsedet.layers.conv_tower import ConvTower
from sparsedet.layers.sparse_conv import (
    ActiveSet, SpconvTower, build_active_set, gather_sites, masked_dense_tower, query_children,
    rulebook_conv, sparse_tower, sparse_towers, spconv_available, submanifold_conv,
)

ATOL = RTOL = 1e-5


def make_tower(c_in=8, num_convs=4, out=(6, 4), pred_k=3, seed=0) -> ConvTower:
    """ConvTower with unit-gain random weights and non-zero biases."""
    g = torch.Generator().manual_seed(seed)
    tower = ConvTower(c_in, num_convs, out, predictor_kernel_size=pred_k)
    with torch.no_grad():
        for conv in list(tower.subnet) + list(tower.predictors):
            fan_in = conv.weight[0].numel()
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.1)
    return tower.eval()


def at(maps, sites):
    """(B, C, H, W) map read at (n, 3) sites -> (n, C)."""
    return gather_sites(maps, sites)


def random_mask(shape, p, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < p


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    yield


# --------------------------------------------------------------------------------------------
# active sets


def test_query_children_order_and_clipping():
    parents = torch.tensor([[0, 1, 2], [1, 0, 0], [0, 3, 4]])
    got = query_children(parents, (2, 7, 9))   # level l is 7x9: row 2*3+1 = 7 and col 2*4+1 = 9 drop out
    expected = [(b, 2 * y + i, 2 * x + j) for i, j in ((0, 0), (0, 1), (1, 0), (1, 1))
                for b, y, x in parents.tolist() if 2 * y + i < 7 and 2 * x + j < 9]
    assert [tuple(r) for r in got.tolist()] == expected
    assert query_children(torch.zeros(0, 3, dtype=torch.long), (1, 4, 4)).shape == (0, 3)


@pytest.mark.parametrize("context", [1, 3, 5])
def test_active_set_matches_brute_force(context):
    shape = (2, 9, 11)
    # Children near every border and corner, overlapping windows, different sets per image.
    children = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 8, 10], [0, 4, 5], [0, 5, 5],
                             [1, 2, 9], [1, 8, 0], [1, 3, 3]])
    active = build_active_set(children, shape, context)
    r = context // 2
    brute = set()
    for b, y, x in children.tolist():
        for dy, dx in itertools.product(range(-r, r + 1), repeat=2):
            if 0 <= y + dy < shape[1] and 0 <= x + dx < shape[2]:
                brute.add((b, y + dy, x + dx))
    rows = [tuple(s) for s in active.indices.tolist()]
    assert rows == sorted(brute)                       # unique, clipped, row-major sorted
    assert active.num_active == len(brute) and active.shape == shape
    assert [rows[i] for i in active.child_rows.tolist()] == [tuple(c) for c in children.tolist()]
    row_of = {s: i for i, s in enumerate(rows)}
    n = len(rows)
    for i, (b, y, x) in enumerate(rows):
        expect = [row_of.get((b, y + dy, x + dx), n) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        assert active.neighbors[i].tolist() == expect
    assert torch.equal(active.mask(), ActiveSet.from_mask(active.mask()).mask())


def test_isolated_query_gives_36_sites():
    children = query_children(torch.tensor([[0, 5, 5]]), (1, 20, 20))
    assert build_active_set(children, (1, 20, 20), 5).num_active == 36


def test_active_set_errors():
    with pytest.raises(ValueError, match="odd"):
        build_active_set(torch.zeros(1, 3, dtype=torch.long), (1, 4, 4), 4)
    with pytest.raises(ValueError, match=r"\(n, 3\) int64"):
        build_active_set(torch.zeros(1, 2, dtype=torch.long), (1, 4, 4), 3)
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 1, 1] = True
    with pytest.raises(ValueError, match="not active"):
        ActiveSet.from_mask(mask, torch.tensor([[0, 2, 2]]))


# --------------------------------------------------------------------------------------------
# exactness against the masked-dense reference


def test_every_layer_matches_masked_dense_batch2():
    """Layer by layer, on all active rows, for two images with different active sets."""
    tower = make_tower()
    feats = torch.randn(2, 8, 13, 17)
    mask = random_mask((2, 13, 17), 0.3, seed=1)
    mask[1, :6] = False                                # image 1: a different, sparser set
    active = ActiveSet.from_mask(mask)
    m = mask.unsqueeze(1).float()
    x_sparse = gather_sites(feats, active.indices)
    x_dense = feats * m
    for conv in tower.subnet:
        x_sparse = submanifold_conv(x_sparse, active.neighbors, conv.weight, conv.bias).relu_()
        x_dense = conv(x_dense).relu() * m
        torch.testing.assert_close(x_sparse, at(x_dense, active.indices), atol=ATOL, rtol=RTOL)
        assert x_dense.abs().max() > 0.1               # activations stay O(1): the check is not vacuous
    for p in tower.predictors:
        torch.testing.assert_close(submanifold_conv(x_sparse, active.neighbors, p.weight, p.bias),
                                   at(p(x_dense) * m, active.indices), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("impl", ["gather", "rulebook"])
@pytest.mark.parametrize("pred_k", [3, 1])
def test_sparse_tower_children_match_masked_dense(impl, pred_k):
    tower = make_tower(pred_k=pred_k)
    feats = torch.randn(2, 8, 12, 12)
    children = torch.tensor([[0, 0, 0], [0, 6, 7], [0, 6, 6], [1, 11, 11], [1, 3, 8]])
    active = build_active_set(children, (2, 12, 12), 5)
    got = sparse_tower(tower, gather_sites(feats, active.indices), active, impl=impl)
    ref = masked_dense_tower(tower, feats, active.mask())
    assert [g.shape for g in got] == [(5, 6), (5, 4)]
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, at(r, children), atol=ATOL, rtol=RTOL)


def test_gather_rulebook_and_chunking_agree():
    tower = make_tower(num_convs=2)
    feats = torch.randn(2, 8, 16, 16)
    active = ActiveSet.from_mask(random_mask((2, 16, 16), 0.4, seed=3))
    x = gather_sites(feats, active.indices)
    conv = tower.subnet[0]
    whole = submanifold_conv(x, active.neighbors, conv.weight, conv.bias)
    chunked = submanifold_conv(x, active.neighbors, conv.weight, conv.bias, chunk_rows=7)
    rule = rulebook_conv(x, active.neighbors, conv.weight, conv.bias)
    torch.testing.assert_close(chunked, whole, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(rule, whole, atol=ATOL, rtol=RTOL)
    rows = torch.tensor([5, 0, 17])
    torch.testing.assert_close(submanifold_conv(x, active.neighbors, conv.weight, conv.bias, rows=rows),
                               whole[rows], atol=ATOL, rtol=RTOL)


def test_full_active_set_equals_dense_tower():
    tower = make_tower()
    feats = torch.randn(2, 8, 10, 14)
    everything = torch.ones(2, 10, 14, dtype=torch.bool)
    sites = everything.nonzero()
    active = ActiveSet.from_mask(everything, sites)
    got = sparse_tower(tower, gather_sites(feats, active.indices), active)
    for g, d in zip(got, tower(feats)):
        torch.testing.assert_close(g, at(d, sites), atol=ATOL, rtol=RTOL)


def test_context_covering_receptive_field_equals_dense():
    """5 layers of 3x3 convs see 5 sites around: an 11x11 window makes the children exact."""
    tower = make_tower()
    feats = torch.randn(2, 8, 24, 24)
    children = torch.tensor([[0, 12, 12], [0, 1, 22], [1, 5, 5], [1, 23, 0]])
    dense = tower(feats)
    exact = build_active_set(children, (2, 24, 24), 11)
    got = sparse_tower(tower, gather_sites(feats, exact.indices), exact)
    for g, d in zip(got, dense):
        torch.testing.assert_close(g, at(d, children), atol=ATOL, rtol=RTOL)
    # ... and the official 5x5 window is only an approximation (otherwise the test above is vacuous).
    approx = build_active_set(children, (2, 24, 24), 5)
    got5 = sparse_tower(tower, gather_sites(feats, approx.indices), approx)
    assert not torch.allclose(got5[0], at(dense[0], children), atol=1e-3)


def test_empty_active_set():
    tower = make_tower()
    active = build_active_set(torch.zeros(0, 3, dtype=torch.long), (2, 8, 8), 5)
    assert active.num_active == 0 and active.neighbors.shape == (0, 9) and active.child_rows.shape == (0,)
    out = sparse_tower(tower, torch.zeros(0, 8), active)
    assert [o.shape for o in out] == [(0, 6), (0, 4)]


def test_unsupported_convs_are_rejected():
    tower = make_tower(num_convs=1)
    tower.subnet[0] = nn.Conv2d(8, 8, 3, stride=2, padding=1)
    active = build_active_set(torch.tensor([[0, 1, 1]]), (1, 4, 4), 3)
    with pytest.raises(ValueError, match="stride 1"):
        sparse_tower(tower, torch.zeros(active.num_active, 8), active)
    with pytest.raises(ValueError, match="rows"):
        sparse_tower(make_tower(), torch.zeros(1, 8), active)


def test_weight_cache_follows_in_place_updates():
    """The matmul layout of the weights is cached; loading new weights must invalidate it."""
    tower = make_tower(num_convs=1, out=(3,))
    feats = torch.randn(1, 8, 6, 6)
    active = ActiveSet.from_mask(torch.ones(1, 6, 6, dtype=torch.bool), torch.tensor([[0, 2, 3]]))
    x = gather_sites(feats, active.indices)
    with torch.inference_mode():
        before = sparse_tower(tower, x, active)[0]
    with torch.no_grad():
        tower.predictors[0].weight.mul_(2.0)
    with torch.inference_mode():
        after = sparse_tower(tower, x, active)[0]
    bias = tower.predictors[0].bias
    torch.testing.assert_close(after - bias, 2 * (before - bias), atol=ATOL, rtol=RTOL)


def test_gradients_flow_through_the_gather_path():
    """Not needed for inference, but the pure path must stay differentiable (no cached leaf copies)."""
    tower = make_tower(num_convs=1, out=(2,))
    active = ActiveSet.from_mask(torch.ones(1, 5, 5, dtype=torch.bool), torch.tensor([[0, 2, 2]]))
    x = torch.randn(active.num_active, 8, requires_grad=True)
    sparse_tower(tower, x, active)[0].sum().backward()
    assert x.grad is not None and tower.predictors[0].weight.grad is not None


def test_spconv_backend_matches_or_falls_back():
    tower = make_tower()
    feats = torch.randn(1, 8, 10, 10)
    children = torch.tensor([[0, 4, 4], [0, 9, 0]])
    active = build_active_set(children, (1, 10, 10), 5)
    x = gather_sites(feats, active.indices)
    runner = SpconvTower(tower)
    if not spconv_available():
        assert runner.ok is False                      # absent: pure path, no error
    got = runner(x, active)
    for g, r in zip(got, sparse_tower(tower, x, active)):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


def test_pruning_skips_unread_rows_without_changing_results():
    from sparsedet.layers.sparse_conv import needed_rows

    tower = make_tower()
    feats = torch.randn(1, 8, 30, 30)
    children = query_children(torch.tensor([[0, 7, 7]]), (1, 30, 30))       # one isolated query
    for context, expected_last in ((5, 16), (11, 16)):
        active = build_active_set(children, (1, 30, 30), context)
        needed = needed_rows(active, active.child_rows, tower)
        assert needed[-1].numel() == expected_last                         # 4x4 ring around the 2x2 block
        x = gather_sites(feats, active.indices)
        for a, b in zip(sparse_tower(tower, x, active), sparse_tower(tower, x, active, prune=False)):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
    assert needed[0].numel() == 10 * 10 < active.num_active == 12 * 12       # 11x11 context: layer 1 shrinks too


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_masked_dense():
    """The same gather/matmul path on the GPU (active-set building included), batch 2."""
    tower = make_tower(c_in=16).cuda()
    feats = torch.randn(2, 16, 20, 24, device="cuda")
    children = query_children(torch.tensor([[0, 3, 4], [0, 9, 11], [1, 0, 0], [1, 5, 5]], device="cuda"),
                              (2, 20, 24))
    active = build_active_set(children, (2, 20, 24), 5)
    assert active.indices.is_cuda and active.neighbors.is_cuda
    with torch.no_grad():
        got = sparse_tower(tower, gather_sites(feats, active.indices), active)
        ref = masked_dense_tower(tower, feats, active.mask())
    for g, r in zip(got, ref):
        # cuDNN may use TF32 / other summation orders: a slightly looser tolerance than on the CPU.
        torch.testing.assert_close(g, at(r, children), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("context", [1, 5, 11])
def test_stacked_towers_equal_one_by_one(context):
    """Towers of equal trunk shape run stacked (batched matmuls); others alone; same results."""
    towers = [make_tower(out=(6,), seed=1), make_tower(out=(4, 1), seed=2), make_tower(out=(1,), seed=3),
              make_tower(num_convs=2, out=(3,), seed=4), make_tower(out=(2,), pred_k=1, seed=5)]
    feats = torch.randn(2, 8, 20, 20)
    children = query_children(torch.tensor([[0, 2, 3], [1, 5, 5], [0, 9, 9]]), (2, 20, 20))
    active = build_active_set(children, (2, 20, 20), context)
    x = gather_sites(feats, active.indices)
    masks = active.mask()
    for chunk in (64, 2048):                             # several chunks and one
        with torch.no_grad():                            # (with autograd on, towers run one by one)
            got = sparse_towers(towers, x, active, chunk_rows=chunk)
        for tower, outs in zip(towers, got):
            for g, r in zip(outs, masked_dense_tower(tower, feats, masks)):
                torch.testing.assert_close(g, at(r, children), atol=ATOL, rtol=RTOL)
    empty = build_active_set(torch.zeros(0, 3, dtype=torch.long), (2, 20, 20), context)
    assert [[o.shape for o in outs] for outs in sparse_towers(towers[:2], torch.zeros(0, 8), empty)] == \
        [[(0, 6)], [(0, 4), (0, 1)]]


def test_views_sharing_one_trunk_run_it_once(monkeypatch):
    """Views of one tower with different predictors (the RPN's query and objectness/deltas views)
    share the trunk computation; results are those of the whole tower, with autograd on or off."""
    tower = make_tower(out=(6, 4, 1), seed=7)
    views = [SimpleNamespace(subnet=tower.subnet, predictors=[tower.predictors[0], tower.predictors[1]]),
             SimpleNamespace(subnet=tower.subnet, predictors=[tower.predictors[2]])]
    feats = torch.randn(2, 8, 16, 16)
    children = query_children(torch.tensor([[0, 2, 3], [1, 5, 5]]), (2, 16, 16))
    active = build_active_set(children, (2, 16, 16), 5)
    x = gather_sites(feats, active.indices)
    ref = [at(r, children) for r in masked_dense_tower(tower, feats, active.mask())]
    trunk_counts = []
    stacked = sparse_conv._stacked_trunk
    monkeypatch.setattr(sparse_conv, "_stacked_trunk",
                        lambda group, *a, **k: trunk_counts.append(len(group)) or stacked(group, *a, **k))
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            (obj, dl), (query,) = sparse_towers(views, x, active)
        for g, r in zip((obj, dl, query), ref):
            torch.testing.assert_close(g.detach(), r, atol=ATOL, rtol=RTOL)
    assert trunk_counts == [1]    # the stacked (inference) path ran one trunk for both views


def test_stacked_weight_cache_is_per_group_and_follows_updates():
    """Groups sharing a first tower (QueryDet: 3 towers on P3, 2 on P2) each keep their stacked
    weights; an in-place weight update invalidates them."""
    towers = [make_tower(out=(3,), seed=s) for s in (1, 2, 3)]
    feats = torch.randn(1, 8, 12, 12)
    active = build_active_set(torch.tensor([[0, 5, 5], [0, 6, 9]]), (1, 12, 12), 5)
    x = gather_sites(feats, active.indices)

    def check(group):
        with torch.no_grad():
            got = sparse_towers(group, x, active)
        for tower, outs in zip(group, got):
            torch.testing.assert_close(outs[0], sparse_tower(tower, x, active)[0], atol=ATOL, rtol=RTOL)

    for _ in range(2):
        check(towers)
        check(towers[:2])
    with torch.no_grad():
        towers[1].subnet[2].weight.mul_(-1.0)
    check(towers)
    check(towers[:2])
