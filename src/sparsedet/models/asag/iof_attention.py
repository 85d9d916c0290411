"""AdaMixer-style query self-attention with a learnable IoF log-bias (spec §1.5 step 4, §1.7).

For query i attending to key j, head h adds ``tau_h * log(IoF(i, j) + 1e-7)`` to the attention
logit, where ``IoF(i, j) = |box_i ∩ box_j| / |box_i|``: a query mostly looks at the queries whose
boxes cover it. The sine encoding of the box is added to queries, keys **and** values, and the
residual is ``content + encoding`` (not ``content``).

The parameters (an ``nn.MultiheadAttention`` and the ``iof_tau`` vector) are owned by the calling
block so that its state-dict keys are the official ones (``attn.*`` / ``attention.*`` and
``iof_tau``); this module only holds the computation.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .box_encoding import sine_position_encoding, xyzr_to_xyxy

__all__ = ["pairwise_iof", "padded_query_mask", "iof_attention_bias", "iof_self_attention"]


def pairwise_iof(boxes: Tensor, eps: float = 1e-6) -> Tensor:
    """(B, Q, 4) xyxy -> (B, Q, Q) intersection over the area of the row box (``[b, i, j]`` =
    ``|i ∩ j| / max(|i|, eps)``), as mmdet's ``bbox_overlaps(mode='iof')``."""
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    lt = torch.max(boxes[..., :, None, :2], boxes[..., None, :, :2])
    rb = torch.min(boxes[..., :, None, 2:], boxes[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    return overlap / torch.clamp(area[..., None], min=eps)


def padded_query_mask(valid: Tensor, num_heads: int) -> Tensor:
    """(B, Q) bool valid mask -> (B * num_heads, Q, Q) bool, True = blocked.

    Rows of valid queries are blocked from the padded key columns; rows of padded queries stay
    fully open so that no row is all ``-inf`` (which would give NaN). The layout is batch-major
    then head (b0h0, b0h1, ...), PyTorch's 3-D ``attn_mask`` convention.
    """
    blocked = valid[:, :, None] & ~valid[:, None, :]
    return blocked.repeat_interleave(num_heads, dim=0)


def iof_attention_bias(xyzr: Tensor, iof_tau: Tensor, blocked: Optional[Tensor] = None) -> Tensor:
    """Float attention mask (B * heads, Q, Q): ``tau_h * log(IoF + 1e-7)``, ``-inf`` where blocked.

    Args:
        xyzr: (B, Q, 4) boxes (no gradient flows through the IoF).
        iof_tau: (heads,) learnable temperatures.
        blocked: optional (B * heads, Q, Q) bool, True = blocked (see :func:`padded_query_mask`).
    """
    with torch.no_grad():
        log_iof = (pairwise_iof(xyzr_to_xyxy(xyzr)) + 1e-7).log()[:, None]    # (B, 1, Q, Q)
    bias = (log_iof * iof_tau.view(1, -1, 1, 1)).flatten(0, 1)
    if blocked is not None:
        bias = bias.masked_fill(blocked, float("-inf"))
    return bias


def iof_self_attention(attention: nn.MultiheadAttention, iof_tau: Tensor, content: Tensor, xyzr: Tensor,
                       blocked: Optional[Tensor] = None, norm: Optional[nn.Module] = None) -> Tensor:
    """One IoF-biased self-attention with its residual, then the block's post-norm.

    Args:
        attention: a sequence-first ``nn.MultiheadAttention`` (``batch_first=False``, official).
        iof_tau: (heads,) learnable IoF temperatures.
        content: (B, Q, d) query content.
        xyzr: (B, Q, 4) query boxes (stride-4 units); used without gradient.
        blocked: optional (B * heads, Q, Q) bool mask, True = blocked.
        norm: the LayerNorm applied after the residual (None = none).

    Returns:
        (B, Q, d) ``norm(attn(c + pe, c + pe, c + pe) + (c + pe))`` with ``pe`` the sine encoding of
        xyzr. The norm runs in the sequence-first layout, before transposing back, as officially:
        later layers then see the same memory layout and round identically.
    """
    with torch.no_grad():
        pe = sine_position_encoding(xyzr, content.shape[-1] // 4)
    norm = norm if norm is not None else nn.Identity()
    if content.shape[1] == 0:               # no query at all: nothing to attend (MHA rejects Q = 0)
        return norm(content + pe)
    bias = iof_attention_bias(xyzr, iof_tau, blocked)
    x = (content + pe).transpose(0, 1)                                    # (Q, B, d)
    # need_weights=True keeps PyTorch on the explicit softmax(QK^T + bias) V path the official code
    # runs (the fused kernel chosen otherwise rounds differently, ~1e-6, which the sampling offsets
    # of the AdaMixer heads amplify).
    out = attention(x, x, x, attn_mask=bias, need_weights=True)[0]
    return norm(out + x).transpose(0, 1)
