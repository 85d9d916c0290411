"""Query Weighting and area weights of ASAG's losses (spec sections 2.3-2.5).

All weights are constants for the optimiser: callers compute them under ``torch.no_grad()``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

# sigma(-1.5) / sigma(3): the smallest value of ``normalized_product``; subtracted from w_neg so
# that its minimum is exactly 0 (the official code; the paper writes sigma(-1.5)).
NORM_FLOOR = (1 / (1 + math.exp(1.5))) / (1 / (1 + math.exp(-3.0)))


def normalized_product(x1: Tensor, x2: Tensor) -> Tensor:
    """Norm(x1, x2) = sigma((x1 * x2 - 1/3) * 4.5) / sigma(3): maps [0, 1]^2 into [0.1915, 1]."""
    return torch.sigmoid((x1 * x2 - 1.0 / 3.0) * 4.5) / torch.sigmoid(torch.tensor(3.0, dtype=x1.dtype, device=x1.device))


def negative_probability(x: Tensor) -> Tensor:
    """P_neg(x) of DW (alpha 2): 1 below 0.5, then (4/3)(1 - x^2), so 1 at 0.5 and 0 at 1."""
    return torch.where(x < 0.5, torch.ones_like(x), (4.0 / 3.0) * (1 - x ** 2))


def positive_weight(score: Tensor, iou: Tensor, gamma1: float = 0.4, gamma2: float = 0.6) -> Tensor:
    """w_pos = Norm(score^gamma1, iou^gamma2) in [0.1915, 1]. (K,), (K,) -> (K,)."""
    return normalized_product(score.clamp(min=0) ** gamma1, iou.clamp(min=0) ** gamma2)


def negative_weight(score: Tensor, iou: Tensor, gamma1: float = 0.4, gamma2: float = 0.6) -> Tensor:
    """w_neg = Norm(score^gamma1, P_neg(iou^gamma2)) - sigma(-1.5)/sigma(3) in [0, 0.8085]."""
    return normalized_product(score.clamp(min=0) ** gamma1, negative_probability(iou.clamp(min=0) ** gamma2)) - NORM_FLOOR


def area_weight(boxes_cxcywh: Tensor, max_weight: float = 4.0, inverse: bool = False) -> Tensor:
    """Per-target weight from its normalised area: ``max - (max - 1) sqrt(w h)`` (small objects
    weigh up to ``max``), or ``1 + (max - 1) sqrt(w h)`` with ``inverse`` (the P6 anchors).
    (M, 4) -> (M,)."""
    root_area = (boxes_cxcywh[:, 2] * boxes_cxcywh[:, 3]).clamp(min=0).sqrt()
    if inverse:
        return 1 + (max_weight - 1) * root_area
    return max_weight - (max_weight - 1) * root_area
