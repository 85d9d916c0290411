"""ASAG losses: Query Weighting, area weights, matching vs brute force, set and anchor losses on hand cases."""
from __future__ import annotations

import itertools
import math

import torch

from sparsedet.models.asag.anchor_generator import PatchPredictions
from sparsedet.models.asag.anchor_loss import anchor_losses, single_patch_losses
from sparsedet.models.asag.config import ASAGLossConfig
from sparsedet.models.asag.matching import hungarian_match, matching_cost
from sparsedet.models.asag.query_weighting import (area_weight, negative_probability, negative_weight,
                                                   normalized_product, positive_weight)
from sparsedet.models.asag.set_loss import set_losses

CFG = ASAGLossConfig()


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def bce(x: float, t: float) -> float:
    return -(t * math.log(sig(x)) + (1 - t) * math.log(1 - sig(x)))


def iou(a, b) -> float:
    """cxcywh boxes."""
    ax1, ay1, ax2, ay2 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx1, by1, bx2, by2 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0, min(ax2, bx2) - max(ax1, bx1)) * max(0, min(ay2, by2) - max(ay1, by1))
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def norm(x1: float, x2: float) -> float:
    return sig((x1 * x2 - 1 / 3) * 4.5) / sig(3.0)


def test_query_weighting_ranges_and_values():
    t = torch.tensor
    assert math.isclose(positive_weight(t([0.0]), t([0.0])).item(), sig(-1.5) / sig(3), rel_tol=1e-5)
    assert math.isclose(positive_weight(t([1.0]), t([1.0])).item(), 1.0, rel_tol=1e-6)
    assert math.isclose(negative_weight(t([1.0]), t([0.0])).item(), 1 - sig(-1.5) / sig(3), rel_tol=1e-5)
    assert abs(negative_weight(t([0.0]), t([0.7])).item()) < 1e-6
    assert abs(negative_weight(t([0.9]), t([1.0])).item()) < 1e-6     # perfect box: no negative part
    assert negative_probability(t([0.5])).item() == 1.0 and negative_probability(t([1.0])).item() == 0.0
    grid = torch.linspace(0, 1, 21)
    s, u = torch.meshgrid(grid, grid, indexing="ij")
    w_pos, w_neg = positive_weight(s, u), negative_weight(s, u)
    assert w_pos.min() >= 0.1915 - 1e-4 and w_pos.max() <= 1 + 1e-6
    assert w_neg.min() >= -1e-6 and w_neg.max() <= 0.8085 + 1e-4
    s, u = 0.6, 0.5
    assert math.isclose(positive_weight(t([s]), t([u])).item(), norm(s ** 0.4, u ** 0.6), rel_tol=1e-5)
    p_neg = (4 / 3) * (1 - (u ** 0.6) ** 2)
    assert math.isclose(negative_weight(t([s]), t([u])).item(), norm(s ** 0.4, p_neg) - sig(-1.5) / sig(3), rel_tol=1e-5)
    assert math.isclose(normalized_product(t([1.0]), t([1.0])).item(), 1.0, rel_tol=1e-6)


