"""Average recall of class-agnostic box proposals, mmdet-style (``mmdet.core.eval_recalls``).

For each image and proposal budget N, ground-truth boxes are matched greedily one-to-one to the
first N proposals (repeatedly the globally best remaining IoU pair); recall at threshold t is the
share of all ground-truth boxes whose matched IoU is >= t, and AR@N is its mean over
t = 0.50, 0.55, ..., 0.95.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torchvision.ops import box_iou

IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


def greedy_matched_ious(ious: Tensor) -> Tensor:
    """(G, P) IoUs of one image -> (G,) IoU of each ground-truth box's greedy one-to-one match
    (0 when the proposals run out)."""
    ious = ious.clone()
    matched = torch.zeros(ious.shape[0])
    if ious.numel() == 0:
        return matched
    for j in range(ious.shape[0]):
        best_per_gt, best_box = ious.max(dim=1)
        gt = int(best_per_gt.argmax())
        matched[j] = best_per_gt[gt].clamp(min=0)
        ious[gt, :] = -1
        ious[:, best_box[gt]] = -1
    return matched


def average_recall(proposals: Sequence[Tensor], ground_truth: Sequence[Tensor],
                   budgets: Sequence[int] = (100, 300, 1000),
                   thresholds: Sequence[float] = IOU_THRESHOLDS) -> dict[int, float]:
    """AR@N for each budget N.

    Args:
        proposals: per image (P, 4) xyxy boxes, best first.
        ground_truth: per image (G, 4) xyxy boxes in the same pixels.

    Returns:
        ``{N: AR}`` in [0, 1] (0 when there is no ground truth at all).
    """
    total = sum(len(g) for g in ground_truth)
    result = {}
    for budget in budgets:
        matched = [greedy_matched_ious(box_iou(g.float(), p[:budget].float()))
                   for p, g in zip(proposals, ground_truth) if len(g)]
        matched = torch.cat(matched) if matched else torch.zeros(0)
        recalls = [(matched >= t).sum().item() / total if total else 0.0 for t in thresholds]
        result[int(budget)] = sum(recalls) / len(recalls)
    return result
