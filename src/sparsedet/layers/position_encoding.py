"""Sine positional encoding of scalars (DETR / TSP, spec tsp.md §1.5).

For a value v already scaled to radians and F output dims with temperature T:

    freq_k = T ** (2 * floor(k / 2) / F),   e[k] = sin(v / freq_k) (k even), cos(v / freq_k) (k odd)

i.e. interleaved (sin, cos) pairs sharing one frequency. TSP-FCOS builds its 2-D map encoding
from it (F = 256 for y, then 256 for x), TSP-RCNN its 8-number box encoding (F = 64 each).
"""
from __future__ import annotations

import torch
from torch import Tensor


def sine_encoding(values: Tensor, dims: int, temperature: float = 10000.0) -> Tensor:
    """Encodes every element of ``values`` (any shape ``(...)``) into ``dims`` numbers.

    Returns:
        ``(..., dims)`` float tensor, interleaved sin/cos.
    """
    if dims % 2:
        raise ValueError(f"sine_encoding needs an even number of dims, got {dims}")
    # Computed as DETR does (float32 frequencies, pairs stacked then flattened) for parity.
    index = torch.arange(dims, dtype=torch.float32, device=values.device)
    freq = temperature ** (2 * torch.div(index, 2, rounding_mode="floor") / dims)
    angles = values.float()[..., None] / freq
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)