def test_area_weight():
    boxes = torch.tensor([[0.5, 0.5, 0.0, 0.3], [0.5, 0.5, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    assert torch.allclose(area_weight(boxes), torch.tensor([4.0, 1.0, 2.5]))
    assert torch.allclose(area_weight(boxes, inverse=True), torch.tensor([1.0, 4.0, 2.5]))


def test_matching_equals_brute_force():
    g = torch.Generator().manual_seed(3)
    for trial in range(6):
        p, m = (4, 3) if trial % 2 else (3, 4)
        logits = torch.randn(p, 5, generator=g)
        boxes = torch.cat((torch.rand(p, 2, generator=g), torch.rand(p, 2, generator=g) * 0.5 + 0.05), 1)
        labels = torch.randint(0, 5, (m,), generator=g)
        targets = torch.cat((torch.rand(m, 2, generator=g), torch.rand(m, 2, generator=g) * 0.5 + 0.05), 1)
        weight = area_weight(targets)
        cost = matching_cost(logits, boxes, labels, targets, weight)
        rows, cols = hungarian_match(logits, boxes, labels, targets, weight)
        best = min(sum(cost[r, c].item() for r, c in zip(perm, range(m))) for perm in itertools.permutations(range(p), m)) \
            if p >= m else min(sum(cost[r, c].item() for r, c in zip(range(p), perm)) for perm in itertools.permutations(range(m), p))
        assert len(rows) == min(p, m)
        assert math.isclose(cost[rows, cols].sum().item(), best, rel_tol=1e-5)


def test_matching_cost_hand_value():
    logits = torch.tensor([[0.3]])
    box = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    tgt = torch.tensor([[0.55, 0.5, 0.2, 0.2]])
    p = sig(0.3)
    cls = 0.25 * (1 - p) ** 2 * -math.log(p) - 0.75 * p ** 2 * -math.log(1 - p)
    l1 = 0.05
    overlap = iou(box[0].tolist(), tgt[0].tolist())               # enclosing box = union here
    giou = overlap - (0.25 * 0.2 - (0.08 - 0.15 * 0.2)) / (0.25 * 0.2)
    a = 4 - 3 * 0.2
    expected = (2 * cls + 5 * l1 + 2 * -giou) * a
    got = matching_cost(logits, box, torch.tensor([0]), tgt, area_weight(tgt)).item()
    assert math.isclose(got, expected, rel_tol=1e-4)


def test_set_loss_hand_case():
    # one image, 3 queries (the last padded), 2 classes, 1 target of class 1
    logits = torch.tensor([[[-1.0, 2.0], [0.5, -0.5], [7.0, 7.0]]])
    boxes = torch.tensor([[[0.52, 0.5, 0.2, 0.3], [0.1, 0.1, 0.05, 0.05], [0.5, 0.5, 1.0, 1.0]]])
    valid = torch.tensor([[True, True, False]])
    tgt = [0.5, 0.5, 0.2, 0.3]
    targets = [{"labels": torch.tensor([1]), "boxes_cxcywh": torch.tensor([tgt])}]
    losses = set_losses(logits, boxes, valid, targets, 1.0, CFG)

    s, u = sig(2.0), iou(boxes[0, 0].tolist(), tgt)
    w_pos = norm(s ** 0.4, u ** 0.6)
    p_neg = 1.0 if u ** 0.6 < 0.5 else (4 / 3) * (1 - u ** 1.2)
    w_neg = norm(s ** 0.4, p_neg) - sig(-1.5) / sig(3)
    a = 4 - 3 * math.sqrt(0.2 * 0.3)
    negatives = sum(bce(x, 0) * sig(x) ** 2 for x in (-1.0, 0.5, -0.5))
    ce = negatives + (w_pos * bce(2.0, 1) + w_neg * bce(2.0, 0)) * a
    assert math.isclose(losses["loss_ce"].item(), ce, rel_tol=1e-4)
    assert math.isclose(losses["loss_bbox"].item(), 0.02 * w_pos * a, rel_tol=1e-4)
    giou = u - 0                                                  # enclosing box = union
    assert math.isclose(losses["loss_giou"].item(), (1 - giou) * w_pos * a, rel_tol=1e-4)
    # padded queries never matter
    logits2, boxes2 = logits.clone(), boxes.clone()
    logits2[0, 2] = -3.0
    boxes2[0, 2] = torch.tensor([0.5, 0.5, 0.2, 0.3])            # a perfect padded box must not be matched
    again = set_losses(logits2, boxes2, valid, targets, 1.0, CFG)
    for key in losses:
        assert torch.allclose(losses[key], again[key])


def test_set_loss_without_targets_is_all_negative():
    logits = torch.tensor([[[0.0, 1.0]]])
    out = set_losses(logits, torch.tensor([[[0.5, 0.5, 0.1, 0.1]]]), torch.tensor([[True]]),
                     [{"labels": torch.zeros(0, dtype=torch.int64), "boxes_cxcywh": torch.zeros(0, 4)}], 1.0, CFG)
    assert math.isclose(out["loss_ce"].item(), bce(0.0, 0) * 0.25 + bce(1.0, 0) * sig(1.0) ** 2, rel_tol=1e-5)
    assert out["loss_bbox"].item() == 0 and out["loss_giou"].item() == 0


def test_anchor_patch_loss_hand_case():
    # anchor 0 near the target (matched), anchor 1 overlapping it by IoU >= 0.5 (ignored),
    # anchor 2 far away (negative)
    tgt = [0.5, 0.5, 0.4, 0.4]
    anchors = torch.tensor([[0.5, 0.5, 0.42, 0.4, 1.0], [0.52, 0.5, 0.4, 0.4, -2.0], [0.1, 0.1, 0.1, 0.1, 0.5]])
    out = single_patch_losses(anchors, torch.tensor([tgt]), CFG)
    u = iou(anchors[0, :4].tolist(), tgt)
    assert iou(anchors[1, :4].tolist(), tgt) >= 0.5
    a = 4 - 3 * 0.4
    qfl = bce(1.0, u) * abs(u - sig(1.0)) ** 2 * a
    ce = qfl + bce(0.5, 0) * sig(0.5) ** 2
    assert math.isclose(out[0].item(), ce, rel_tol=1e-4)
    w = norm(sig(1.0) ** 0.4, u ** 0.6)
    assert math.isclose(out[1].item(), 0.02 * w * a, rel_tol=1e-4)
    assert math.isclose(out[2].item(), (1 - u) * w * a, rel_tol=1e-4)   # enclosing box = union
    inverse = single_patch_losses(anchors, torch.tensor([tgt]), CFG, inverse_area=True)
    assert math.isclose(inverse[1].item(), 0.02 * w * (1 + 3 * 0.4), rel_tol=1e-4)


def test_anchor_losses_group_weights():
    """P6 + P5 + (P4 and P3) x 4 / n_patches, / n_box, then x (2, 1, 0.5) x lambda_an."""
    g = torch.Generator().manual_seed(0)

    def raw(n, k):
        return torch.cat((torch.rand(n, k, 4, generator=g) * 0.5 + 0.25, torch.randn(n, k, 1, generator=g)), -1)

    boxes = torch.tensor([[0.3, 0.3, 0.1, 0.1], [0.7, 0.6, 0.3, 0.2]])
    targets = [{"boxes_cxcywh": boxes}]
    none = torch.empty(0, dtype=torch.bool)
    empty = torch.empty(0, 2, dtype=torch.int64)
    patches = {"p6": PatchPredictions(raw(4, 5), empty, torch.zeros(4, dtype=torch.int64), none, 32),
               "p5": PatchPredictions(raw(4, 5), empty, torch.zeros(4, dtype=torch.int64), none, 32),
               "P4": PatchPredictions(raw(2, 3), torch.tensor([[0, 0], [10, 10]]), torch.zeros(2, dtype=torch.int64), none, 16),
               "P3": PatchPredictions(raw(1, 3), torch.tensor([[20, 10]]), torch.zeros(1, dtype=torch.int64), none, 8)}
    sizes = torch.tensor([[640.0, 480.0]])
    out = anchor_losses(patches, targets, sizes, 2.0, CFG)
    from sparsedet.models.asag.patches import fixed_patch_targets, flipped_p6_targets, probe_patch_targets
    total = sum(single_patch_losses(patches["p6"].anchors[i], flipped_p6_targets(boxes, i), CFG, True) for i in range(4))
    total = total + sum(single_patch_losses(patches["p5"].anchors[i], fixed_patch_targets(boxes, i), CFG) for i in range(4))
    probe = sum(single_patch_losses(patches[n].anchors[i], probe_patch_targets(boxes, patches[n].crops[i], patches[n].stride, sizes[0]), CFG)
                for n in ("P4", "P3") for i in range(len(patches[n].anchors)))
    total = (total + probe * 4 / 3) / 2.0
    assert torch.allclose(torch.stack([out["loss_ce_anchor"], out["loss_bbox_anchor"], out["loss_giou_anchor"]]),
                          total * torch.tensor([8.0, 4.0, 2.0]), rtol=1e-5)
