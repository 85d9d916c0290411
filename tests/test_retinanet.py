"""RetinaNet and the shared dense-detector parts: IoU matcher, losses, post-processing, contract.

References are written from the definitions in spec §1.4-1.6 (loops, formulas), not from the code.
"""
from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import box_iou, nms

from sparsedet.config import ConfigError
from sparsedet.layers.box_coder import BoxCoder
from sparsedet.models import build_model
from sparsedet.models.dense import (ForegroundNormalizer, IoUMatcher, LevelOutputs, dense_detection_losses,
                                    postprocess_image)

from overfit_helpers import train_steps

TINY = {"name": "retinanet", "num_classes": 3, "backbone": {"depth": 18, "weights": None},
        "fpn": {"channels": 32}, "head": {"num_convs": 2}}


def tiny_retinanet(**model):
    return build_model({"model": {**TINY, **model}})


# --------------------------------------------------------------------------- matcher

def brute_force_match(iou, low, high, low_quality):
    """Loop over anchors: label by the best IoU, then promote each GT's best anchor(s)."""
    m, n = iou.shape
    labels, matches = [], []
    for j in range(n):
        column = [iou[i, j].item() for i in range(m)]
        best = max(column)
        matches.append(column.index(best))
        labels.append(0 if best < low else (-1 if best < high else 1))
    if low_quality:
        for i in range(m):
            top = max(iou[i, j].item() for j in range(n))
            for j in range(n):
                if top > 0 and iou[i, j].item() == top:
                    labels[j] = 1
    return torch.tensor(matches), torch.tensor(labels, dtype=torch.int8)


@pytest.mark.parametrize("low_quality", [True, False])
def test_iou_matcher_against_brute_force(low_quality):
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(60, 2, generator=g) * 80
    anchors = torch.cat((xy, xy + 10 + torch.rand(60, 2, generator=g) * 30), dim=1)
    gxy = torch.rand(4, 2, generator=g) * 80
    gt = torch.cat((gxy, gxy + 5 + torch.rand(4, 2, generator=g) * 30), dim=1)
    iou = box_iou(gt, anchors)
    matches, labels = IoUMatcher((0.4, 0.5), low_quality)(iou)
    ref_matches, ref_labels = brute_force_match(iou, 0.4, 0.5, low_quality)
    assert torch.equal(labels, ref_labels)
    assert torch.equal(matches, ref_matches)
    assert {-1, 0, 1} >= set(labels.tolist())


def test_iou_matcher_bands_and_promotion():
    # One GT, anchors with IoU 0.39 (bg), 0.45 (ignored), 0.5 (fg); a second GT only reaches 0.3.
    iou = torch.tensor([[0.39, 0.45, 0.50, 0.0], [0.0, 0.0, 0.1, 0.3]])
    matches, labels = IoUMatcher((0.4, 0.5), True)(iou)
    assert labels.tolist() == [0, -1, 1, 1]       # anchor 3 promoted as GT 1's best
    assert matches.tolist()[3] == 1
    _, labels = IoUMatcher((0.4, 0.5), False)(iou)
    assert labels.tolist() == [0, -1, 1, 0]
    # No GT: all background.
    matches, labels = IoUMatcher()(torch.zeros(0, 5))
    assert labels.tolist() == [0] * 5


# --------------------------------------------------------------------------- losses

def focal_reference(x, t, alpha=0.25, gamma=2.0):
    p = torch.sigmoid(x)
    pt = p * t + (1 - p) * (1 - t)
    ce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p))
    at = alpha * t + (1 - alpha) * (1 - t)
    return at * (1 - pt) ** gamma * ce


def smooth_l1_reference(d, beta):
    d = d.abs()
    return torch.where(d < beta, 0.5 * d ** 2 / beta, d - 0.5 * beta)


def test_dense_losses_match_formulas():
    g = torch.Generator().manual_seed(0)
    k = 4
    sizes = (12, 5)
    weights = (1.0, 2.5)
    logits = [torch.randn(n, k, generator=g, dtype=torch.float64) for n in sizes]
    deltas = [torch.randn(n, 4, generator=g, dtype=torch.float64) for n in sizes]
    targets = [torch.randn(n, 4, generator=g, dtype=torch.float64) for n in sizes]
    classes = [torch.tensor([0, 3, k, k, -1, 1, k, -1, 2, k, k, 0]), torch.tensor([k, 2, -1, k, 1])]
    normalizer = torch.tensor(7.0, dtype=torch.float64)
    out = dense_detection_losses(logits, deltas, classes, targets, weights, normalizer,
                                 0.25, 2.0, smooth_l1_beta=0.1)
    cls_ref = box_ref = 0.0
    for lg, dl, tg, cl, w in zip(logits, deltas, targets, classes, weights):
        for r in range(lg.shape[0]):
            c = cl[r].item()
            if c == -1:
                continue  # ignored anchors are out of the cls loss
            onehot = torch.zeros(k, dtype=torch.float64)
            if c < k:
                onehot[c] = 1
                box_ref += w * smooth_l1_reference(dl[r] - tg[r], 0.1).sum().item()
            cls_ref += w * focal_reference(lg[r], onehot).sum().item()
    assert out["loss_cls"].item() == pytest.approx(cls_ref / 7.0, rel=1e-5)
    assert out["loss_box_reg"].item() == pytest.approx(box_ref / 7.0, rel=1e-5)


