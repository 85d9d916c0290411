"""TSP-FCOS positional encoding of feature-map locations (tsp.md §2.5).

Per level, DETR's normalised 2-D sine encoding of the cell's position inside the valid (un-padded)
part of the padded batch, y half first, each coordinate in (0, 2 pi], plus a learnable per-level
vector. Padding cells are encoded too (they can be selected as FoIs): right of the image in a valid
row x = 2 pi, in fully padded rows x = 0 (likewise for y).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ...layers.position_encoding import sine_encoding


def level_padding_masks(image_sizes: Sequence[tuple[int, int]], padded_size: tuple[int, int],
                        level_shapes: Sequence[tuple[int, int]], device=None) -> list[Tensor]:
    """Per level, a (B, H_l, W_l) bool mask, True = padding.

    The batch mask (True outside each image's (H, W)) is brought down with nearest interpolation
    step by step, as the official code does through its backbone: first to ((H+1)//2, (W+1)//2), then
    to the stride-4 shape, then to every level's shape in turn, each step from the previous mask.
    """
    height, width = padded_size
    mask = torch.ones(len(image_sizes), height, width, dtype=torch.bool, device=device)
    for i, (h, w) in enumerate(image_sizes):
        mask[i, :h, :w] = False
    half = ((height + 1) // 2, (width + 1) // 2)
    steps = [half, ((half[0] + 1) // 2, (half[1] + 1) // 2)]
    masks = []
    current = mask
    for shape in steps + [tuple(s) for s in level_shapes]:
        current = F.interpolate(current[None].float(), size=shape, mode="nearest")[0].bool()
        masks.append(current)
    return masks[len(steps):]


def normalized_positions(padding_mask: Tensor) -> Tensor:
    """(B, H, W) padding mask -> (B, H, W, 2) positions (y, x) in (0, 2 pi] (0 in fully padded lines).

    y = (1-based row index among the valid cells of the column) / (the column's valid count + 1e-6) *
    2 pi, x likewise along the row (DETR's ``normalize=True`` with scale 2 pi)."""
    valid = (~padding_mask).float()
    y = valid.cumsum(1)
    x = valid.cumsum(2)
    eps = 1e-6
    y = y / (y[:, -1:, :] + eps) * (2 * math.pi)
    x = x / (x[:, :, -1:] + eps) * (2 * math.pi)
    return torch.stack((y, x), dim=-1)


def location_encoding(positions: Tensor, level_index: Tensor, level_embedding: Tensor,
                      temperature: float = 10000.0) -> Tensor:
    """[sine(y, d/2), sine(x, d/2)] + level_embedding[level] for positions (..., 2) and levels (...).

    Returns (..., d). Computed only where needed (the selected FoIs) by the detector."""
    half = level_embedding.shape[1] // 2
    y, x = positions.unbind(-1)
    sines = torch.cat((sine_encoding(y, half, temperature), sine_encoding(x, half, temperature)), dim=-1)
    return sines + level_embedding[level_index]


def all_positions(padding_masks: Sequence[Tensor]) -> Tensor:
    """Per-level masks -> (B, sum H_l W_l, 2) positions in location order (level-major, row, column)."""
    return torch.cat([normalized_positions(mask).flatten(1, 2) for mask in padding_masks], dim=1)


def fcos_location_encoding(padding_masks: Sequence[Tensor], level_embedding: Tensor) -> Tensor:
    """The encoding of every location of every level (B, sum H_l W_l, d), in location order.

    Args:
        padding_masks: per level (B, H_l, W_l) bool (``level_padding_masks``).
        level_embedding: (num_levels, d) learnable vectors, one added to every cell of its level.
    """
    levels = torch.cat([torch.full((m.shape[1] * m.shape[2],), i, dtype=torch.int64, device=m.device)
                        for i, m in enumerate(padding_masks)])
    return location_encoding(all_positions(padding_masks), levels, level_embedding)
