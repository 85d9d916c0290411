"""TSP-FCOS losses (tsp.md §2.7): FoI classifier, restricted-matching set classification,
centerness-weighted GIoU on every eligible FoI, centerness BCE.

Notation: E = the selected FoIs (after top-k and random keep) that FCOS assigned to a GT; avg(n) =
max(sum of n over processes / number of processes, 1), i.e. the batch-global count on one process.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import sigmoid_focal_loss

from ...layers.focal_loss import fused_sigmoid_focal_loss
from .restricted_matching import restricted_match


def process_average(value: Tensor) -> Tensor:
    """The mean of a scalar over processes (itself without ``torch.distributed``), no gradient."""
    value = value.detach().float().clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return value


def ltrb_giou(pred: Tensor, target: Tensor) -> Tensor:
    """(n,) GIoU of boxes given as (l, t, r, b) distances from the same point, with AdelaiDet's
    smoothing IoU = (I + 1) / (U + 1) in the boxes' own units (TSP: stride units)."""
    pl, pt, pr, pb = pred.unbind(-1)
    tl, tt, tr, tb = target.unbind(-1)
    pred_area = (pl + pr) * (pt + pb)
    target_area = (tl + tr) * (tt + tb)
    inter = (torch.minimum(pl, tl) + torch.minimum(pr, tr)) * (torch.minimum(pt, tt) + torch.minimum(pb, tb))
    enclose = (torch.maximum(pl, tl) + torch.maximum(pr, tr)) * (torch.maximum(pt, tt) + torch.maximum(pb, tb))
    union = pred_area + target_area - inter
    iou = (inter + 1.0) / (union + 1.0)
    return iou - (enclose - union) / enclose


def foi_classifier_loss(foi_logits: Tensor, location_labels: Tensor, focal_alpha: float = 0.25,
                        focal_gamma: float = 2.0) -> Tensor:
    """``loss_fcos_local_cls``: FCOS focal loss (sum) over every location's K logits (R, K) against the
    one-hot FCOS classes (R,) (K = background), / avg(#positive locations)."""
    num_classes = foi_logits.shape[1]
    num_pos = torch.clamp(process_average((location_labels < num_classes).sum()), min=1.0)
    return fused_sigmoid_focal_loss(foi_logits, location_labels, focal_alpha, focal_gamma, "sum") / num_pos


def tsp_fcos_losses(foi_logits: Tensor, location_labels: Tensor, logits: Tensor, ltrb: Tensor,
                    centerness: Tensor, labels: Tensor, target_ltrb: Tensor, target_centerness: Tensor,
                    gt_index: Tensor, num_gt: int, focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                    set_loss: str = "restricted", duplicate_weight: float = 0.1,
                    match_giou_weight: float = 2.0, class_normaliser: str = "mixed_2x") -> dict[str, Tensor]:
    """The four TSP-FCOS loss terms (weights 1).

    Args:
        foi_logits: (R, K) FoI-classifier logits of every location of every image (padding included).
        location_labels: (R,) FCOS class of every location, K = background.
        logits: (N, K) set-classifier logits of the selected FoIs of the batch (flattened).
        ltrb: (N, 4) predicted distances in stride units; centerness: (N,) logits.
        labels: (N,) FCOS class of each selected FoI (K = not eligible).
        target_ltrb: (N, 4) FCOS regression target in stride units; target_centerness: (N,).
        gt_index: (N,) batch-global GT index of each selected FoI, -1 when not eligible.
        num_gt: GTs in the batch.
        set_loss: ``restricted`` (each GT's best FoI is the one positive, other eligible FoIs are
            duplicates of weight ``duplicate_weight``) or ``none`` (every eligible FoI is a positive).

    Returns:
        ``loss_fcos_local_cls``, ``loss_fcos_cls``, ``loss_fcos_loc``, ``loss_fcos_ctr`` (fp32 scalars).
    """
    num_classes = foi_logits.shape[1]
    loss_local = foi_classifier_loss(foi_logits, location_labels, focal_alpha, focal_gamma)

    eligible = labels < num_classes
    rows = eligible.nonzero().squeeze(1)
    logits, ltrb = logits.float(), ltrb.float()
    giou = ltrb_giou(ltrb[rows], target_ltrb[rows].float())
    ctr_target = target_centerness[rows].float()

    # 3. Matching (no gradient): each GT takes the cheapest of its own eligible FoIs.
    target = torch.zeros_like(logits)
    weight = torch.ones_like(logits)
    if set_loss == "restricted":
        with torch.no_grad():
            prob = logits[rows, labels[rows]].sigmoid()
            cost = -prob * (ctr_target + 1e-6) + match_giou_weight * (1 - giou)
            match_in_rows = restricted_match(cost, gt_index[rows], num_gt)
        matched_rows = rows[match_in_rows[match_in_rows >= 0]]
        target[matched_rows, labels[matched_rows]] = 1.0
        duplicates = torch.ones_like(eligible)
        duplicates[matched_rows] = False
        duplicates &= eligible
        weight[duplicates.nonzero().squeeze(1), labels[duplicates]] = duplicate_weight
        num_matched = torch.clamp(process_average(matched_rows.new_tensor(matched_rows.numel())), min=1.0)
    else:
        target[rows, labels[rows]] = 1.0
        num_matched = torch.clamp(process_average(rows.new_tensor(rows.numel())), min=1.0)
    num_eligible = torch.clamp(process_average(rows.new_tensor(rows.numel())), min=1.0)

    # 4. Set classification: weighted focal sum / normaliser.
    focal = sigmoid_focal_loss(logits, target, focal_alpha, focal_gamma, "none")
    if set_loss == "restricted" and class_normaliser == "mixed_2x":
        denominator = 2 * (num_matched + duplicate_weight * num_eligible)
    else:
        denominator = num_matched
    loss_cls = (weight * focal).sum() / denominator

    # 5./6. Box and centerness losses on every eligible FoI. (Every process takes part in the
    # all-reduce, whether or not it has eligible FoIs.)
    ctr_sum = torch.clamp(process_average(ctr_target.sum()), min=1e-6)
    if rows.numel():
        loss_loc = (ctr_target * (1 - giou)).sum() / ctr_sum
        loss_ctr = F.binary_cross_entropy_with_logits(centerness[rows].float(), ctr_target, reduction="sum") / num_eligible
    else:
        loss_loc = 0.0 * ltrb.sum()
        loss_ctr = 0.0 * centerness.float().sum()
    return {"loss_fcos_local_cls": loss_local, "loss_fcos_cls": loss_cls,
            "loss_fcos_loc": loss_loc, "loss_fcos_ctr": loss_ctr}
