"""TSP-RCNN's transformer box head and predictor (official ``MyFastRCNNTransformerHead`` and
``MyFastRCNNOutputLayers``, spec §3.5-3.6). Module names follow the official ones, so the converter
maps them 1:1."""
from __future__ import annotations

import math
from typing import Optional

from torch import Tensor, nn

from ...layers.transformer import TransformerEncoder


class TSPRCNNBoxHead(nn.Module):
    """RoI features -> tokens -> pre-norm encoder over the proposals of each image.

    ``token = LayerNorm(input_proj(flattened RoI feature) + dec_pos_embed_proj(PE))``; the encoder adds
    the raw PE to its queries and keys in every layer (the encoding is used twice). Without a
    positional encoding (``with_position=False``, paper table 2 ablation) ``dec_pos_embed_proj`` does
    not exist and the encoder gets no positions. Cascade stages > 0 average the token with the
    previous stage's encoder output: ``(token + previous) / sqrt(2)``.

    Init (official): xavier_uniform on every parameter with dim > 1; biases and norms keep PyTorch's.

    Args:
        in_features: C * S * S of the pooled RoI features (256 * 7 * 7 = 12544).
        d_model: token width (512).
        num_fc: 1 = Linear(in, d) (script); 2 = Linear(in, fc_dim) + ReLU + Linear(fc_dim, d) (paper).
        num_heads, num_layers, dim_feedforward, dropout: the encoder.
        with_position: build ``dec_pos_embed_proj`` and use positions.
    """

    def __init__(self, in_features: int, d_model: int = 512, num_fc: int = 1, fc_dim: int = 1024, num_heads: int = 8,
                 num_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.1, with_position: bool = True):
        super().__init__()
        if num_fc == 1:
            self.input_proj = nn.Linear(in_features, d_model)
        else:
            self.input_proj = nn.Sequential(nn.Linear(in_features, fc_dim), nn.ReLU(inplace=True),
                                            nn.Linear(fc_dim, d_model))
        self.post_input_proj_norm = nn.LayerNorm(d_model)
        self.dec_pos_embed_proj = nn.Linear(d_model, d_model) if with_position else None
        self.transformer_encoder = TransformerEncoder(d_model, num_heads, num_layers, dim_feedforward, dropout)
        for parameter in self.parameters():
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)

    def forward(self, roi_features: Tensor, position: Optional[Tensor], key_padding_mask: Tensor,
                previous: Optional[Tensor] = None) -> Tensor:
        """
        Args:
            roi_features: (B, S, in_features) flattened pooled features, padded per image to S slots.
            position: (B, S, d) box encoding, or None without positional encoding.
            key_padding_mask: (B, S) bool, True for padded slots.
            previous: (B, S, d) the previous cascade stage's encoder output, or None.

        Returns:
            (B, S, d) encoder output.
        """
        token = self.input_proj(roi_features)
        if self.dec_pos_embed_proj is not None and position is not None:
            token = token + self.dec_pos_embed_proj(position)
        token = self.post_input_proj_norm(token)
        if previous is not None:
            token = (token + previous) / math.sqrt(2.0)
        return self.transformer_encoder(token, position, key_padding_mask)


class MLP(nn.Module):
    """``layers``: Linear layers with ReLU between them (official ``bbox_pred.layers.{i}``)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 3):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = x.relu()
        return x


class TSPRCNNPredictor(nn.Module):
    """``cls_score``: Linear(d, C + 1), softmax with background at index C, N(0, 0.01) init;
    ``bbox_pred``: MLP d -> d -> d -> 4C (class-specific, columns 4k..4k+3 = class k) or 4 (class
    agnostic), last layer N(0, 0.001) init, biases 0."""

    def __init__(self, d_model: int, num_classes: int, class_agnostic: bool = False):
        super().__init__()
        self.cls_score = nn.Linear(d_model, num_classes + 1)
        self.bbox_pred = MLP(d_model, d_model, 4 if class_agnostic else 4 * num_classes, 3)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.constant_(self.cls_score.bias, 0.0)
        nn.init.normal_(self.bbox_pred.layers[-1].weight, std=0.001)
        nn.init.constant_(self.bbox_pred.layers[-1].bias, 0.0)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(N, d) -> class logits (N, C + 1), deltas (N, 4C) or (N, 4)."""
        return self.cls_score(x), self.bbox_pred(x)
