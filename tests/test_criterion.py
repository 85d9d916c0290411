"""Set criterion: focal / L1 / GIoU values against hand-written formulas, keys, normalisation."""
from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import generalized_box_iou

from sparsedet.models.criterion import SetCriterion, average_num_boxes
from sparsedet.models.matcher import HungarianMatcher

pytestmark = pytest.mark.usefixtures("single_thread")


class FixedMatcher:
    """Returns preset matches and records every call (one per supervised stage)."""

    def __init__(self, matches):
        self.matches = matches
        self.calls = 0

    def __call__(self, logits, boxes, targets):
        self.calls += 1
        return [(torch.tensor(p, dtype=torch.int64), torch.tensor(t, dtype=torch.int64)) for p, t in self.matches]


def focal_sum(logits: torch.Tensor, onehot: torch.Tensor, alpha=0.25, gamma=2.0) -> float:
    """Sigmoid focal loss summed over every entry, written out element by element in float64."""
    total = 0.0
    for x, t in zip(logits.double().flatten().tolist(), onehot.double().flatten().tolist()):
        p = 1 / (1 + math.exp(-x))
        ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
        p_t = p * t + (1 - p) * (1 - t)
        total += ce * (1 - p_t) ** gamma * (alpha * t + (1 - alpha) * (1 - t))
    return total


