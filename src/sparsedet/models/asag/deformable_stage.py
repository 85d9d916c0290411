"""ASAG-D's head: one Deformable-DETR decoder layer (spec §3.3, a reconstruction: no official code).

query content (B, Q, d) + reference box (normalized cxcywh, the detached proposal)
  -> query position = MLP(sine embedding of the box)                     (``ref_point_head``)
  -> self-attention (q = k = content + position, padded-query mask)      (``layer.self_attn``)
  -> deformable cross-attention over the encoder maps E3..E6 around the reference box:
     offsets scaled by box (w, h) * 0.5 / points (two-stage Deformable DETR)  (``layer.cross_attn``)
  -> FFN (1024)                                                          (``layer.linear1/2``)
  -> ``class_embed`` (Linear) -> logits;  ``bbox_embed`` (3-layer MLP) -> delta added to the box
     in inverse-sigmoid space: box' = sigmoid(delta + logit(box)).

Every choice here follows Deformable DETR (two-stage, box refinement) and DINO's box-conditioned
query position; the ASAG paper gives none of them (its ASAG-D code was never released).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ...layers.deformable_attention import flatten_levels
from ...layers.deformable_transformer import DeformableDecoderLayer, level_padding_mask, valid_ratios
from ...layers.position_encoding import sine_encoding
from .towers import MLP

__all__ = ["DeformableStage", "box_sine_embedding", "inverse_sigmoid"]


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """``log(x / (1 - x))`` with x clamped to [0, 1] and both terms to >= eps (Deformable DETR)."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def box_sine_embedding(boxes: Tensor, dims_per_coordinate: int) -> Tensor:
    """(..., 4) normalized cxcywh -> (..., 4 * dims_per_coordinate): the sine encoding of
    ``2 pi * coordinate`` for y, x, w, h in that order (DINO's ``gen_sineembed_for_position``)."""
    scaled = boxes * (2 * math.pi)
    order = scaled[..., [1, 0, 2, 3]]
    return sine_encoding(order, dims_per_coordinate).flatten(-2)


class DeformableStage(nn.Module):
    """Args:
        num_classes: C.
        content_dim: d (256).
        num_heads: attention heads (8).
        dim_feedforward: FFN width (1024, Deformable DETR).
        num_points: sampling points per head and level (4).
        strides: pixel strides of the encoder levels (8, 16, 32, 64); one attention level each.
        activation: FFN / MLP activation (``relu``, Deformable DETR).
        dropout: attention and FFN dropout (ASAG's heads use 0.0).
        prior_prob: initial foreground probability of the classifier bias (0.01).
    """

    def __init__(self, num_classes: int, content_dim: int = 256, num_heads: int = 8, dim_feedforward: int = 1024,
                 num_points: int = 4, strides: Sequence[int] = (8, 16, 32, 64), activation: str = "relu",
                 dropout: float = 0.0, prior_prob: float = 0.01):
        super().__init__()
        self.strides = tuple(strides)
        self.layer = DeformableDecoderLayer(content_dim, dim_feedforward, dropout, activation, len(self.strides),
                                            num_heads, num_points)
        self.ref_point_head = MLP(2 * content_dim, content_dim, content_dim, 2, activation)
        self.class_embed = nn.Linear(content_dim, num_classes)
        self.bbox_embed = MLP(content_dim, content_dim, 4, 3, activation)
        self.reset_parameters(prior_prob)

    @torch.no_grad()
    def reset_parameters(self, prior_prob: float = 0.01) -> None:
        """Deformable DETR's head init: focal prior on the class bias, zero last box layer (the
        first forward returns the reference boxes)."""
        nn.init.constant_(self.class_embed.bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.zeros_(self.bbox_embed.layers[-1].weight)
        nn.init.zeros_(self.bbox_embed.layers[-1].bias)

    def forward(self, features: Sequence[Tensor], content: Tensor, boxes: Tensor, image_sizes: Tensor,
                blocked: Optional[Tensor] = None) -> dict:
        """
        Args:
            features: encoder maps E3..E6, each (B, d, H_l, W_l) (padded batch size).
            content: (B, Q, d) query content (including the head's embedding).
            boxes: (B, Q, 4) reference boxes, normalized cxcywh of the un-padded image (detached).
            image_sizes: (B, 2) un-padded (h, w).
            blocked: (B * heads, Q, Q) bool self-attention mask, True = blocked (or None).

        Returns:
            ``logits`` (B, Q, C), ``boxes`` (B, Q, 4) normalized cxcywh, ``content`` (B, Q, d).
        """
        if len(features) != len(self.strides):
            raise ValueError(f"the ASAG-D head attends to {len(self.strides)} levels (strides {list(self.strides)}) "
                             f"but got {len(features)} feature maps")
        masks = [level_padding_mask(image_sizes, f.shape[-2:], s) for f, s in zip(features, self.strides)]
        memory, spatial_shapes, starts = flatten_levels(list(features))
        padding = torch.cat([m.flatten(1) for m in masks], 1)
        ratios = torch.stack([valid_ratios(m) for m in masks], 1).to(boxes.dtype)    # (B, L, 2) (w, h)
        # Boxes are relative to the un-padded image; the attention reads [0, 1] of each padded map.
        reference = boxes[:, :, None] * torch.cat([ratios, ratios], -1)[:, None]    # (B, Q, L, 4)
        query_pos = self.ref_point_head(box_sine_embedding(boxes, content.shape[-1] // 2))
        x = self.layer(content, query_pos, reference, memory, spatial_shapes, starts, padding, blocked)
        logits = self.class_embed(x)
        new_boxes = (self.bbox_embed(x) + inverse_sigmoid(boxes)).sigmoid()
        return {"logits": logits, "boxes": new_boxes, "content": x}