def test_level_weight_scales_only_its_level():
    g = torch.Generator().manual_seed(1)
    logits = [torch.randn(6, 2, generator=g) for _ in range(2)]
    deltas = [torch.randn(6, 4, generator=g) for _ in range(2)]
    targets = [torch.randn(6, 4, generator=g) for _ in range(2)]
    classes = [torch.tensor([0, 1, 2, 2, 0, 2])] * 2
    one = torch.tensor(1.0)
    base = dense_detection_losses(logits, deltas, classes, targets, (1.0, 1.0), one)
    only0 = dense_detection_losses(logits[:1], deltas[:1], classes[:1], targets[:1], (1.0,), one)
    scaled = dense_detection_losses(logits, deltas, classes, targets, (1.0, 3.0), one)
    for key in ("loss_cls", "loss_box_reg"):
        level1 = base[key] - only0[key]
        torch.testing.assert_close(scaled[key], only0[key] + 3.0 * level1)


def test_normalizer_ema_updates_before_use():
    ema = ForegroundNormalizer(100.0, 0.9)
    assert ema.update(20).item() == pytest.approx(92.0)        # 0.9 * 100 + 0.1 * 20
    assert ema.update(torch.tensor(0)).item() == pytest.approx(82.8)
    small = ForegroundNormalizer(0.5, 0.9)
    assert small.update(0).item() == 1.0                         # max(1, N)
    assert "value" not in ema.state_dict()


# --------------------------------------------------------------------------- post-processing

def reference_postprocess(levels, coder, topk, thresh, nms_thr, max_det, size):
    boxes, scores, labels = [], [], []
    for logits, deltas, anchors in levels:
        k = logits.shape[1]
        cands = [(torch.sigmoid(logits[r, c]).item(), r, c) for r in range(logits.shape[0]) for c in range(k)]
        cands.sort(key=lambda t: -t[0])
        for s, r, c in cands[:min(topk, logits.shape[0])]:
            if s > thresh:
                boxes.append(coder.decode(deltas[r], anchors[r]))
                scores.append(s)
                labels.append(c)
    boxes, scores, labels = torch.stack(boxes), torch.tensor(scores), torch.tensor(labels)
    keep = []
    for c in labels.unique():   # class-aware NMS = NMS per class
        idx = (labels == c).nonzero().flatten()
        keep += idx[nms(boxes[idx], scores[idx], nms_thr)].tolist()
    keep = sorted(keep, key=lambda i: -scores[i].item())[:max_det]
    h, w = size
    b = boxes[keep]
    b = torch.stack((b[:, 0].clamp(0, w), b[:, 1].clamp(0, h), b[:, 2].clamp(0, w), b[:, 3].clamp(0, h)), 1)
    ok = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    return b[ok], scores[keep][ok], labels[keep][ok]


def test_postprocess_against_reference():
    g = torch.Generator().manual_seed(0)
    coder = BoxCoder((1, 1, 1, 1), math.log(1000 / 16))
    levels = []
    for n in (30, 8):   # level 1 has fewer rows than topk: cap = #rows, not #rows * K
        xy = torch.rand(n, 2, generator=g) * 50
        anchors = torch.cat((xy, xy + 8 + torch.rand(n, 2, generator=g) * 20), 1)
        levels.append(LevelOutputs(torch.randn(n, 3, generator=g) * 2, torch.randn(n, 4, generator=g) * 0.3, anchors))
    out = postprocess_image(levels, coder, topk_candidates=10, score_threshold=0.3, nms_threshold=0.5,
                            max_detections=12, image_size=(60, 64))
    boxes, scores, labels = reference_postprocess(levels, coder, 10, 0.3, 0.5, 12, (60, 64))
    torch.testing.assert_close(out["scores"], scores)
    torch.testing.assert_close(out["boxes"], boxes)
    assert torch.equal(out["labels"], labels)
    assert len(out["scores"]) <= 12


