"""Deformable-DETR encoder and decoder layers (post-norm), built on :class:`MSDeformAttn`.

Encoder layer, tokens x (B, S, d) of all levels with positions p:

    x = LN1(x + Dropout(MSDeformAttn(q = x + p, reference = cell centres, value = x)))
    x = LN2(x + Dropout(W2 Dropout(ReLU(W1 x))))

Decoder layer, queries t (B, Q, d) with query positions p and a reference (point or box):

    t = LN2(t + Dropout(MHA(q = k = t + p, v = t)))            (self-attention, padded-query mask)
    t = LN1(t + Dropout(MSDeformAttn(q = t + p, reference, value = memory)))
    t = LN3(t + Dropout(W2 Dropout(ReLU(W1 t))))

Module names (``self_attn``, ``cross_attn``, ``norm1..3``, ``linear1``, ``linear2``) are Deformable
DETR's. Helpers give the per-level padding masks, valid ratios, sine map positions and the encoder's
reference points, all consistent with each other so that an image's result does not depend on how
much padding the batch adds around it.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .activation import build_activation
from .deformable_attention import MSDeformAttn
from .position_encoding import sine_encoding

__all__ = ["DeformableEncoderLayer", "DeformableDecoderLayer", "level_padding_mask", "valid_ratios",
           "sine_map_position", "encoder_reference_points"]


def level_padding_mask(image_sizes: Tensor, map_hw: Sequence[int], stride: int) -> Tensor:
    """(B, 2) un-padded (h, w) in pixels -> (B, H, W) bool, True = padded cell.

    A cell (i, j) of a stride-``stride`` map is valid when its top-left pixel (i*s, j*s) lies in the
    image, i.e. i < ceil(h / s) (= Deformable DETR's nearest-resized pixel mask when the padded
    size is a multiple of the stride)."""
    h, w = map_hw
    device = image_sizes.device
    rows = torch.arange(h, device=device) * stride
    cols = torch.arange(w, device=device) * stride
    sizes = image_sizes.to(device)
    return ~((rows[None, :, None] < sizes[:, 0, None, None]) & (cols[None, None, :] < sizes[:, 1, None, None]))


def valid_ratios(mask: Tensor) -> Tensor:
    """(B, H, W) padding mask -> (B, 2) (valid width / W, valid height / H), Deformable DETR's
    ``get_valid_ratio``."""
    h, w = mask.shape[1:]
    valid_h = (~mask[:, :, 0]).sum(1).float()
    valid_w = (~mask[:, 0, :]).sum(1).float()
    return torch.stack([valid_w / w, valid_h / h], -1)


def sine_map_position(mask: Tensor, dims: int, temperature: float = 10000.0) -> Tensor:
    """Deformable DETR's normalised sine position (``PositionEmbeddingSine(dims/2, normalize=True)``):
    (B, H, W) padding mask -> (B, dims, H, W), (y block, x block), each coordinate
    ``(cumsum - 0.5) / valid extent * 2 pi`` so that positions span the valid image whatever the padding."""
    not_mask = (~mask).float()
    y = not_mask.cumsum(1)
    x = not_mask.cumsum(2)
    eps, scale = 1e-6, 2 * math.pi
    y = (y - 0.5) / (y[:, -1:, :] + eps) * scale
    x = (x - 0.5) / (x[:, :, -1:] + eps) * scale
    return torch.cat([sine_encoding(y, dims // 2, temperature), sine_encoding(x, dims // 2, temperature)],
                     dim=-1).permute(0, 3, 1, 2)


def encoder_reference_points(spatial_shapes: Sequence[tuple[int, int]], ratios: Tensor) -> Tensor:
    """Every cell centre as a reference on every level: (B, S, L, 2) (x, y) in [0, 1] of each padded map.

    Args:
        spatial_shapes: [(H_l, W_l)] of the L levels.
        ratios: (B, L, 2) valid ratios (w, h) of each level.
    """
    points = []
    for level, (h, w) in enumerate(spatial_shapes):
        ys, xs = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, device=ratios.device),
                                torch.linspace(0.5, w - 0.5, w, device=ratios.device), indexing="ij")
        ys = ys.reshape(-1)[None] / (ratios[:, None, level, 1] * h)
        xs = xs.reshape(-1)[None] / (ratios[:, None, level, 0] * w)
        points.append(torch.stack((xs, ys), -1))
    return torch.cat(points, 1)[:, :, None] * ratios[:, None]


class DeformableEncoderLayer(nn.Module):
    """One post-norm deformable self-attention + FFN layer.

    Args:
        d_model (256), dim_feedforward (1024), dropout (0.1), activation (``relu``), n_levels (4),
        n_heads (8), n_points (4).
    """

    def __init__(self, d_model: int = 256, dim_feedforward: int = 1024, dropout: float = 0.1,
                 activation: str = "relu", n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.activation = build_activation(activation)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, pos: Tensor, reference: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """``src``, ``pos``: (B, S, d); ``reference``: (B, S, L, 2); ``padding_mask``: (B, S) bool.
        Returns (B, S, d)."""
        attended = self.self_attn(src + pos, reference, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(attended))
        return self.norm2(src + self.dropout3(self.linear2(self.dropout2(self.activation(self.linear1(src))))))


class DeformableDecoderLayer(nn.Module):
    """One post-norm decoder layer: query self-attention, deformable cross-attention, FFN.

    Args:
        d_model (256), dim_feedforward (1024), dropout (0.1 in Deformable DETR), activation
        (``relu``), n_levels (4), n_heads (8), n_points (4).
    """

    def __init__(self, d_model: int = 256, dim_feedforward: int = 1024, dropout: float = 0.1,
                 activation: str = "relu", n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        self.n_heads = n_heads
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.activation = build_activation(activation)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, query_pos: Tensor, reference: Tensor, memory: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, memory_padding_mask: Optional[Tensor] = None,
                blocked: Optional[Tensor] = None) -> Tensor:
        """
        Args:
            tgt, query_pos: (B, Q, d) query content and position.
            reference: (B, Q, L, 2 or 4) reference points / boxes in [0, 1] of each padded map.
            memory: (B, S, d) encoder output; spatial_shapes (L, 2); level_start_index (L,).
            memory_padding_mask: (B, S) bool, True = padded cell.
            blocked: (B * heads, Q, Q) bool self-attention mask, True = blocked (padded queries).

        Returns:
            (B, Q, d).
        """
        if tgt.shape[1]:                    # MHA rejects empty sequences
            qk = tgt + query_pos
            attended = self.self_attn(qk, qk, tgt, attn_mask=blocked, need_weights=False)[0]
            tgt = self.norm2(tgt + self.dropout2(attended))
        attended = self.cross_attn(tgt + query_pos, reference, memory, spatial_shapes, level_start_index,
                                   memory_padding_mask)
        tgt = self.norm1(tgt + self.dropout1(attended))
        return self.norm3(tgt + self.dropout4(self.linear2(self.dropout3(self.activation(self.linear1(tgt))))))
