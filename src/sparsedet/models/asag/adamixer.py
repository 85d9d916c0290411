"""One AdaMixer decoder stage (ASAG-A's head, spec §3.2; class AdaMixerDecoderStage officially).

query content (B, Q, d) + xyzr box
  -> IoF self-attention (+ sine PE in q/k/v and residual) -> ``attention_norm``
  -> adaptive 3-D sampling over P2..P5 + adaptive mixing -> ``sampling_n_mixing.norm``
  -> FFN 256 -> 2048 -> 256, residual -> ``ffn_norm``
  -> class tower + ``fc_cls``; box tower + ``fc_reg`` -> xyzr deltas -> refined box.

Keys are the official ``decoder.bbox_head.{k}.*`` (spec §6.5); 18,510,300 parameters at C = 80.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .adaptive_mixing import AdaptiveSamplingMixing
from .box_encoding import image_whwh, refine_xyzr, xyzr_to_normalized_cxcywh
from .iof_attention import iof_self_attention
from .towers import MLP, linear_tower, run_tower

__all__ = ["AdaMixerStage"]


class AdaMixerStage(nn.Module):
    """Args:
        num_classes: C.
        content_dim: d (256).
        num_heads: self-attention heads (8).
        dim_feedforward: FFN width (2048).
        activation: ``gelu`` (official) / ``relu`` / ``silu``.
        in_points, out_points, num_groups: AdaMixer sampling/mixing sizes (32, 128, 4).
        strides: pixel strides of the input levels (4, 8, 16, 32); xyzr is in units of strides[0].
        num_cls_fcs, num_reg_fcs: tower depths (1, 3).
        prior_prob: initial foreground probability of the classifier bias.
        dropout: attention dropout (official 0.0; AdaMixer has no other dropout).
    """

    def __init__(self, num_classes: int, content_dim: int = 256, num_heads: int = 8, dim_feedforward: int = 2048,
                 activation: str = "gelu", in_points: int = 32, out_points: int = 128, num_groups: int = 4,
                 strides: Sequence[int] = (4, 8, 16, 32), num_cls_fcs: int = 1, num_reg_fcs: int = 3,
                 prior_prob: float = 0.01, dropout: float = 0.0):
        super().__init__()
        self.strides = tuple(strides)
        self.attention = nn.MultiheadAttention(content_dim, num_heads, dropout=dropout)
        self.attention_norm = nn.LayerNorm(content_dim)
        self.ffn = MLP(content_dim, dim_feedforward, content_dim, 2, activation)
        self.ffn_norm = nn.LayerNorm(content_dim)
        self.cls_fcs = linear_tower(num_cls_fcs, content_dim, activation)
        self.fc_cls = nn.Linear(content_dim, num_classes)
        self.reg_fcs = linear_tower(num_reg_fcs, content_dim, activation)
        self.fc_reg = nn.Linear(content_dim, 4)
        self.sampling_n_mixing = AdaptiveSamplingMixing(in_points, out_points, num_groups, content_dim, activation,
                                                        self.strides)
        self.iof_tau = nn.Parameter(torch.ones(num_heads))
        self.reset_parameters(prior_prob)

    @torch.no_grad()
    def reset_parameters(self, prior_prob: float = 0.01) -> None:
        """Official init: xavier_uniform on >1-D parameters, then the special inits (focal prior,
        zero box regressor, IoF temperatures U(0, 4), sampling offsets, zero mixing generator)."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        nn.init.constant_(self.fc_cls.bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.zeros_(self.fc_reg.weight)
        nn.init.zeros_(self.fc_reg.bias)
        nn.init.uniform_(self.iof_tau, 0.0, 4.0)
        self.sampling_n_mixing.reset_parameters()

    def forward(self, features: Sequence[Tensor], content: Tensor, xyzr: Tensor, image_sizes: Tensor,
                blocked: Optional[Tensor] = None) -> dict:
        """
        Args:
            features: P2..P5, each (B, d, H_l, W_l).
            content: (B, Q, d) query content (including the head's embedding).
            xyzr: (B, Q, 4) initial boxes, stride-4 units (detached).
            image_sizes: (B, 2) un-padded (h, w).
            blocked: (B * heads, Q, Q) bool attention mask, True = blocked (or None).

        Returns:
            ``logits`` (B, Q, C), ``boxes`` (B, Q, 4) normalized cxcywh, ``xyzr`` (B, Q, 4) refined,
            ``content`` (B, Q, d) output query content.
        """
        x = iof_self_attention(self.attention, self.iof_tau, content, xyzr, blocked, self.attention_norm)
        x = self.sampling_n_mixing(features, x, xyzr)
        x = self.ffn_norm(self.ffn(x) + x)
        logits = self.fc_cls(run_tower(self.cls_fcs, x))
        new_xyzr = refine_xyzr(xyzr, self.fc_reg(run_tower(self.reg_fcs, x)))
        boxes = xyzr_to_normalized_cxcywh(new_xyzr, image_whwh(image_sizes).to(new_xyzr.device), self.strides[0])
        return {"logits": logits, "boxes": boxes, "xyzr": new_xyzr, "content": x}