def test_postprocess_topk_cap_and_class_aware_nms():
    coder = BoxCoder((1, 1, 1, 1), math.log(1000 / 16))
    anchors = torch.tensor([[0.0, 0, 10, 10]] * 2)
    # Two identical boxes with different best classes survive NMS; same class, only one does.
    logits = torch.tensor([[5.0, -9.0], [-9.0, 4.0]])
    out = postprocess_image([LevelOutputs(logits, torch.zeros(2, 4), anchors)], coder, 1000, 0.05, 0.5, 100, (20, 20))
    assert sorted(out["labels"].tolist()) == [0, 1]
    logits = torch.tensor([[5.0, -9.0], [4.0, -9.0]])
    out = postprocess_image([LevelOutputs(logits, torch.zeros(2, 4), anchors)], coder, 1000, 0.05, 0.5, 100, (20, 20))
    assert out["labels"].tolist() == [0]
    # topk cap = min(topk, rows): 1 row with 2 classes above threshold keeps only 1 score.
    out = postprocess_image([LevelOutputs(torch.tensor([[5.0, 4.0]]), torch.zeros(1, 4), anchors[:1])],
                            coder, 1000, 0.05, 0.5, 100, (20, 20))
    assert out["scores"].numel() == 1
    # Empty level (e.g. a sparse level without queries) is fine.
    out = postprocess_image([LevelOutputs(torch.zeros(0, 2), torch.zeros(0, 4), torch.zeros(0, 4))],
                            coder, 1000, 0.05, 0.5, 100, (20, 20))
    assert out["boxes"].shape == (0, 4)


# --------------------------------------------------------------------------- model contract

def test_retinanet_train_and_eval_contract(images, targets, single_thread):
    model = tiny_retinanet(num_classes=5)
    assert model.levels == (3, 4, 5, 6, 7)
    cls_pred = model.head.cls_tower.predictors[0]
    assert cls_pred.out_channels == 9 * 5
    assert cls_pred.bias.detach().allclose(torch.full((45,), -math.log(99)))
    assert model.backbone.fpn.extra_blocks.p6.in_channels == 512      # P6 from C5
    targets[1] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}  # empty image
    losses = model(images, targets)
    assert set(losses) == {"loss_cls", "loss_box_reg"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.head.box_tower.subnet[0].weight.grad is not None
    model.eval()
    with torch.no_grad():
        out = model(images)
        out_orig = model(images, original_sizes=[(128, 192), (48, 80)])
    for det, (h, w) in zip(out, [(64, 96), (48, 80)]):
        assert set(det) == {"boxes", "scores", "labels"}
        k = det["scores"].shape[0]
        assert det["boxes"].shape == (k, 4) and det["labels"].shape == (k,) and k <= 200
        assert (det["boxes"][:, 2] <= w).all() and (det["boxes"][:, 3] <= h).all()
        assert (det["scores"] > 0.05).all() and (det["labels"] < 5).all()
    torch.testing.assert_close(out_orig[0]["boxes"], out[0]["boxes"] * 2)


def test_retinanet_config_errors():
    with pytest.raises(ConfigError, match="model.anchors.sizes"):
        tiny_retinanet(anchors={"sizes": [32, 64]})
    with pytest.raises(ConfigError, match="model.loss.level_loss_weights"):
        tiny_retinanet(loss={"level_loss_weights": [1.0, 2.0]})
    with pytest.raises(ConfigError, match="model.matcher.thresholds"):
        tiny_retinanet(matcher={"thresholds": [0.6, 0.5]})
    # RetinaNet has no query head: a csq section is an unknown key naming model.csq.
    with pytest.raises(ConfigError, match="model.csq"):
        tiny_retinanet(csq={"enabled": True})


def test_retinanet_overfits_two_images(single_thread):
    torch.manual_seed(0)
    # normalizer_init near the true foreground count: from 100 the EMA shrinks for ~30 steps and
    # the normalised loss would rise while the model is learning.
    model = tiny_retinanet(num_classes=2, backbone={"depth": 18, "weights": None, "freeze_at": 5},
                           loss={"normalizer_init": 10.0})
    images = [torch.rand(3, 64, 64) * 255, torch.rand(3, 64, 64) * 255]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 44.0]]), "labels": torch.tensor([0])},
               {"boxes": torch.tensor([[20.0, 16.0, 60.0, 60.0]]), "labels": torch.tensor([1])}]
    params = [p for p in model.parameters() if p.requires_grad]
    history = [sum(losses.values()) for losses in
               train_steps(model, images, targets, torch.optim.SGD(params, lr=0.01, momentum=0.9), 40)]
    assert history[-1] < 0.5 * history[0], history
