"""ASAG-S's head: one Sparse R-CNN dynamic stage (spec §3.1; class RCNNHead officially).

It is the project's :class:`~sparsedet.models.sparse_rcnn.head.RCNNStage` with ASAG's options:
GELU in the FFN and towers (the dynamic convolution keeps its ReLU), the padded-query attention
mask, no positional encoding, boxes decoded as **image-normalized cxcywh** with weights
(2, 2, 1, 1) and scale clamp log(1e5 / 16), and the stage owns its RoI pooler (torchvision
``MultiScaleRoIAlign`` semantics). Keys are the official ``decoder.head_series.{k}.*`` (§6.6);
13,235,412 parameters at C = 80.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ...layers import BoxCoder
from ...layers.box_ops import box_cxcywh_to_xyxy
from ..sparse_rcnn.config import SparseRCNNConfig
from ..sparse_rcnn.head import RCNNStage
from .box_encoding import image_whwh
from .relation_block import asag_roi_pooler

__all__ = ["SparseStage"]


class SparseStage(RCNNStage):
    """Args:
        num_classes: C.
        content_dim: d (256).
        num_heads: self-attention heads (8).
        dim_feedforward: FFN width (2048).
        activation: ``gelu`` (official) / ``relu`` / ``silu`` for the FFN and towers.
        dim_dynamic: inner width of the dynamic convolution (64).
        pooler_levels, pooler_resolution: RoIAlign on P2..P5, 7 x 7.
        num_cls_fcs, num_reg_fcs: tower depths (1, 3).
        prior_prob: initial foreground probability of the classifier bias.
        dropout: attention, residual and FFN dropout (official 0.0).
    """

    def __init__(self, num_classes: int, content_dim: int = 256, num_heads: int = 8, dim_feedforward: int = 2048,
                 activation: str = "gelu", dim_dynamic: int = 64, pooler_levels: Sequence[int] = (2, 3, 4, 5),
                 pooler_resolution: int = 7, num_cls_fcs: int = 1, num_reg_fcs: int = 3, prior_prob: float = 0.01,
                 dropout: float = 0.0):
        cfg = SparseRCNNConfig(num_classes=num_classes, hidden_dim=content_dim, num_heads=num_heads,
                               dim_feedforward=dim_feedforward, dropout=dropout, dim_dynamic=dim_dynamic,
                               num_cls_layers=num_cls_fcs, num_reg_layers=num_reg_fcs,
                               pooler_resolution=pooler_resolution)
        box_coder = BoxCoder((2.0, 2.0, 1.0, 1.0), math.log(100000.0 / 16))
        super().__init__(cfg, num_classes, box_coder, activation=activation, box_format="cxcywh")
        self.pooler = asag_roi_pooler(pooler_levels, pooler_resolution)
        self.reset_parameters(prior_prob)

    @torch.no_grad()
    def reset_parameters(self, prior_prob: float = 0.01) -> None:
        """Official init: xavier_uniform on >1-D parameters, focal prior on the class bias, zero
        box regressor."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        nn.init.constant_(self.class_logits.bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.zeros_(self.bboxes_delta.weight)
        nn.init.zeros_(self.bboxes_delta.bias)

    def forward(self, features: Sequence[Tensor], content: Tensor, boxes: Tensor, image_sizes: Tensor,
                blocked: Optional[Tensor] = None) -> dict:
        """
        Args:
            features: P2..P5, each (B, d, H_l, W_l).
            content: (B, Q, d) query content (including the head's embedding).
            boxes: (B, Q, 4) initial boxes, image-normalized cxcywh (detached proposals).
            image_sizes: (B, 2) un-padded (h, w).
            blocked: (B * heads, Q, Q) bool attention mask, True = blocked (or None).

        Returns:
            ``logits`` (B, Q, C), ``boxes`` (B, Q, 4) normalized cxcywh, ``content`` (B, Q, d).
        """
        batch, num_queries, dim = content.shape
        if num_queries == 0:                # MHA rejects empty sequences; nothing to compute
            return {"logits": content.new_zeros(batch, 0, self.class_logits.out_features),
                    "boxes": boxes.new_zeros(batch, 0, 4), "content": content}
        whwh = image_whwh(image_sizes).to(boxes.device)
        pixel_xyxy = box_cxcywh_to_xyxy(boxes) * whwh
        rois = self.pooler(features, list(pixel_xyxy))                        # (B*Q, d, S, S)
        rois = rois.flatten(2).transpose(1, 2)                                # (B*Q, S*S, d) position-major
        logits, new_boxes, out = super().forward(rois, content, boxes, attn_mask=blocked)
        return {"logits": logits, "boxes": new_boxes, "content": out}
