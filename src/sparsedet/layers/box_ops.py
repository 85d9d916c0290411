"""Box format conversions and overlap measures.

Boxes are ``(..., 4)`` tensors. ``xyxy`` = (x1, y1, x2, y2), ``cxcywh`` = (centre x, centre y,
width, height). Pairwise overlaps come from ``torchvision.ops``; this module only adds the
conversions and the element-wise (matched pairs) variant the set losses need.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou, generalized_box_iou, nms

__all__ = [
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "box_iou",
    "generalized_box_iou",
    "elementwise_generalized_box_iou",
    "image_size_whwh",
    "class_aware_nms",
]


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)


def elementwise_generalized_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """GIoU of matched pairs: ``boxes1[i]`` with ``boxes2[i]``. (K, 4), (K, 4) -> (K,).

    Equals the diagonal of ``generalized_box_iou(boxes1, boxes2)`` without building the K x K matrix.
    """
    x1 = torch.max(boxes1[:, 0], boxes2[:, 0])
    y1 = torch.max(boxes1[:, 1], boxes2[:, 1])
    x2 = torch.min(boxes1[:, 2], boxes2[:, 2])
    y2 = torch.min(boxes1[:, 3], boxes2[:, 3])
    inter = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    union = area1 + area2 - inter
    iou = inter / (union + eps)
    ex1 = torch.min(boxes1[:, 0], boxes2[:, 0])
    ey1 = torch.min(boxes1[:, 1], boxes2[:, 1])
    ex2 = torch.max(boxes1[:, 2], boxes2[:, 2])
    ey2 = torch.max(boxes1[:, 3], boxes2[:, 3])
    enclosing = (ex2 - ex1).clamp(min=0) * (ey2 - ey1).clamp(min=0)
    return iou - (enclosing - union) / (enclosing + eps)


def image_size_whwh(height: int, width: int, device=None, dtype=torch.float32) -> Tensor:
    """(W, H, W, H) of an image: the factor that normalises xyxy pixel boxes to [0, 1]."""
    return torch.tensor([width, height, width, height], dtype=dtype, device=device)


def class_aware_nms(boxes: Tensor, scores: Tensor, classes: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each class (``torchvision.ops.batched_nms`` semantics) in one ``nms`` call.

    Boxes of class c are shifted by c * (coordinate span + 1), so boxes of different classes never
    overlap. The shift is done in float64, where it is exact for float32 coordinates (24-bit
    mantissas plus offsets well below 2^28 fit in 53 bits), so every IoU is that of the original
    boxes. torchvision picks between a shift in the boxes' own dtype (small inputs; it rounds
    coordinates at large offsets and assumes non-negative ones) and a loop over the classes (large
    inputs: a handful of operators per class, ~80 x 8 GPU launches for COCO); this is neither.

    Args:
        boxes: (n, 4) xyxy; scores: (n,); classes: (n,) int64.

    Returns:
        (k,) int64 indices of the kept boxes, by decreasing score.
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    exact = boxes.double()
    span = exact.max() - exact.min() + 1.0
    shifted = exact + (classes.to(exact.dtype) * span).unsqueeze(1)
    return nms(shifted, scores.double(), iou_threshold)
