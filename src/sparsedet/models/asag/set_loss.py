"""Loss of ASAG's proposals and decoder heads (spec sections 2.3-2.5, "decoder heads and proposals").

Per output: Hungarian matching per image over its valid queries, then
* classification over every (query, class) entry: ``BCE(x, 0) sigmoid(x)^2``, except at the matched
  query's target class: ``[w_pos BCE(x, 1) + w_neg BCE(x, 0)] a``; padded queries contribute 0;
* L1 on normalised cxcywh and 1 - GIoU, both times ``w_pos a``;
every term divided by the number of ground-truth boxes. ``w_pos``/``w_neg`` are Query Weighting
(computed without gradient) and ``a`` the target's area weight.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ...layers.box_ops import box_cxcywh_to_xyxy, box_iou, elementwise_generalized_box_iou
from .config import ASAGLossConfig
from .matching import hungarian_match
from .query_weighting import area_weight, negative_weight, positive_weight


def match_outputs(logits: Tensor, boxes: Tensor, valid: Tensor, targets: Sequence[dict],
                  cfg: ASAGLossConfig) -> list[tuple[Tensor, Tensor]]:
    """Per image ``(query_index, target_index)``; only valid queries (at the front) are rows.

    Args:
        logits: (B, Q, C); boxes: (B, Q, 4) normalised cxcywh; valid: (B, Q) bool.
        targets: per image ``labels`` (M,) and ``boxes_cxcywh`` (M, 4) normalised.
    """
    matches = []
    for b, target in enumerate(targets):
        rows = int(valid[b].sum())
        weight = area_weight(target["boxes_cxcywh"], cfg.area_weight)
        matches.append(hungarian_match(logits[b, :rows], boxes[b, :rows], target["labels"], target["boxes_cxcywh"],
                                       weight, (cfg.class_weight, cfg.l1_weight, cfg.giou_weight),
                                       cfg.focal_alpha, cfg.focal_gamma))
    return matches


def set_losses(logits: Tensor, boxes: Tensor, valid: Tensor, targets: Sequence[dict], num_boxes: float,
               cfg: ASAGLossConfig) -> dict[str, Tensor]:
    """Unweighted ``loss_ce``, ``loss_bbox``, ``loss_giou`` of one output (proposals or a head).

    Args:
        logits: (B, Q, C); boxes: (B, Q, 4) normalised cxcywh; valid: (B, Q) bool.
        targets: per image ``labels`` (M,), ``boxes_cxcywh`` (M, 4) normalised.
        num_boxes: the shared normaliser (ground-truth boxes, averaged over processes, >= 1).
    """
    matches = match_outputs(logits, boxes, valid, targets, cfg)
    batch_index = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(matches)])
    query_index = torch.cat([q for q, _ in matches])
    labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, matches)])
    target_boxes = torch.cat([t["boxes_cxcywh"][j] for t, (_, j) in zip(targets, matches)]).to(boxes)
    matched_boxes = boxes[batch_index, query_index]
    matched_logits = logits[batch_index, query_index, labels]

    with torch.no_grad():
        weight = area_weight(target_boxes, cfg.area_weight)
        iou = box_iou(box_cxcywh_to_xyxy(matched_boxes), box_cxcywh_to_xyxy(target_boxes)).diagonal() \
            if len(target_boxes) else target_boxes.new_zeros(0)
        score = matched_logits.sigmoid()
        if cfg.query_weighting:
            w_pos = positive_weight(score, iou, cfg.gamma1, cfg.gamma2)
            w_neg = negative_weight(score, iou, cfg.gamma1, cfg.gamma2)
        else:
            w_pos, w_neg = torch.ones_like(score), torch.zeros_like(score)

    negative = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none") * logits.sigmoid() ** 2
    negative = negative * valid[..., None].to(negative)
    positive = (w_pos * F.binary_cross_entropy_with_logits(matched_logits, torch.ones_like(matched_logits), reduction="none")
                + w_neg * F.binary_cross_entropy_with_logits(matched_logits, torch.zeros_like(matched_logits), reduction="none")) * weight
    # Matched entries replace their negative term.
    loss_ce = (negative.sum() - negative[batch_index, query_index, labels].sum() + positive.sum()) / num_boxes
    loss_bbox = ((matched_boxes - target_boxes).abs().sum(-1) * w_pos * weight).sum() / num_boxes
    giou = elementwise_generalized_box_iou(box_cxcywh_to_xyxy(matched_boxes), box_cxcywh_to_xyxy(target_boxes))
    loss_giou = ((1 - giou) * w_pos * weight).sum() / num_boxes
    return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}
