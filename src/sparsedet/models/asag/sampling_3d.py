"""AdaMixer's adaptive 3-D sampling (spec §3.2 step 2), pure PyTorch (``F.grid_sample``).

Every query predicts G x P sampling points around its box: (dx, dy) offsets scaled by the box
size and a dz offset of its scale ``z``. A point at scale z reads every pyramid level l (stride
4 * 2^l) with weight softmax_l(-(z - l)^2 / tau), so z acts as a continuous level index. Group g
of the points reads only channels ``64 g .. 64 g + 63`` (for d = 256, G = 4).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["make_sample_points", "level_weights", "sample_level", "sampling_3d"]


def make_sample_points(offsets: Tensor, xyzr: Tensor) -> Tensor:
    """Sampling points of each query.

    Args:
        offsets: (B, Q, N * 3) raw offsets, point-major (index ``n * 3 + (dx, dy, dz)``), where
            N = G * P and point ``n = g * P + p``.
        xyzr: (B, Q, 4) query boxes in stride-4 units.

    Returns:
        (B, Q, N, 3) points (x, y, z): ``xy = box centre + (dx, dy) * (w, h)``, ``z = z_box + dz``
        (x, y in stride-4 units, z = continuous level index).
    """
    batch, num_queries = offsets.shape[:2]
    offsets = offsets.view(batch, num_queries, offsets.shape[-1] // 3, 3)
    z = xyzr[..., 2:3]
    wh = 2.0 ** z * 2.0 ** torch.cat([-xyzr[..., 3:4], xyzr[..., 3:4]], dim=-1)     # (B, Q, 2)
    xy = xyzr[..., None, 0:2] + offsets[..., :2] * wh[..., None, :]
    return torch.cat([xy, z[..., None, :] + offsets[..., 2:3]], dim=-1)


def level_weights(z: Tensor, num_levels: int, tau: float = 2.0) -> Tensor:
    """(...,) continuous level index -> (..., num_levels) softmax over l of -(z - l)^2 / tau."""
    grid = torch.arange(num_levels, device=z.device, dtype=z.dtype)
    return torch.softmax(-((z[..., None] - grid) ** 2 / tau).abs(), dim=-1)


def sample_level(value: Tensor, points: Tensor, weights: Tensor, num_groups: int) -> Tensor:
    """Bilinear sampling of one level, grouped by channels.

    Args:
        value: (B, C, H, W) feature map.
        points: (B, Q, G * P, 2) coordinates normalized to [0, 1] of the map (x, y).
        weights: (B, Q, G * P) weight of this level for every point.
        num_groups: G; group g reads channels ``g * C / G .. (g + 1) * C / G - 1``.

    Returns:
        (B, Q, G, P, C / G) weighted samples (zeros outside the map, ``align_corners=False``).
    """
    batch, channels, height, width = value.shape
    num_queries, num_points = points.shape[1], points.shape[2] // num_groups
    grid = points.view(batch, num_queries, num_groups, num_points, 2).permute(0, 2, 1, 3, 4).flatten(0, 1)
    grid = grid * 2.0 - 1.0                                                      # (B*G, Q, P, 2)
    value = value.reshape(batch * num_groups, channels // num_groups, height, width)
    out = F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    weights = weights.view(batch, num_queries, num_groups, num_points).permute(0, 2, 1, 3).flatten(0, 1)
    out = out * weights.unsqueeze(1)                                             # (B*G, C/G, Q, P)
    return out.view(batch, num_groups, channels // num_groups, num_queries, num_points).permute(0, 3, 1, 4, 2)


def sampling_3d(points: Tensor, features: Sequence[Tensor], strides: Sequence[int], num_groups: int,
                tau: float = 2.0) -> Tensor:
    """Samples every point on every level and sums the levels with their weights.

    Args:
        points: (B, Q, G * P, 3) from :func:`make_sample_points` (x, y in units of ``strides[0]``).
        features: one (B, C, H_l, W_l) map per level (padded batch size).
        strides: pixel stride of each level (4, 8, 16, 32).
        num_groups: G.
        tau: level temperature (2).

    Returns:
        (B, Q, G, P, C / G).

    A pixel position ``u`` on level l is normalized by the padded map extent ``W_l * stride_l``,
    as the official code does.
    """
    xy = points[..., 0:2] * strides[0]
    weights = level_weights(points[..., 2], len(features), tau).unbind(-1)
    batch, num_queries, num_points = points.shape[:3]
    channels = features[0].shape[1]
    out = points.new_zeros(batch, num_queries, num_groups, num_points // num_groups, channels // num_groups)
    for value, stride, weight in zip(features, strides, weights):
        # stack, not new_tensor: an ONNX trace keeps the map's (dynamic) size instead of freezing it
        extent = torch.stack([torch.as_tensor(v, device=value.device) for v in (value.shape[3], value.shape[2])]).to(value.dtype) * stride
        out = out + sample_level(value, xy / extent, weight, num_groups)
    return out
