"""Pre-norm transformer encoder (TSP-FCOS / TSP-RCNN, spec tsp.md §1.4).

One layer, for tokens x and positions p (both (B, S, d)):

    h = LN1(x);  x = x + Dropout(MHA(q = h + p, k = h + p, v = h))
    h = LN2(x);  x = x + Dropout(W2 Dropout(ReLU(W1 h + b1)) + b2)

and a final LayerNorm after the last layer. The position is added to queries and keys only,
never to the values, in every layer. Parameter names (``layers.{i}.self_attn.in_proj_weight``,
``linear1``, ``linear2``, ``norm1``, ``norm2``, ``norm``) are those of the official checkpoints,
so their ``transformer_encoder.*`` tensors load one-to-one.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn


class PreNormEncoderLayer(nn.Module):
    """One pre-norm self-attention + FFN layer (ReLU, dropout on attention weights, after the
    attention, inside and after the FFN)."""

    def __init__(self, d_model: int = 512, nhead: int = 8, dim_feedforward: int = 2048, dropout: float = 0.1):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)   # inside the FFN
        self.dropout1 = nn.Dropout(dropout)  # after attention
        self.dropout2 = nn.Dropout(dropout)  # after the FFN
        self.activation = nn.ReLU()

    def forward(self, src: Tensor, pos: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """``src``, ``pos``: (B, S, d); ``key_padding_mask``: (B, S) bool, True = padded slot.
        Returns (B, S, d)."""
        h = self.norm1(src)
        qk = h if pos is None else h + pos
        attended = self.self_attn(qk, qk, h, key_padding_mask=key_padding_mask, need_weights=False)[0]
        src = src + self.dropout1(attended)
        h = self.norm2(src)
        return src + self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(h)))))


class TransformerEncoder(nn.Module):
    """``num_layers`` pre-norm layers and a final LayerNorm.

    Args:
        d_model: token width (512 in TSP).
        nhead: attention heads (8, i.e. 64 dims per head).
        num_layers: depth (6).
        dim_feedforward: FFN width (2048: the TSP scripts override the config default 1024).
        dropout: on attention weights and residual branches (0.1).

    ``forward(src (B, S, d), pos (B, S, d) or None, key_padding_mask (B, S) bool or None)``
    returns (B, S, d). Initialisation is PyTorch's default (MHA in_proj xavier-uniform, bias 0).
    """

    def __init__(self, d_model: int = 512, nhead: int = 8, num_layers: int = 6,
                 dim_feedforward: int = 2048, dropout: float = 0.1):
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"d_model ({d_model}) must be divisible by nhead ({nhead})")
        self.layers = nn.ModuleList(PreNormEncoderLayer(d_model, nhead, dim_feedforward, dropout)
                                    for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.d_model = d_model

    def forward(self, src: Tensor, pos: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None) -> Tensor:
        for layer in self.layers:
            src = layer(src, pos, key_padding_mask)
        return self.norm(src)
