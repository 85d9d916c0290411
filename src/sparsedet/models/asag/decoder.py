"""ASAG's decoder (spec §1.6): parallel one-layer heads, not stacked.

Every head receives the same detached initial boxes and the same query content plus its own
learned embedding row (``decoder_embedding``, N(0, 1) init). Heads 0..2 are the auxiliary ones
("aux_0".."aux_2"), the last head is "main"; the released checkpoints are each evaluated with one
chosen head. Head modules are stored under the official attribute names: ``bbox_head`` for AdaMixer
heads (ASAG-A), ``head_series`` for Sparse R-CNN heads (ASAG-S); ASAG-D's Deformable-DETR heads
(no official code) under ``deformable_head``.
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor, nn

from .adamixer import AdaMixerStage
from .deformable_stage import DeformableStage
from .iof_attention import padded_query_mask
from .sparse_stage import SparseStage

__all__ = ["DECODER_TYPES", "ParallelDecoder", "head_names"]

# decoder type -> attribute holding its heads (the official state-dict prefix)
DECODER_TYPES = {"adamixer": "bbox_head", "sparse_rcnn": "head_series", "deformable": "deformable_head"}


def head_names(num_heads: int) -> list[str]:
    """Output names in head order: ``aux_0 .. aux_{n-2}`` then ``main`` (one head: ``main``)."""
    return [f"aux_{k}" for k in range(num_heads - 1)] + ["main"]


class ParallelDecoder(nn.Module):
    """Args:
        decoder_type: ``adamixer`` (ASAG-A), ``sparse_rcnn`` (ASAG-S) or ``deformable`` (ASAG-D).
        num_classes: C.
        num_heads: number of parallel heads (official ``num_decoder_layers`` = 4; 1 for a
            one-head deployment).
        content_dim: d (256).
        num_attention_heads: self-attention heads of every head (8).
        dim_feedforward: FFN width (2048).
        activation: ``gelu`` (official) / ``relu`` / ``silu``.
        adamixer_points: (in_points, out_points, groups) of the AdaMixer heads (32, 128, 4).
        strides: pixel strides of the feature levels: P2..P5 (4, 8, 16, 32); ASAG-D's encoder
            levels E3..E6 (8, 16, 32, 64).
        dropout: dropout inside the heads (official 0.0).
        deformable_points, deformable_feedforward: ASAG-D heads: sampling points per attention head
            and level (4), FFN width (1024).
    """

    def __init__(self, decoder_type: str, num_classes: int, num_heads: int = 4, content_dim: int = 256,
                 num_attention_heads: int = 8, dim_feedforward: int = 2048, activation: str = "gelu",
                 adamixer_points: Sequence[int] = (32, 128, 4), strides: Sequence[int] = (4, 8, 16, 32),
                 dropout: float = 0.0, deformable_points: int = 4, deformable_feedforward: int = 1024):
        super().__init__()
        if decoder_type not in DECODER_TYPES:
            raise ValueError(f"model.decoder_type must be one of {sorted(DECODER_TYPES)}, got {decoder_type!r}")
        if num_heads < 1:
            raise ValueError(f"model.num_heads_decoder must be >= 1, got {num_heads}")
        self.decoder_type = decoder_type
        self.num_heads = num_heads
        self.num_attention_heads = num_attention_heads
        self.decoder_embedding = nn.Embedding(num_heads, content_dim)
        if decoder_type == "adamixer":
            in_points, out_points, groups = adamixer_points
            stages = [AdaMixerStage(num_classes, content_dim, num_attention_heads, dim_feedforward, activation,
                                    in_points, out_points, groups, strides, dropout=dropout)
                      for _ in range(num_heads)]
        elif decoder_type == "deformable":
            stages = [DeformableStage(num_classes, content_dim, num_attention_heads, deformable_feedforward,
                                      deformable_points, strides, dropout=dropout) for _ in range(num_heads)]
        else:
            levels = [int(s).bit_length() - 1 for s in strides]
            stages = [SparseStage(num_classes, content_dim, num_attention_heads, dim_feedforward, activation,
                                  pooler_levels=levels, dropout=dropout) for _ in range(num_heads)]
        self._stage_attribute = DECODER_TYPES[decoder_type]
        setattr(self, self._stage_attribute, nn.ModuleList(stages))

    @property
    def heads(self) -> nn.ModuleList:
        """The head modules, whichever official attribute name holds them."""
        return getattr(self, self._stage_attribute)

    @property
    def names(self) -> list[str]:
        return head_names(self.num_heads)

    def initial_boxes(self, proposals: dict) -> Tensor:
        """The heads' initial boxes from the relation block's output (detached): the refined
        ``xyzr`` for AdaMixer heads, the normalized cxcywh proposal ``boxes`` for Sparse R-CNN and
        Deformable-DETR heads."""
        return (proposals["xyzr"] if self.decoder_type == "adamixer" else proposals["boxes"]).detach()

    def forward(self, features: Sequence[Tensor], content: Tensor, init_boxes: Tensor, image_sizes: Tensor,
                valid: Tensor, heads: Optional[Sequence[int]] = None, blocked: Optional[Tensor] = None) -> list[dict]:
        """
        Args:
            features: P2..P5 (ASAG-D: E3..E6), each (B, d, H_l, W_l).
            content: (B, Q, d) refined query content from the relation block.
            init_boxes: (B, Q, 4) initial boxes, detached: xyzr (stride-4 units) for ``adamixer``,
                image-normalized cxcywh for ``sparse_rcnn`` and ``deformable``.
            image_sizes: (B, 2) un-padded (h, w).
            valid: (B, Q) bool, True for real queries.
            heads: indices of the heads to run (None = all), e.g. ``[2]`` to evaluate aux_2 only.
            blocked: optional (B * heads, Q, Q) bool attention mask replacing the one from ``valid``.

        Returns:
            one dict per head run, in increasing head order: ``logits`` (B, Q, C), ``boxes``
            (B, Q, 4) normalized cxcywh, ``content`` (B, Q, d), ``head`` (its index) and ``name``
            (``aux_k`` / ``main``); AdaMixer heads also return the refined ``xyzr``.
        """
        selected = range(self.num_heads) if heads is None else sorted(set(int(k) for k in heads))
        for k in selected:
            if not 0 <= k < self.num_heads:
                raise ValueError(f"decoder head {k} does not exist: this decoder has heads 0..{self.num_heads - 1} "
                                 f"({', '.join(self.names)})")
        if blocked is None:
            blocked = padded_query_mask(valid, self.num_attention_heads)
        init_boxes = init_boxes.detach()
        outputs = []
        for k in selected:
            out = self.heads[k](features, content + self.decoder_embedding.weight[k], init_boxes, image_sizes, blocked)
            out.update(head=k, name=self.names[k])
            outputs.append(out)
        return outputs
