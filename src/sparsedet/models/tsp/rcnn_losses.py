"""TSP-RCNN's second-stage losses (spec §3.7) and the DETR-loss baseline (spec §3.10).

All functions take the proposals of a whole per-GPU batch concatenated image-major (N rows) with the
targets of ``rcnn_proposal_sampling.LabelledProposals`` and return ``{"loss_obj", "loss_box_reg"}``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ...layers.box_coder import BoxCoder
from ...layers.box_ops import elementwise_generalized_box_iou
from .rcnn_config import TSPRCNNLossConfig
from .rcnn_matching import hungarian_matching, restricted_matching


def class_deltas(deltas: Tensor, classes: Tensor) -> Tensor:
    """(N, 4) deltas of ``classes`` (N,) from class-specific (N, 4C) deltas; (N, 4) agnostic deltas
    pass through. Classes >= C (background) read class C - 1, whose value is then unused."""
    if deltas.shape[1] == 4:
        return deltas
    per_class = deltas.view(deltas.shape[0], -1, 4)
    rows = torch.arange(deltas.shape[0], device=deltas.device)
    return per_class[rows, classes.clamp(max=per_class.shape[1] - 1)]


def box_regression_loss(deltas: Tensor, proposals: Tensor, gt_classes: Tensor, gt_boxes: Tensor, num_classes: int,
                        box_coder: BoxCoder, l1_weight: float, giou_weight: float) -> Tensor:
    """[l1_weight * L1(deltas, target deltas) + giou_weight * sum(1 - GIoU(decoded box, GT box))] over
    every eligible proposal (IoU >= threshold, not only the matched ones), / N proposals.

    Args:
        deltas: (N, 4C) or (N, 4); proposals, gt_boxes: (N, 4) xyxy; gt_classes: (N,), C = background.
    """
    eligible = gt_classes < num_classes
    normalizer = max(deltas.shape[0], 1)
    if not bool(eligible.any()):
        return deltas.sum() * 0.0
    predicted = class_deltas(deltas[eligible], gt_classes[eligible])
    targets = box_coder.encode(proposals[eligible], gt_boxes[eligible])
    l1 = (predicted - targets).abs().sum()
    boxes = box_coder.decode(predicted, proposals[eligible])
    giou = (1.0 - elementwise_generalized_box_iou(boxes, gt_boxes[eligible])).sum()
    return (l1_weight * l1 + giou_weight * giou) / normalizer


@torch.no_grad()
def matching_cost(logits: Tensor, deltas: Tensor, proposals: Tensor, gt_classes: Tensor, gt_boxes: Tensor,
                  box_coder: BoxCoder, giou_weight: float) -> Tensor:
    """(N,) cost of each proposal against its own GT: -softmax(logits)[gt class] + w * (1 - GIoU(box of
    that class, GT box)). Meaningful for eligible rows only."""
    num_classes = logits.shape[1] - 1
    classes = gt_classes.clamp(max=num_classes - 1)
    probability = logits.float().softmax(dim=1).gather(1, classes[:, None]).squeeze(1)
    boxes = box_coder.decode(class_deltas(deltas.float(), classes), proposals.float())
    return -probability + giou_weight * (1.0 - elementwise_generalized_box_iou(boxes, gt_boxes.float()))


def set_classification_loss(logits: Tensor, gt_classes: Tensor, matched: Tensor, eos_coef: float,
                            focal_factor: float, focal_gamma: float) -> Tensor:
    """Softmax CE over C + 1 classes with per-sample weights (official ``loss_obj``):
    e = 1 (matched) / eos_coef (the rest), f = 1 (matched) / focal_factor * (1 - p_bg)^gamma (the rest,
    detached); loss = sum(e * f * CE) / (sum(e) + 1e-6). Target: GT class if matched, else background.
    A batch without any match gives 0 (official)."""
    num_classes = logits.shape[1] - 1
    if not bool(matched.any()):
        return logits.sum() * 0.0
    targets = torch.where(matched, gt_classes, torch.full_like(gt_classes, num_classes))
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    one = torch.ones_like(ce)
    sample_weight = torch.where(matched, one, one * eos_coef)
    if focal_factor > 0:
        background = logits.detach().float().softmax(dim=1)[:, num_classes]
        focal = torch.where(matched, one, focal_factor * (1.0 - background) ** focal_gamma)
    else:
        focal = one
    return (sample_weight * focal * ce).sum() / (sample_weight.sum() + 1e-6)


def tsp_losses(logits: Tensor, deltas: Tensor, proposals: Tensor, gt_classes: Tensor, gt_boxes: Tensor,
               gt_indices: Tensor, box_coder: BoxCoder, cfg: TSPRCNNLossConfig) -> tuple[dict[str, Tensor], Tensor]:
    """The official TSP-RCNN losses.

    Args:
        logits: (N, C + 1); deltas: (N, 4C) or (N, 4); proposals, gt_boxes: (N, 4); gt_classes: (N,);
        gt_indices: (N,) GT index made unique over the batch (image offset added), so that matching
            the whole batch at once equals matching each image.

    Returns:
        ``{"loss_obj", "loss_box_reg"}`` and the (N,) bool ``matched`` mask.
    """
    num_classes = logits.shape[1] - 1
    eligible = gt_classes < num_classes
    if cfg.set_prediction:
        cost = matching_cost(logits, deltas, proposals, gt_classes, gt_boxes, box_coder, cfg.match_giou_weight)
        matched = restricted_matching(cost, gt_indices, eligible)
        loss_obj = set_classification_loss(logits, gt_classes, matched, cfg.eos_coef, cfg.focal_factor,
                                           cfg.focal_gamma)
    else:
        # Paper table 2 "w/o set prediction loss": every eligible proposal is a positive.
        matched = eligible
        loss_obj = F.cross_entropy(logits.float(), gt_classes) if logits.shape[0] else logits.sum() * 0.0
    loss_box = box_regression_loss(deltas, proposals, gt_classes, gt_boxes, num_classes, box_coder,
                                   cfg.l1_weight, cfg.giou_weight)
    return {"loss_obj": loss_obj, "loss_box_reg": loss_box}, matched


def detr_losses(logits: Sequence[Tensor], deltas: Sequence[Tensor], proposals: Sequence[Tensor],
                targets: Sequence[dict], box_coder: BoxCoder, cfg: TSPRCNNLossConfig) -> dict[str, Tensor]:
    """The DETR-loss baseline (``USE_DETR_LOSS``): per image, Hungarian matching of all proposals to
    all GT boxes with cost -p[c] + detr_match_giou_weight * (-GIoU); losses ``loss_obj`` = weighted CE
    (no-object weight ``eos_coef``) x ``detr_class_weight`` and ``loss_box_reg`` = sum(1 - GIoU) over
    matched pairs / #GT x ``detr_giou_weight``.

    Args: per image, logits (S, C + 1), deltas (S, 4C) or (S, 4), proposals (S, 4) and the target dict
    (``boxes`` (M, 4), ``labels`` (M,)).
    """
    num_classes = logits[0].shape[1] - 1
    all_logits, all_targets, box_terms = [], [], []
    num_gt = 0
    for lg, dl, props, target in zip(logits, deltas, proposals, targets):
        gt_boxes = target["boxes"].to(props.device, torch.float32)
        gt_labels = target["labels"].to(props.device, torch.int64)
        classes = torch.full((lg.shape[0],), num_classes, dtype=torch.int64, device=lg.device)
        num_gt += gt_boxes.shape[0]
        if gt_boxes.shape[0] and lg.shape[0]:
            per_gt = dl.view(dl.shape[0], -1, 4)
            per_gt = per_gt[:, gt_labels] if per_gt.shape[1] > 1 else per_gt.expand(-1, gt_boxes.shape[0], -1)
            boxes = box_coder.decode(per_gt, props[:, None, :].expand_as(per_gt))          # (S, M, 4)
            flat_giou = elementwise_generalized_box_iou(boxes.reshape(-1, 4),
                                                        gt_boxes[None].expand_as(boxes).reshape(-1, 4))
            giou = flat_giou.view(boxes.shape[:2])                                        # (S, M)
            probability = lg.detach().float().softmax(dim=1)[:, gt_labels]                # (S, M)
            cost = -probability - cfg.detr_match_giou_weight * giou.detach()
            gt_rows, columns = hungarian_matching(cost.T)
            classes[columns] = gt_labels[gt_rows]
            box_terms.append((1.0 - giou[columns, gt_rows]).sum())
        all_logits.append(lg)
        all_targets.append(classes)
    class_weight = torch.ones(num_classes + 1, device=logits[0].device)
    class_weight[num_classes] = cfg.eos_coef
    loss_ce = F.cross_entropy(torch.cat(all_logits).float(), torch.cat(all_targets), weight=class_weight)
    loss_giou = (torch.stack(box_terms).sum() if box_terms else torch.cat(deltas).sum() * 0.0) / max(num_gt, 1)
    return {"loss_obj": cfg.detr_class_weight * loss_ce, "loss_box_reg": cfg.detr_giou_weight * loss_giou}
