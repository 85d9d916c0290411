"""ASAG's ``rpn`` block (class RelationBlock, spec §1.5): anchors -> content queries -> proposals.

1. RoIAlign 7x7 of every anchor on P2..P5 (torchvision ``MultiScaleRoIAlign`` semantics:
   ``aligned=False``, sampling ratio 2, canonical level rule), flattened channel-major
   (index ``c * 49 + t``) -> Linear ``roi`` -> LayerNorm ``tokens_norm1`` = query content.
2. The anchors become xyzr boxes (stride-4 units).
3. One IoF-biased self-attention (:mod:`.iof_attention`) -> ``tokens_norm3``; FFN ``tokens_proj``
   (256 -> 2048 -> 256) with residual -> ``tokens_norm2``.
4. Class tower + ``fc_cls`` -> proposal logits; box tower + ``fc_reg`` -> xyzr deltas -> refined
   xyzr -> proposal boxes.

Parameter names are the official ``rpn.*`` keys (spec §6.4): 4,812,892 parameters at C = 80.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ...layers import MultiLevelRoIAlign
from ...layers.box_ops import box_cxcywh_to_xyxy
from .box_encoding import image_whwh, refine_xyzr, xyxy_to_xyzr, xyzr_to_normalized_cxcywh
from .iof_attention import iof_self_attention, padded_query_mask
from .towers import MLP, linear_tower, run_tower

__all__ = ["RelationBlock", "asag_roi_pooler"]


def asag_roi_pooler(levels: Sequence[int] = (2, 3, 4, 5), output_size: int = 7) -> MultiLevelRoIAlign:
    """The RoI pooler of ASAG's official code: torchvision ``MultiScaleRoIAlign(..., 7, 2)``
    semantics (``aligned=False``, its level rule) on P2..P5."""
    return MultiLevelRoIAlign(levels, output_size, sampling_ratio=2, aligned=False, level_rule="torchvision")


class RelationBlock(nn.Module):
    """Content queries, one relation (self-attention) layer and supervised proposals.

    Args:
        num_classes: C.
        d_model: query width (256).
        num_heads: self-attention heads (8).
        dim_feedforward: FFN hidden width (2048).
        activation: ``gelu`` (official default) / ``relu`` / ``silu``, used by the FFN and towers.
        num_cls_fcs, num_reg_fcs: Linear-LN-act layers of the class / box towers (1 / 3).
        pooler_levels: pyramid levels of ``features`` (P2..P5 -> (2, 3, 4, 5)).
        prior_prob: initial foreground probability of the classifier bias (0.01).
    """

    def __init__(self, num_classes: int, d_model: int = 256, num_heads: int = 8, dim_feedforward: int = 2048,
                 activation: str = "gelu", num_cls_fcs: int = 1, num_reg_fcs: int = 3,
                 pooler_levels: Sequence[int] = (2, 3, 4, 5), pooler_resolution: int = 7, prior_prob: float = 0.01):
        super().__init__()
        self.d_model = d_model
        self.num_heads = num_heads
        self.pooler = asag_roi_pooler(pooler_levels, pooler_resolution)
        self.xyzr_stride = 2 ** pooler_levels[0]
        self.roi = nn.Linear(d_model * pooler_resolution ** 2, d_model)
        self.tokens_norm1 = nn.LayerNorm(d_model)
        self.tokens_proj = MLP(d_model, dim_feedforward, d_model, 2, activation)
        self.tokens_norm2 = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, num_heads)
        self.iof_tau = nn.Parameter(torch.ones(num_heads))
        self.tokens_norm3 = nn.LayerNorm(d_model)
        self.cls_fcs = linear_tower(num_cls_fcs, d_model, activation)
        self.fc_cls = nn.Linear(d_model, num_classes)
        self.reg_fcs = linear_tower(num_reg_fcs, d_model, activation)
        self.fc_reg = nn.Linear(d_model, 4)
        self.reset_parameters(prior_prob)

    @torch.no_grad()
    def reset_parameters(self, prior_prob: float = 0.01) -> None:
        """Official init: xavier_uniform on every >1-D parameter, focal prior on the class bias,
        zero box regressor, IoF temperatures U(0, 4)."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        nn.init.constant_(self.fc_cls.bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.zeros_(self.fc_reg.weight)
        nn.init.zeros_(self.fc_reg.bias)
        nn.init.uniform_(self.iof_tau, 0.0, 4.0)

    def forward(self, features: Sequence[Tensor], anchors: Tensor, image_sizes: Tensor, valid: Tensor,
                blocked: Optional[Tensor] = None) -> dict:
        """
        Args:
            features: P2..P5, each (B, d, H_l, W_l) (strides 4, 8, 16, 32; padded batch size).
            anchors: (B, Q, 4) pixel cxcywh in the un-padded resized image (padded queries included).
            image_sizes: (B, 2) un-padded (h, w) of each image.
            valid: (B, Q) bool, True for real anchors (padded queries must not affect them).
            blocked: optional (B * heads, Q, Q) bool attention mask (True = blocked) replacing the
                one built from ``valid`` (e.g. with denoising queries).

        Returns:
            ``logits`` (B, Q, C) proposal class logits; ``boxes`` (B, Q, 4) proposal boxes,
            normalized cxcywh; ``content`` (B, Q, d) refined query content (not detached);
            ``xyzr`` (B, Q, 4) refined proposal xyzr, detached (the AdaMixer heads' initial box).
        """
        batch, num_queries = anchors.shape[:2]
        if blocked is None:
            blocked = padded_query_mask(valid, self.num_heads)
        anchors_xyxy = box_cxcywh_to_xyxy(anchors.detach())
        rois = self.pooler(features, list(anchors_xyxy))                    # (B*Q, d, 7, 7)
        content = self.tokens_norm1(self.roi(rois.reshape(batch, num_queries, self.roi.in_features)))

        xyzr = xyxy_to_xyzr(anchors_xyxy, self.xyzr_stride)
        content = iof_self_attention(self.attn, self.iof_tau, content, xyzr, blocked, self.tokens_norm3)
        content = self.tokens_norm2(content + self.tokens_proj(content))

        logits = self.fc_cls(run_tower(self.cls_fcs, content))
        xyzr = refine_xyzr(xyzr, self.fc_reg(run_tower(self.reg_fcs, content)))
        boxes = xyzr_to_normalized_cxcywh(xyzr, image_whwh(image_sizes).to(xyzr.device), self.xyzr_stride)
        return {"logits": logits, "boxes": boxes, "content": content, "xyzr": xyzr.detach()}
