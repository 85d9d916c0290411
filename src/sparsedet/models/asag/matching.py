"""ASAG's one-to-one matching cost (spec section 2.3), solved with ``models.matcher``.

``C = (w_cls C_cls + w_l1 C_L1 + w_giou C_GIoU) * a_j``: focal class cost, L1 between cxcywh
vectors, minus GIoU, each target column scaled by its area weight ``a_j``.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import generalized_box_iou

from ...layers.box_ops import box_cxcywh_to_xyxy
from ..matcher import focal_class_cost, solve_assignment


def matching_cost(logits: Tensor, boxes: Tensor, labels: Tensor, target_boxes: Tensor, column_weight: Tensor,
                  weights: tuple[float, float, float] = (2.0, 5.0, 2.0), alpha: float = 0.25,
                  gamma: float = 2.0) -> Tensor:
    """Pairwise cost.

    Args:
        logits: (P, C) class logits (C = 1 for anchors: the location score).
        boxes: (P, 4) cxcywh; labels: (M,) target classes (zeros for anchors).
        target_boxes: (M, 4) cxcywh in the same units; column_weight: (M,) area weights.

    Returns:
        (P, M) cost.
    """
    class_cost = focal_class_cost(logits.float(), labels, alpha, gamma)
    l1_cost = torch.cdist(boxes.float(), target_boxes.float(), p=1)
    giou_cost = -generalized_box_iou(box_cxcywh_to_xyxy(boxes.float()), box_cxcywh_to_xyxy(target_boxes.float()))
    w_cls, w_l1, w_giou = weights
    return (w_cls * class_cost + w_l1 * l1_cost + w_giou * giou_cost) * column_weight[None, :]


@torch.no_grad()
def hungarian_match(logits: Tensor, boxes: Tensor, labels: Tensor, target_boxes: Tensor, column_weight: Tensor,
                    weights: tuple[float, float, float] = (2.0, 5.0, 2.0), alpha: float = 0.25,
                    gamma: float = 2.0) -> tuple[Tensor, Tensor]:
    """Optimal one-to-one pairs ``(pred_index, target_index)`` (min(P, M) of them)."""
    if len(logits) == 0 or len(target_boxes) == 0:
        empty = torch.empty(0, dtype=torch.int64, device=logits.device)
        return empty, empty
    return solve_assignment(matching_cost(logits, boxes, labels, target_boxes, column_weight, weights, alpha, gamma))