@pytest.fixture
def case():
    """B = 2, N = 4, C = 3. Image 0 (64x96) has 2 targets, image 1 (48x80) has 1."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, generator=g)
    boxes = torch.tensor([
        [[0.0, 0.0, 30.0, 30.0], [40.0, 10.0, 90.0, 60.0], [10.0, 20.0, 20.0, 40.0], [5.0, 5.0, 60.0, 50.0]],
        [[0.0, 0.0, 80.0, 48.0], [12.0, 6.0, 66.0, 38.0], [30.0, 30.0, 50.0, 45.0], [1.0, 2.0, 3.0, 4.0]],
    ])
    targets = [
        {"labels": torch.tensor([2, 0]), "boxes": torch.tensor([[42.0, 12.0, 88.0, 58.0], [2.0, 1.0, 28.0, 33.0]]),
         "image_size_whwh": torch.tensor([96.0, 64.0, 96.0, 64.0])},
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[10.0, 5.0, 70.0, 40.0]]),
         "image_size_whwh": torch.tensor([80.0, 48.0, 80.0, 48.0])},
    ]
    # pred 1 <-> target 0, pred 0 <-> target 1 in image 0; pred 1 <-> target 0 in image 1
    matches = [([1, 0], [0, 1]), ([1], [0])]
    return logits, boxes, targets, matches


def expected_losses(logits, boxes, targets, matches, num_boxes):
    onehot = torch.zeros_like(logits)
    l1 = giou = 0.0
    for b, (preds, tgts) in enumerate(matches):
        whwh = targets[b]["image_size_whwh"].double()
        for p, t in zip(preds, tgts):
            onehot[b, p, targets[b]["labels"][t]] = 1
            pb, tb = boxes[b, p].double(), targets[b]["boxes"][t].double()
            l1 += float((pb / whwh - tb / whwh).abs().sum())
            giou += 1 - float(generalized_box_iou(pb[None], tb[None])[0, 0])
    return {"loss_ce": focal_sum(logits, onehot) / num_boxes, "loss_bbox": l1 / num_boxes,
            "loss_giou": giou / num_boxes}


def test_stage_losses_match_hand_formulas(case):
    logits, boxes, targets, matches = case
    crit = SetCriterion(3, FixedMatcher(matches))
    got = crit.stage_losses({"pred_logits": logits, "pred_boxes": boxes}, targets, num_boxes=3.0)
    expected = expected_losses(logits, boxes, targets, matches, 3.0)
    for key, value in expected.items():
        assert got[key].item() == pytest.approx(value, rel=1e-5), key


def test_weights_multiplied_and_real_matcher_agrees(case):
    logits, boxes, targets, matches = case
    expected = expected_losses(logits, boxes, targets, matches, 3.0)
    # The matching above is the unambiguous Hungarian optimum (boxes overlap their targets):
    # with zero class cost, the real matcher must find it.
    for matcher in (FixedMatcher(matches), HungarianMatcher(cost_class=0.0, cost_bbox=5.0, cost_giou=2.0)):
        crit = SetCriterion(3, matcher, class_weight=3.0, l1_weight=7.0, giou_weight=0.5)
        got = crit([{"pred_logits": logits, "pred_boxes": boxes}], targets)
        assert set(got) == {"loss_ce", "loss_bbox", "loss_giou"}
        assert got["loss_ce"].item() == pytest.approx(3.0 * expected["loss_ce"], rel=1e-5)
        assert got["loss_bbox"].item() == pytest.approx(7.0 * expected["loss_bbox"], rel=1e-5)
        assert got["loss_giou"].item() == pytest.approx(0.5 * expected["loss_giou"], rel=1e-5)


def test_deep_supervision_keys_and_per_stage_matching(case):
    logits, boxes, targets, matches = case
    matcher = FixedMatcher(matches)
    crit = SetCriterion(3, matcher)
    stages = [{"pred_logits": logits + k, "pred_boxes": boxes + k} for k in range(3)]
    got = crit(stages, targets)
    assert list(got) == ["loss_ce_0", "loss_bbox_0", "loss_giou_0", "loss_ce_1", "loss_bbox_1", "loss_giou_1",
                         "loss_ce", "loss_bbox", "loss_giou"]
    assert matcher.calls == 3
    for k, suffix in enumerate(["_0", "_1", ""]):
        # every stage divides by the same num_boxes (3 targets)
        exp = expected_losses(logits + k, boxes + k, targets, matches, 3.0)
        assert got["loss_ce" + suffix].item() == pytest.approx(2.0 * exp["loss_ce"], rel=1e-5)
        assert got["loss_bbox" + suffix].item() == pytest.approx(5.0 * exp["loss_bbox"], rel=1e-5)
        assert got["loss_giou" + suffix].item() == pytest.approx(2.0 * exp["loss_giou"], rel=1e-5)
        assert got["loss_ce" + suffix].dim() == 0


def test_num_boxes_clamped_and_empty_targets_only_push_logits_down():
    logits = torch.randn(2, 4, 3, requires_grad=True)
    boxes = torch.rand(2, 4, 4).cumsum(-1).requires_grad_(True)
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4),
              "image_size_whwh": torch.tensor([32.0, 32.0, 32.0, 32.0])} for _ in range(2)]
    assert average_num_boxes(empty, torch.device("cpu")) == 1.0
    crit = SetCriterion(3, HungarianMatcher())
    got = crit([{"pred_logits": logits, "pred_boxes": boxes}], empty)
    # all-negative focal loss divided by 1
    assert got["loss_ce"].item() == pytest.approx(2.0 * focal_sum(logits.detach(), torch.zeros(2, 4, 3)), rel=1e-5)
    assert got["loss_bbox"].item() == 0.0 and got["loss_giou"].item() == 0.0
    sum(got.values()).backward()
    assert (logits.grad > 0).all()  # gradient descent lowers every logit
    assert boxes.grad is None or (boxes.grad == 0).all()


def test_num_boxes_counts_all_images(case):
    _, _, targets, _ = case
    assert average_num_boxes(targets, torch.device("cpu")) == 3.0
    targets = [targets[0], {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4),
                            "image_size_whwh": torch.tensor([8.0, 8.0, 8.0, 8.0])}]
    assert average_num_boxes(targets, torch.device("cpu")) == 2.0


def test_one_image_without_targets(case):
    logits, boxes, targets, _ = case
    targets = [targets[0], {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4),
                            "image_size_whwh": targets[1]["image_size_whwh"]}]
    matches = [([1, 0], [0, 1]), ([], [])]
    crit = SetCriterion(3, FixedMatcher(matches))
    got = crit.stage_losses({"pred_logits": logits, "pred_boxes": boxes}, targets, num_boxes=2.0)
    expected = expected_losses(logits, boxes, targets, matches, 2.0)
    for key, value in expected.items():
        assert got[key].item() == pytest.approx(value, rel=1e-5), key


def test_softmax_mode_with_no_object_weight(case):
    _, boxes, targets, matches = case
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 4, generator=g)  # C + 1
    crit = SetCriterion(3, FixedMatcher(matches), use_focal=False, no_object_weight=0.3)
    assert crit.empty_weight.tolist() == pytest.approx([1.0, 1.0, 1.0, 0.3])
    assert "empty_weight" not in crit.state_dict()
    got = crit.stage_losses({"pred_logits": logits, "pred_boxes": boxes}, targets, num_boxes=3.0)
    classes = [[3] * 4, [3] * 4]
    for b, (preds, tgts) in enumerate(matches):
        for p, t in zip(preds, tgts):
            classes[b][p] = int(targets[b]["labels"][t])
    num = den = 0.0
    for b in range(2):
        for i in range(4):
            w = 0.3 if classes[b][i] == 3 else 1.0
            num += -w * math.log(float(torch.softmax(logits[b, i].double(), 0)[classes[b][i]]))
            den += w
    assert got["loss_ce"].item() == pytest.approx(num / den, rel=1e-5)  # weighted mean, not / num_boxes
    # box terms are the same as in focal mode
    exp = expected_losses(torch.zeros(2, 4, 3), boxes, targets, matches, 3.0)
    assert got["loss_bbox"].item() == pytest.approx(exp["loss_bbox"], rel=1e-5)
    assert got["loss_giou"].item() == pytest.approx(exp["loss_giou"], rel=1e-5)
    # the focal-mode criterion has no such buffer
    assert not hasattr(SetCriterion(3, HungarianMatcher()), "empty_weight")


def test_gradients_flow(case):
    logits, boxes, targets, matches = case
    logits = logits.clone().requires_grad_(True)
    boxes = boxes.clone().requires_grad_(True)
    crit = SetCriterion(3, HungarianMatcher())
    loss = sum(crit([{"pred_logits": logits, "pred_boxes": boxes}], targets).values())
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert torch.isfinite(boxes.grad).all()
    # only matched predictions get a box gradient (one per target)
    assert int((boxes.grad.abs().sum(-1) > 0).sum()) == 3
