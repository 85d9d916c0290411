"""Box parameterisations used by ASAG's heads (spec §1.5 steps 3-6, §3.2 step 6).

``xyzr`` (AdaMixer's box encoding) is expressed in **stride-4 units** (pixels / 4):

* ``x, y``: box centre;
* ``z = log2(sqrt(w * h))``: log2 of the geometric-mean side;
* ``r = log2(sqrt(h / w))``: log2 of the square root of the aspect ratio,

so that ``w = 2 ** (z - r)`` and ``h = 2 ** (z + r)``. The ``+ 1e-7`` terms and the order of the
operations follow the official code so that converted checkpoints give the same numbers.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ...layers.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh

__all__ = [
    "XYZR_STRIDE", "cxcywh_to_xyzr", "xyxy_to_xyzr", "xyzr_to_xyxy", "xyzr_to_normalized_cxcywh",
    "refine_xyzr", "sine_position_encoding", "image_whwh",
]

XYZR_STRIDE = 4
"""xyzr unit in pixels: the stride of the finest pyramid level P2."""


def xyxy_to_xyzr(boxes: Tensor, stride: float = XYZR_STRIDE) -> Tensor:
    """(..., 4) pixel xyxy -> (..., 4) xyzr in units of ``stride`` pixels."""
    boxes = boxes / stride
    xy = 0.5 * (boxes[..., 0:2] + boxes[..., 2:4])
    wh = boxes[..., 2:4] - boxes[..., 0:2]
    z = (wh.prod(-1, keepdim=True) + 1e-7).log2() / 2
    r = (wh[..., 1:2] / (wh[..., 0:1] + 1e-7) + 1e-7).log2() / 2
    return torch.cat([xy, z, r], dim=-1)


def cxcywh_to_xyzr(boxes: Tensor, stride: float = XYZR_STRIDE) -> Tensor:
    """(..., 4) pixel cxcywh -> (..., 4) xyzr (goes through xyxy exactly as the official code)."""
    return xyxy_to_xyzr(box_cxcywh_to_xyxy(boxes), stride)


def xyzr_to_xyxy(xyzr: Tensor) -> Tensor:
    """(..., 4) xyzr -> (..., 4) xyxy in the same (stride) units: w = 2^(z-r), h = 2^(z+r)."""
    scale = 2.0 ** xyzr[..., 2:3]
    ratio = 2.0 ** torch.cat([-xyzr[..., 3:4], xyzr[..., 3:4]], dim=-1)
    wh = scale * ratio
    xy = xyzr[..., 0:2]
    return torch.cat([xy - 0.5 * wh, xy + 0.5 * wh], dim=-1)


def image_whwh(image_sizes: Tensor) -> Tensor:
    """(B, 2) un-padded (h, w) -> (B, 1, 4) float (w, h, w, h), ready to broadcast over queries."""
    h, w = image_sizes.to(torch.float32).unbind(-1)
    return torch.stack([w, h, w, h], dim=-1).unsqueeze(1)


def xyzr_to_normalized_cxcywh(xyzr: Tensor, whwh: Tensor, stride: float = XYZR_STRIDE) -> Tensor:
    """(B, Q, 4) xyzr, (B, 1, 4) image (w, h, w, h) -> (B, Q, 4) cxcywh normalized to the image."""
    return box_xyxy_to_cxcywh(xyzr_to_xyxy(xyzr) * stride / whwh)


def refine_xyzr(xyzr: Tensor, delta: Tensor) -> Tensor:
    """Box update of AdaMixer: ``xy += delta_xy * 2^z`` (centre moves relative to the box size),
    ``z += delta_z``, ``r += delta_r``. Shapes (..., 4) -> (..., 4)."""
    z = xyzr[..., 2:3]
    new_xy = xyzr[..., 0:2] + delta[..., 0:2] * (2 ** z)
    new_zr = xyzr[..., 2:4] + delta[..., 2:4]
    return torch.cat([new_xy, new_zr], dim=-1)


def sine_position_encoding(xyzr: Tensor, num_feats: int = 64, temperature: float = 10000.0) -> Tensor:
    """Sinusoidal encoding of (x / 1000, y / 1000, z, r): (..., 4) -> (..., 4 * num_feats).

    Per coordinate ``v`` and feature ``i`` (0 <= i < num_feats): ``v / temperature ** (2 * (i // 2)
    / num_feats)``, sine on even ``i`` and cosine on odd ``i`` (interleaved); the four coordinates'
    blocks are concatenated in x, y, z, r order.
    """
    scaled = xyzr / xyzr.new_tensor([1000.0, 1000.0, 1.0, 1.0])
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=xyzr.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="trunc") / num_feats)
    angles = scaled[..., None] / dim_t                                   # (..., 4, num_feats)
    encoded = torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1)
    return encoded.flatten(-3)                                           # (..., 4 * num_feats)
