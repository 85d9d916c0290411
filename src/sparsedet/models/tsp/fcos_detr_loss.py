"""The "DETR-like loss" baseline of TSP-FCOS (paper Fig. 6; official ``USE_DETR_LOSS``, tsp.md §3.10).

Instead of the restricted matching, every selected FoI may match any GT of its image: Hungarian
matching (scipy) with cost = -softmax([logits, 0])[class] + 5 (-GIoU), the appended zero logit
playing "no object". Losses: softmax cross-entropy over K + 1 with no-object weight 0.1 (weighted
mean, as DETR), 10 x (1 - GIoU) over the matched pairs and the centerness BCE of the matched FoIs
(target: the FoI location's centerness inside its matched GT box), both / avg(#GT boxes). The
spec leaves the normalisers of the last two open; DETR's "per GT box" is used. The FoI classifier
loss (``loss_fcos_local_cls``) is unchanged.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ...layers.box_ops import elementwise_generalized_box_iou, image_size_whwh
from ..criterion import average_num_boxes
from ..fcos.targets import centerness_targets
from ..matcher import HungarianMatcher


def tsp_fcos_detr_losses(logits: Tensor, boxes: Tensor, centerness: Tensor, points: Tensor, targets: Sequence[dict],
                         image_sizes: Sequence[tuple[int, int]], no_object_weight: float = 0.1,
                         match_giou_weight: float = 5.0, giou_weight: float = 10.0) -> dict[str, Tensor]:
    """
    Args:
        logits: (B, k, K) set-classifier logits; boxes: (B, k, 4) decoded xyxy pixels;
        centerness: (B, k) logits; points: (B, k, 2) (x, y) FoI locations in pixels.
        targets: per image ``boxes`` (M, 4) xyxy pixels and ``labels`` (M,).

    Returns:
        ``loss_fcos_cls``, ``loss_fcos_loc``, ``loss_fcos_ctr``.
    """
    batch, num_fois, num_classes = logits.shape
    logits = torch.cat((logits.float(), logits.new_zeros(batch, num_fois, 1, dtype=torch.float32)), dim=-1)
    device = logits.device
    matcher = HungarianMatcher(cost_class=1.0, cost_bbox=0.0, cost_giou=match_giou_weight, class_cost="softmax")
    match_targets = [{"labels": t["labels"], "boxes": t["boxes"].float(),
                      "image_size_whwh": image_size_whwh(h, w, device)} for t, (h, w) in zip(targets, image_sizes)]
    matches = matcher(logits.detach(), boxes.detach().float(), match_targets)
    image_index = torch.cat([torch.full((len(rows),), i, dtype=torch.int64) for i, (rows, _) in enumerate(matches)]).to(device)
    rows = torch.cat([rows for rows, _ in matches]).to(device)
    classes = torch.full((batch, num_fois), num_classes, dtype=torch.int64, device=device)
    matched_labels = torch.cat([t["labels"][cols.to(device)] for t, (_, cols) in zip(targets, matches)]).to(device)
    matched_boxes = torch.cat([t["boxes"][cols.to(device)] for t, (_, cols) in zip(targets, matches)]).float().to(device)
    classes[image_index, rows] = matched_labels
    weight = torch.ones(num_classes + 1, device=device)
    weight[-1] = no_object_weight
    loss_cls = F.cross_entropy(logits.flatten(0, 1), classes.flatten(), weight=weight)
    num_boxes = average_num_boxes(targets, device)
    if rows.numel():
        giou = elementwise_generalized_box_iou(boxes[image_index, rows].float(), matched_boxes)
        loss_loc = giou_weight * (1 - giou).sum() / num_boxes
        xy = points[image_index, rows].float()
        ltrb = torch.stack((xy[:, 0] - matched_boxes[:, 0], xy[:, 1] - matched_boxes[:, 1],
                            matched_boxes[:, 2] - xy[:, 0], matched_boxes[:, 3] - xy[:, 1]), dim=1).clamp(min=1e-6)
        ctr_target = centerness_targets(ltrb)
        loss_ctr = F.binary_cross_entropy_with_logits(centerness[image_index, rows].float(), ctr_target,
                                                      reduction="sum") / num_boxes
    else:
        loss_loc = 0.0 * boxes.float().sum()
        loss_ctr = 0.0 * centerness.float().sum()
    return {"loss_fcos_cls": loss_cls, "loss_fcos_loc": loss_loc, "loss_fcos_ctr": loss_ctr}
