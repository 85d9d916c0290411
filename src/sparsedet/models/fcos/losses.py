"""FCOS losses with QueryDet's per-level weights beta_l (spec §5.1).

With P = the number of positive points in the batch (all levels), and beta_l the level weight:
* ``loss_cls``  = sum_l beta_l * sum_{points of l} focal(cls logits, one-hot class) / max(1, P);
* ``loss_box_reg`` = sum_l beta_l * sum_{positives of l} c* . L_box(pred ltrb, target ltrb)
  / max(eps, sum of c* over all positives), c* the centerness target (FCOS: the box loss is weighted by
  centerness so that off-centre positives count less); L_box = GIoU loss or -log IoU;
* ``loss_centerness`` = sum_l beta_l * sum_{positives of l} BCE(ctr logit, c*) / max(1, P).
beta_l = 1 everywhere is exactly AdelaiDet's FCOS (one GPU; it all-reduces P across GPUs).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss

from ...layers.focal_loss import fused_sigmoid_focal_loss

from .targets import centerness_targets


def ltrb_to_boxes(ltrb: Tensor) -> Tensor:
    """(n, 4) distances -> (n, 4) xyxy boxes around the origin (the point): (-l, -t, r, b)."""
    return torch.stack((-ltrb[:, 0], -ltrb[:, 1], ltrb[:, 2], ltrb[:, 3]), dim=1)


def box_loss(pred_ltrb: Tensor, target_ltrb: Tensor, kind: str = "giou") -> Tensor:
    """(n,) per-positive box loss between ltrb distances of the same points: ``giou`` = 1 - GIoU
    (torchvision), ``iou`` = -log(IoU) (FCOS paper / UnitBox)."""
    pred, target = ltrb_to_boxes(pred_ltrb.float()), ltrb_to_boxes(target_ltrb.float())
    if kind == "giou":
        return generalized_box_iou_loss(pred, target, reduction="none", eps=1e-7)
    if kind != "iou":
        raise ValueError(f"box loss must be 'giou' or 'iou', got {kind!r}")
    # Both boxes contain the point, so the intersection is the per-side minimum.
    inter = (torch.minimum(pred_ltrb[:, 0], target_ltrb[:, 0]) + torch.minimum(pred_ltrb[:, 2], target_ltrb[:, 2])) * \
            (torch.minimum(pred_ltrb[:, 1], target_ltrb[:, 1]) + torch.minimum(pred_ltrb[:, 3], target_ltrb[:, 3]))
    area_p = (pred_ltrb[:, 0] + pred_ltrb[:, 2]) * (pred_ltrb[:, 1] + pred_ltrb[:, 3])
    area_t = (target_ltrb[:, 0] + target_ltrb[:, 2]) * (target_ltrb[:, 1] + target_ltrb[:, 3])
    iou = inter / (area_p + area_t - inter).clamp(min=1e-7)
    return -iou.clamp(min=1e-7).log()


def fcos_losses(logits: Sequence[Tensor], ltrb: Sequence[Tensor], centerness: Sequence[Tensor],
                gt_classes: Sequence[Tensor], gt_ltrb: Sequence[Tensor], level_weights: Sequence[float],
                focal_alpha: float = 0.25, focal_gamma: float = 2.0, box_loss_kind: str = "giou") -> dict[str, Tensor]:
    """FCOS losses (module docstring).

    Args (one entry per level, R_l = points of level l over the whole batch):
        logits: (R_l, K); ltrb: (R_l, 4) predicted distances in pixels; centerness: (R_l,) logits.
        gt_classes: (R_l,) int64, K = background; gt_ltrb: (R_l, 4) target distances (read at positives).
        level_weights: beta_l.

    Returns:
        ``{"loss_cls", "loss_box_reg", "loss_centerness"}`` fp32 scalars.
    """
    if not (len(logits) == len(ltrb) == len(centerness) == len(gt_classes) == len(gt_ltrb) == len(level_weights)):
        raise ValueError("every argument needs one entry per level")
    num_classes = logits[0].shape[-1]
    positives = [(c >= 0) & (c < num_classes) for c in gt_classes]
    num_pos = max(1.0, float(sum(int(p.sum()) for p in positives)))
    ctr_targets = [centerness_targets(t[p].float()) for t, p in zip(gt_ltrb, positives)]
    ctr_norm = max(1e-6, float(sum(float(c.sum()) for c in ctr_targets)))
    loss_cls = logits[0].new_zeros((), dtype=torch.float32)
    loss_box = loss_cls.clone()
    loss_ctr = loss_cls.clone()
    for lg, pred, ctr, classes, target, pos, ctr_t, beta in zip(
            logits, ltrb, centerness, gt_classes, gt_ltrb, positives, ctr_targets, level_weights):
        # Labels as they are: K = background (all-zero targets).
        loss_cls = loss_cls + beta * fused_sigmoid_focal_loss(lg, classes, focal_alpha, focal_gamma, "sum")
        if bool(pos.any()):
            loss_box = loss_box + beta * (ctr_t * box_loss(pred[pos], target[pos].float(), box_loss_kind)).sum()
            loss_ctr = loss_ctr + beta * F.binary_cross_entropy_with_logits(ctr[pos].float(), ctr_t, reduction="sum")
        else:
            # Keep every prediction in the graph (a zero that still has a gradient path).
            loss_box = loss_box + 0.0 * pred.sum()
            loss_ctr = loss_ctr + 0.0 * ctr.sum()
    return {"loss_cls": loss_cls / num_pos, "loss_box_reg": loss_box / ctr_norm,
            "loss_centerness": loss_ctr / num_pos}
