"""A traceable ``nn.MultiheadAttention`` for ONNX export.

``torch.nn.functional.multi_head_attention_forward`` reshapes its queries with the Python value of
the sequence length (``q.view(tgt_len, bsz * num_heads, head_dim)``). When that length is
data-dependent (TSP-RCNN's proposals after NMS, ASAG's adaptive anchors), the TorchScript tracer
writes the export-time length into the graph as a constant, and onnxruntime fails on any other
length. ``traceable_attention()`` swaps in the same computation with ``-1`` for the lengths, for the
duration of an export only; eager PyTorch never runs it.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _split_heads(x: Tensor, batch, num_heads: int, head_dim: int) -> Tensor:
    """(L, N, E) -> (N * heads, L, head_dim), L left to the graph (-1)."""
    return x.reshape(-1, batch * num_heads, head_dim).transpose(0, 1)


def _additive_mask(mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """A bool mask (True = blocked) as 0 / -inf; a float mask as it is."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros_like(mask, dtype=dtype).masked_fill(mask, float("-inf"))


def attention_forward(query: Tensor, key: Tensor, value: Tensor, embed_dim_to_check: int, num_heads: int,
                      in_proj_weight: Optional[Tensor], in_proj_bias: Optional[Tensor], bias_k, bias_v,
                      add_zero_attn: bool, dropout_p: float, out_proj_weight: Tensor, out_proj_bias: Optional[Tensor],
                      training: bool = True, key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                      attn_mask: Optional[Tensor] = None, use_separate_proj_weight: bool = False,
                      q_proj_weight: Optional[Tensor] = None, k_proj_weight: Optional[Tensor] = None,
                      v_proj_weight: Optional[Tensor] = None, static_k=None, static_v=None,
                      average_attn_weights: bool = True, is_causal: bool = False):
    """``F.multi_head_attention_forward`` (sequence-first (L, N, E) inputs, eval) without Python
    lengths. Options our models never use (bias_k/v, zero attention, static k/v, causal, dropout
    in training, unbatched inputs) go to PyTorch's own function."""
    if (bias_k is not None or bias_v is not None or add_zero_attn or static_k is not None or static_v is not None
            or is_causal or (training and dropout_p > 0) or query.dim() != 3):
        return _ORIGINAL(query, key, value, embed_dim_to_check, num_heads, in_proj_weight, in_proj_bias, bias_k,
                         bias_v, add_zero_attn, dropout_p, out_proj_weight, out_proj_bias, training, key_padding_mask,
                         need_weights, attn_mask, use_separate_proj_weight, q_proj_weight, k_proj_weight,
                         v_proj_weight, static_k, static_v, average_attn_weights, is_causal)
    embed_dim = int(embed_dim_to_check)
    head_dim = embed_dim // num_heads
    batch = query.shape[1]
    if use_separate_proj_weight:
        weights = (q_proj_weight, k_proj_weight, v_proj_weight)
    else:
        weights = in_proj_weight.chunk(3)
    biases = in_proj_bias.chunk(3) if in_proj_bias is not None else (None, None, None)
    q, k, v = (_split_heads(F.linear(x, w, b), batch, num_heads, head_dim)
               for x, w, b in zip((query, key, value), weights, biases))
    scores = torch.bmm(q * (1.0 / math.sqrt(head_dim)), k.transpose(1, 2))          # (N*h, L, S)
    mask = _additive_mask(attn_mask, scores.dtype)
    if mask is not None:
        scores = scores + (mask if mask.dim() == 3 else mask[None])
    padding = _additive_mask(key_padding_mask, scores.dtype)
    if padding is not None:  # (N, S) -> (N*h, 1, S), batch-major then head as PyTorch's layout
        scores = scores + padding[:, None, None, :].expand(-1, num_heads, -1, -1).flatten(0, 1)
    probs = scores.softmax(dim=-1)
    out = torch.bmm(probs, v).transpose(0, 1).reshape(-1, batch, embed_dim)            # (L, N, E)
    out = F.linear(out, out_proj_weight, out_proj_bias)
    if not need_weights:
        return out, None
    probs = probs.unflatten(0, (batch, num_heads))
    return out, probs.mean(dim=1) if average_attn_weights else probs


_ORIGINAL = F.multi_head_attention_forward


@contextlib.contextmanager
def traceable_attention():
    """Every ``nn.MultiheadAttention`` runs ``attention_forward`` inside the block (restored after)."""
    F.multi_head_attention_forward = attention_forward
    try:
        yield
    finally:
        F.multi_head_attention_forward = _ORIGINAL
