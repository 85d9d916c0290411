"""TSP-RCNN's positional encoding of proposal boxes (spec §3.5 step 3).

Code (``box8``): each proposal is normalised by the un-padded image size (W, H) to the 8 numbers
``(cx/W, cy/H, w/W, h/H, x0/W, y0/H, x1/W, y1/H)``, each is multiplied by 2 pi and encoded with the
interleaved sine helper of spec §1.5 in d/8 dims (64 for d = 512), and the 8 encodings are
concatenated in that order. Paper (``box4``): ``[PE(cx) : PE(cy) : PE(w) : PE(h)]`` on [0, 1] values
without the 2 pi, d/4 dims each.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ...layers.position_encoding import sine_encoding


def normalized_box_numbers(boxes: Tensor, image_sizes: Tensor, mode: str = "box8") -> Tensor:
    """(..., 4) xyxy pixel boxes and (..., 2) matching (H, W) -> (..., 8) or (..., 4) numbers in [0, 1]."""
    height, width = image_sizes[..., 0].to(boxes.dtype), image_sizes[..., 1].to(boxes.dtype)
    x0, y0, x1, y1 = boxes.unbind(-1)
    w, h = x1 - x0, y1 - y0
    numbers = [(x0 + 0.5 * w) / width, (y0 + 0.5 * h) / height, w / width, h / height]
    if mode == "box8":
        numbers += [x0 / width, y0 / height, x1 / width, y1 / height]
    return torch.stack(numbers, dim=-1)


def box_position_encoding(boxes: Tensor, image_sizes: Tensor, dims: int, mode: str = "box8") -> Tensor:
    """Sine encoding of proposal boxes.

    Args:
        boxes: (B, S, 4) xyxy in pixels of the resized (un-padded) image; padded slots may hold zeros.
        image_sizes: (B, 2) un-padded (H, W) of each image.
        dims: output width d (512), split evenly over the 8 (``box8``) or 4 (``box4``) numbers.
        mode: ``box8`` (code) or ``box4`` (paper).

    Returns:
        (B, S, d): per number, ``dims / n`` interleaved sin/cos dims, concatenated in number order.
    """
    numbers = normalized_box_numbers(boxes, image_sizes[:, None, :].expand(*boxes.shape[:-1], 2), mode)
    if mode == "box8":
        numbers = numbers * (2 * math.pi)
    per_number = dims // numbers.shape[-1]
    return torch.cat([sine_encoding(numbers[..., i], per_number) for i in range(numbers.shape[-1])], dim=-1)
