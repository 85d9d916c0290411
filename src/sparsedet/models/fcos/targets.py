"""FCOS training targets: which GT each feature-map point regresses, its ltrb distances and centerness.

Conventions (AdelaiDet FCOS): position (y, x) of a level with stride s is the point
``(x * s + s // 2, y * s + s // 2)`` in padded-input pixels; points of a level are flattened row-major
(index y * W + x), the same order as the head's flattened outputs.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def level_points(height: int, width: int, stride: int, device=None) -> Tensor:
    """(height * width, 2) (x, y) pixel coordinates of a level's points, row-major."""
    ys = torch.arange(height, device=device, dtype=torch.float32) * stride + stride // 2
    xs = torch.arange(width, device=device, dtype=torch.float32) * stride + stride // 2
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), dim=1)


def points_at(ys: Tensor, xs: Tensor, stride: int) -> Tensor:
    """(n, 2) (x, y) points of positions (ys[i], xs[i]): the rows ``y * W + x`` of ``level_points``."""
    return torch.stack((xs.float() * stride + stride // 2, ys.float() * stride + stride // 2), dim=1)


def centerness_targets(ltrb: Tensor) -> Tensor:
    """(n, 4) positive ltrb distances -> (n,) sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))."""
    lr, tb = ltrb[:, [0, 2]], ltrb[:, [1, 3]]
    ratio = (lr.min(dim=1).values / lr.max(dim=1).values) * (tb.min(dim=1).values / tb.max(dim=1).values)
    return ratio.clamp(min=0).sqrt()


def fcos_targets(points: Sequence[Tensor], strides: Sequence[int], regression_ranges: Sequence[Sequence[float]],
                 boxes: Tensor, labels: Tensor, num_classes: int,
                 center_sampling_radius: float = 1.5) -> tuple[list[Tensor], list[Tensor]]:
    """FCOS assignment for one image, split per level (``fcos_assignment`` without the GT index)."""
    classes, ltrb, _ = fcos_assignment(points, strides, regression_ranges, boxes, labels, num_classes,
                                       center_sampling_radius)
    sizes = [p.shape[0] for p in points]
    return list(classes.split(sizes)), list(ltrb.split(sizes))


def fcos_assignment(points: Sequence[Tensor], strides: Sequence[int], regression_ranges: Sequence[Sequence[float]],
                    boxes: Tensor, labels: Tensor, num_classes: int,
                    center_sampling_radius: float = 1.5) -> tuple[Tensor, Tensor, Tensor]:
    """FCOS assignment for one image, all levels concatenated (R = sum of R_l points).

    A point is a *candidate* for GT g iff
      * it lies strictly inside g (all of l, t, r, b > 0), or, with ``center_sampling_radius`` r > 0,
        strictly inside g's centre region [cx - r*s, cx + r*s] x [cy - r*s, cy + r*s] clipped to g
        (s = the point's stride; AdelaiDet's ``get_sample_region``);
      * max(l, t, r, b) lies in its level's regression range [low, high] (inclusive, as AdelaiDet).
    A point with several candidates takes the GT of smallest area (ties: the lowest GT index); a point
    with none is background.

    Args:
        points: per level, (R_l, 2) (x, y) points (``level_points``).
        strides: per level, its stride.
        regression_ranges: per level, (low, high) in pixels.
        boxes: (M, 4) xyxy GT boxes; labels: (M,) int64 in [0, K).

    Returns:
        classes: (R,) int64: the GT's class, or ``num_classes`` for background.
        ltrb: (R, 4) float32 distances (l, t, r, b) in pixels to the assigned GT's sides
            (zeros for background).
        gt_index: (R,) int64: the assigned GT's row in ``boxes``, or -1 for background.
    """
    sizes = [p.shape[0] for p in points]
    device = points[0].device
    pts = torch.cat(points)                                                            # (R, 2)
    if boxes.shape[0] == 0:
        total = sum(sizes)
        return (torch.full((total,), num_classes, dtype=torch.int64, device=device),
                torch.zeros(total, 4, device=device), torch.full((total,), -1, dtype=torch.int64, device=device))
    boxes = boxes.to(device=device, dtype=torch.float32)
    stride = torch.cat([torch.full((n,), float(s), device=device) for n, s in zip(sizes, strides)])
    low = torch.cat([torch.full((n,), float(r[0]), device=device) for n, r in zip(sizes, regression_ranges)])
    high = torch.cat([torch.full((n,), float(r[1]), device=device) for n, r in zip(sizes, regression_ranges)])
    x, y = pts[:, 0:1], pts[:, 1:2]                                                    # (R, 1)
    ltrb = torch.stack((x - boxes[:, 0], y - boxes[:, 1], boxes[:, 2] - x, boxes[:, 3] - y), dim=2)  # (R, M, 4)
    if center_sampling_radius > 0:
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2                                     # (M, 2)
        r = stride[:, None] * center_sampling_radius                                   # (R, 1)
        x1 = torch.maximum(centre[:, 0] - r, boxes[:, 0])
        y1 = torch.maximum(centre[:, 1] - r, boxes[:, 1])
        x2 = torch.minimum(centre[:, 0] + r, boxes[:, 2])
        y2 = torch.minimum(centre[:, 1] + r, boxes[:, 3])
        inside = torch.stack((x - x1, y - y1, x2 - x, y2 - y), dim=2).min(dim=2).values > 0
    else:
        inside = ltrb.min(dim=2).values > 0
    max_side = ltrb.max(dim=2).values
    in_range = (max_side >= low[:, None]) & (max_side <= high[:, None])
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[None, :].expand(pts.shape[0], -1)
    area = torch.where(inside & in_range, area, torch.full_like(area, float("inf")))
    min_area, gt = area.min(dim=1)           # min returns the first index among ties
    background = torch.isinf(min_area)
    classes = labels.to(device=device, dtype=torch.int64)[gt]
    classes[background] = num_classes
    assigned = ltrb[torch.arange(pts.shape[0], device=device), gt]
    assigned[background] = 0.0
    gt = gt.masked_fill(background, -1)
    return classes, assigned, gt
