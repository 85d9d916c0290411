"""Delta box coder (R-CNN parameterisation) with per-coordinate weights and an upper clamp."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor


class BoxCoder:
    """Encodes target boxes as deltas relative to reference boxes, and decodes them back.

    Deltas are ``(wx * dx / w, wy * dy / h, ww * log(w' / w), wh * log(h' / h))``. Decoding clamps
    the scale deltas from above at ``scale_clamp`` (there is no lower clamp), so predicted boxes
    always have positive width and height but are never clipped to the image.

    Sparse R-CNN uses ``weights=(2, 2, 1, 1)`` and ``scale_clamp=log(100000 / 16)``; detectron2's
    usual clamp is ``log(1000 / 16)``.
    """

    def __init__(self, weights: Sequence[float] = (2.0, 2.0, 1.0, 1.0),
                 scale_clamp: float = math.log(100000.0 / 16)):
        if len(weights) != 4:
            raise ValueError(f"BoxCoder weights must have 4 values, got {list(weights)}")
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = float(scale_clamp)

    def encode(self, reference: Tensor, target: Tensor) -> Tensor:
        """(..., 4) xyxy reference and target boxes -> (..., 4) deltas."""
        wx, wy, ww, wh = self.weights
        ref_w = reference[..., 2] - reference[..., 0]
        ref_h = reference[..., 3] - reference[..., 1]
        ref_cx = reference[..., 0] + 0.5 * ref_w
        ref_cy = reference[..., 1] + 0.5 * ref_h
        tgt_w = target[..., 2] - target[..., 0]
        tgt_h = target[..., 3] - target[..., 1]
        tgt_cx = target[..., 0] + 0.5 * tgt_w
        tgt_cy = target[..., 1] + 0.5 * tgt_h
        return torch.stack((
            wx * (tgt_cx - ref_cx) / ref_w,
            wy * (tgt_cy - ref_cy) / ref_h,
            ww * torch.log(tgt_w / ref_w),
            wh * torch.log(tgt_h / ref_h),
        ), dim=-1)

    def decode(self, deltas: Tensor, reference: Tensor) -> Tensor:
        """(..., 4) deltas and xyxy reference boxes -> (..., 4) xyxy boxes, in the deltas' dtype."""
        reference = reference.to(deltas.dtype)
        wx, wy, ww, wh = self.weights
        ref_w = reference[..., 2] - reference[..., 0]
        ref_h = reference[..., 3] - reference[..., 1]
        ref_cx = reference[..., 0] + 0.5 * ref_w
        ref_cy = reference[..., 1] + 0.5 * ref_h
        dx = deltas[..., 0] / wx
        dy = deltas[..., 1] / wy
        dw = (deltas[..., 2] / ww).clamp(max=self.scale_clamp)
        dh = (deltas[..., 3] / wh).clamp(max=self.scale_clamp)
        cx = dx * ref_w + ref_cx
        cy = dy * ref_h + ref_cy
        w = torch.exp(dw) * ref_w
        h = torch.exp(dh) * ref_h
        return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)

    def decode_cxcywh(self, deltas: Tensor, reference: Tensor) -> Tensor:
        """Same decoding on cxcywh boxes, any unit (e.g. normalized): (..., 4) deltas and cxcywh
        reference -> (..., 4) cxcywh. ASAG-S decodes normalized cxcywh boxes this way."""
        reference = reference.to(deltas.dtype)
        wx, wy, ww, wh = self.weights
        dx = deltas[..., 0] / wx
        dy = deltas[..., 1] / wy
        dw = (deltas[..., 2] / ww).clamp(max=self.scale_clamp)
        dh = (deltas[..., 3] / wh).clamp(max=self.scale_clamp)
        return torch.stack((
            dx * reference[..., 2] + reference[..., 0],
            dy * reference[..., 3] + reference[..., 1],
            torch.exp(dw) * reference[..., 2],
            torch.exp(dh) * reference[..., 3],
        ), dim=-1)
