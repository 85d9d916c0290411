"""Query-head training targets (spec §2.2): which positions of a level are near a small object."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def query_targets(boxes: Sequence[Tensor], height: int, width: int, stride: int, small_bound: float,
                  radius_mode: str = "code", radius_scale: float = 1.0) -> Tensor:
    """0/1 query targets of one level for a batch.

    Official rule (``radius_mode="code"``): an object is *small* iff ``0 <= sqrt(w * h) <
    small_bound`` (32 on P3, 64 on P4). Position (y, x) has centre ``((x + 0.5) * stride,
    (y + 0.5) * stride)`` in input pixels (offset 0.5, unlike the anchors' 0); it is positive iff
    its Euclidean distance d to the *nearest* small object's centre is ``< radius_scale *
    sqrt(area)`` of *that* object. ``radius_mode="paper"`` uses the level constant ``small_bound``
    (the paper's s_l) as the radius instead. Class labels do not matter.

    Args:
        boxes: per image, (M_i, 4) xyxy GT boxes in input (padded-batch) pixels.
        height, width: the level's feature-map size.
        stride: the level's stride.

    Returns:
        (B, height, width) float32 tensor of 0/1.
    """
    if radius_mode not in ("code", "paper"):
        raise ValueError(f"radius_mode must be 'code' or 'paper', got {radius_mode!r}")
    device = boxes[0].device if len(boxes) else torch.device("cpu")
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) * stride
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    centres = torch.stack((cx.reshape(-1), cy.reshape(-1)), dim=1)          # (H*W, 2)
    out = torch.zeros(len(boxes), height * width, dtype=torch.float32, device=device)
    for i, image_boxes in enumerate(boxes):
        image_boxes = image_boxes.to(device=device, dtype=torch.float32)
        size = ((image_boxes[:, 2] - image_boxes[:, 0]) * (image_boxes[:, 3] - image_boxes[:, 1])).clamp(min=0).sqrt()
        small = size < small_bound
        if not bool(small.any()):
            continue
        gt_centres = (image_boxes[small, :2] + image_boxes[small, 2:]) / 2          # (S, 2)
        radius = size[small] * radius_scale if radius_mode == "code" else \
            torch.full_like(size[small], small_bound * radius_scale)
        # Explicit differences, not torch.cdist: cdist may use a matmul formula that loses
        # precision, and the comparison below is a strict "<" on pixel distances.
        distance = (centres[:, None, :] - gt_centres[None, :, :]).pow(2).sum(-1).sqrt()  # (H*W, S)
        nearest_distance, nearest = distance.min(dim=1)
        out[i] = (nearest_distance < radius[nearest]).float()
    return out.view(len(boxes), height, width)
