"""Geometric transforms shared by training and inference."""
from __future__ import annotations

import torch
from torchvision.transforms.v2 import functional as TF


def shortest_edge_size(height: int, width: int, short_side: int, max_size: int) -> tuple[int, int]:
    """Output (H, W) of detectron2's ResizeShortestEdge: short side to ``short_side`` unless the
    long side would exceed ``max_size``, rounded to the nearest pixel."""
    scale = short_side / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def resize_shortest_edge(image: torch.Tensor, short_side: int, max_size: int) -> torch.Tensor:
    """Resizes a (3, H, W) image (bilinear, antialiased) to the test scale of a recipe."""
    size = shortest_edge_size(image.shape[-2], image.shape[-1], short_side, max_size)
    if size == tuple(image.shape[-2:]):
        return image
    return TF.resize(image, list(size), antialias=True)
