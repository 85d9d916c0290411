"""Hungarian matcher against brute force and hand-computed costs."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from torchvision.ops import generalized_box_iou

from sparsedet.models.matcher import HungarianMatcher, focal_class_cost

pytestmark = pytest.mark.usefixtures("single_thread")


def random_xyxy(n: int, width: float, height: float, g: torch.Generator) -> torch.Tensor:
    x1 = torch.rand(n, generator=g) * width * 0.7
    y1 = torch.rand(n, generator=g) * height * 0.7
    w = torch.rand(n, generator=g) * width * 0.5 + 2
    h = torch.rand(n, generator=g) * height * 0.5 + 2
    return torch.stack((x1, y1, x1 + w, y1 + h), dim=1)


def reference_cost(logits, boxes, whwh, labels, tgt_boxes, weights, class_cost, alpha=0.25, gamma=2.0):
    """Independent (N, M) cost for one image, in float64, written element by element."""
    w_class, w_bbox, w_giou = weights
    n, m = boxes.shape[0], tgt_boxes.shape[0]
    logits, boxes, tgt_boxes, whwh = logits.double(), boxes.double(), tgt_boxes.double(), whwh.double()
    giou = generalized_box_iou(boxes, tgt_boxes)
    cost = torch.zeros(n, m, dtype=torch.float64)
    for i in range(n):
        for j in range(m):
            c = int(labels[j])
            if class_cost == "focal":
                p = 1 / (1 + math.exp(-float(logits[i, c])))
                pos = alpha * (1 - p) ** gamma * -math.log(p + 1e-8)
                neg = (1 - alpha) * p ** gamma * -math.log(1 - p + 1e-8)
                cls = pos - neg
            else:
                cls = -float(torch.softmax(logits[i], 0)[c])
            l1 = float((boxes[i] / whwh - tgt_boxes[j] / whwh).abs().sum())
            cost[i, j] = w_class * cls + w_bbox * l1 - w_giou * float(giou[i, j])
    return cost


def brute_force_min(cost: torch.Tensor) -> float:
    n, m = cost.shape
    if n == 0 or m == 0:
        return 0.0
    if m <= n:
        return min(sum(float(cost[p[j], j]) for j in range(m)) for p in itertools.permutations(range(n), m))
    return min(sum(float(cost[i, p[i]]) for i in range(n)) for p in itertools.permutations(range(m), n))


def make_case(g, n, ms, sizes, num_classes):
    batch = len(ms)
    logits_dim = num_classes
    logits = torch.randn(batch, n, logits_dim, generator=g) * 2
    boxes = torch.stack([random_xyxy(n, w, h, g) for h, w in sizes])
    targets = []
    for m, (h, w) in zip(ms, sizes):
        targets.append({
            "labels": torch.randint(0, num_classes - 1 if logits_dim > num_classes - 1 else num_classes, (m,), generator=g),
            "boxes": random_xyxy(m, w, h, g),
            "image_size_whwh": torch.tensor([w, h, w, h], dtype=torch.float32),
        })
    return logits, boxes, targets


CASES = [
    # (N, per-image M, per-image (H, W))
    (6, [4], [(64, 96)]),
    (5, [3], [(100, 50)]),
    (6, [1], [(64, 64)]),
    (3, [4], [(64, 96)]),  # fewer predictions than targets
    (6, [4, 2], [(64, 96), (120, 40)]),
    (5, [0, 3], [(64, 96), (80, 80)]),
    (4, [3, 0], [(64, 96), (32, 200)]),
]


@pytest.mark.parametrize("class_cost", ["focal", "softmax"])
@pytest.mark.parametrize("weights", [(2.0, 5.0, 2.0), (1.0, 3.0, 0.5), (4.0, 0.0, 1.0)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matcher_is_optimal_against_brute_force(class_cost, weights, seed):
    g = torch.Generator().manual_seed(seed)
    for n, ms, sizes in CASES:
        num_classes = 4 if class_cost == "focal" else 5  # softmax: C + 1 logits, last = no object
        logits, boxes, targets = make_case(g, n, ms, sizes, num_classes)
        matcher = HungarianMatcher(*weights, class_cost=class_cost)
        matches = matcher(logits, boxes, targets)
        assert len(matches) == len(targets)
        for b, ((pred_idx, tgt_idx), target) in enumerate(zip(matches, targets)):
            m = len(target["labels"])
            assert pred_idx.dtype == torch.int64 and tgt_idx.dtype == torch.int64
            assert len(pred_idx) == len(tgt_idx) == min(n, m)
            assert len(set(pred_idx.tolist())) == len(pred_idx)
            assert len(set(tgt_idx.tolist())) == len(tgt_idx)
            cost = reference_cost(logits[b], boxes[b], target["image_size_whwh"], target["labels"],
                                  target["boxes"], weights, class_cost)
            got = sum(float(cost[i, j]) for i, j in zip(pred_idx.tolist(), tgt_idx.tolist()))
            assert got == pytest.approx(brute_force_min(cost), abs=1e-4), (n, ms, b)


def test_matcher_all_images_empty():
    g = torch.Generator().manual_seed(0)
    logits, boxes, targets = make_case(g, 5, [0, 0], [(64, 96), (80, 80)], 4)
    matches = HungarianMatcher()(logits, boxes, targets)
    assert len(matches) == 2
    for pred_idx, tgt_idx in matches:
        assert pred_idx.numel() == 0 and tgt_idx.numel() == 0
        assert pred_idx.dtype == torch.int64


def test_cost_matrix_matches_reference():
    g = torch.Generator().manual_seed(3)
    logits, boxes, targets = make_case(g, 6, [4], [(64, 96)], 4)
    t = targets[0]
    matcher = HungarianMatcher(1.5, 4.0, 3.0)
    got = matcher.cost_matrix(logits[0], boxes[0], t["image_size_whwh"].expand(6, 4), t["labels"],
                              t["boxes"], t["image_size_whwh"].expand(4, 4))
    assert got.dtype == torch.float32 and got.shape == (6, 4)
    expected = reference_cost(logits[0], boxes[0], t["image_size_whwh"], t["labels"], t["boxes"],
                              (1.5, 4.0, 3.0), "focal")
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_focal_class_cost_hand_values():
    logits = torch.tensor([[0.0, 2.0, -3.0], [1.0, -1.0, 4.0]])
    labels = torch.tensor([2, 0, 2, 1])
    got = focal_class_cost(logits, labels, alpha=0.25, gamma=2.0)
    assert got.shape == (2, 4)
    for i in range(2):
        for j, c in enumerate(labels.tolist()):
            p = 1 / (1 + math.exp(-logits[i, c].item()))
            expected = 0.25 * (1 - p) ** 2 * -math.log(p + 1e-8) - 0.75 * p ** 2 * -math.log(1 - p + 1e-8)
            assert got[i, j].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # other alpha / gamma
    got = focal_class_cost(logits, labels, alpha=0.5, gamma=1.0)
    p = 1 / (1 + math.exp(-4.0))
    assert got[1, 2].item() == pytest.approx(0.5 * (1 - p) * -math.log(p + 1e-8) - 0.5 * p * -math.log(1 - p + 1e-8), rel=1e-5)
    # a confident correct logit is cheaper than an uncertain one
    assert got[1, 0].item() < got[0, 0].item()


def test_l1_cost_normalises_each_side_by_its_own_image_size():
    matcher = HungarianMatcher(cost_class=0.0, cost_bbox=1.0, cost_giou=0.0)
    logits = torch.zeros(1, 3)
    pred = torch.tensor([[0.0, 0.0, 100.0, 50.0]])
    pred_whwh = torch.tensor([[200.0, 100.0, 200.0, 100.0]])  # -> (0, 0, 0.5, 0.5)
    tgt = torch.tensor([[0.0, 0.0, 20.0, 40.0]])
    tgt_whwh = torch.tensor([[40.0, 80.0, 40.0, 80.0]])  # -> (0, 0, 0.5, 0.5)
    cost = matcher.cost_matrix(logits, pred, pred_whwh, torch.tensor([0]), tgt, tgt_whwh)
    assert cost.item() == pytest.approx(0.0, abs=1e-7)
    # L1 in normalised xyxy (not cxcywh): shift x2 of the target by 4 px = 0.1 of its width
    tgt2 = torch.tensor([[0.0, 0.0, 24.0, 40.0]])
    cost = matcher.cost_matrix(logits, pred, pred_whwh, torch.tensor([0]), tgt2, tgt_whwh)
    assert cost.item() == pytest.approx(0.1, abs=1e-6)


def test_batched_matching_uses_each_images_size():
    """The same relative layout in two differently sized images gives the same assignment,
    and per-image blocks do not mix (target indices are per image)."""
    n = 4
    rel_pred = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.0, 0.5, 0.5, 1.0], [0.5, 0.0, 1.0, 0.5]])
    rel_tgt = torch.tensor([[0.5, 0.5, 0.95, 0.95], [0.02, 0.02, 0.5, 0.48]])
    sizes = [(64, 96), (300, 20)]
    boxes = torch.stack([rel_pred * torch.tensor([w, h, w, h]) for h, w in sizes])
    targets = [{"labels": torch.tensor([0, 1]), "boxes": rel_tgt * torch.tensor([w, h, w, h]),
                "image_size_whwh": torch.tensor([w, h, w, h], dtype=torch.float32)} for h, w in sizes]
    logits = torch.zeros(2, n, 3)
    matches = HungarianMatcher()(logits, boxes, targets)
    for pred_idx, tgt_idx in matches:
        pairs = dict(zip(tgt_idx.tolist(), pred_idx.tolist()))
        assert pairs == {0: 1, 1: 0}


def test_matcher_rejects_bad_class_cost_and_nan():
    with pytest.raises(ValueError, match="class_cost"):
        HungarianMatcher(class_cost="sigmoid")
    logits = torch.zeros(1, 3, 2)
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [float("nan"), 0.0, 5.0, 5.0], [1.0, 1.0, 4.0, 4.0]]])
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.0, 0.0, 8.0, 8.0]]),
                "image_size_whwh": torch.tensor([32.0, 32.0, 32.0, 32.0])}]
    with pytest.raises(FloatingPointError, match="not finite"):
        HungarianMatcher()(logits, boxes, targets)
