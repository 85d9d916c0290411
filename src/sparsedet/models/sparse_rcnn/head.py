"""Sparse R-CNN's dynamic head: K iterative stages of self-attention, instance interaction and FFN.

Module and parameter names follow the official code (``head_series.{k}.inst_interact.dynamic_layer``
...), so official checkpoints map onto this head key for key.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ...layers import BoxCoder, MultiLevelRoIAlign
from ...layers.activation import build_activation
from .config import SparseRCNNConfig


class DynamicConv(nn.Module):
    """Instance interaction: each proposal feature generates two 1x1-conv kernels applied to its RoI.

    ``dynamic_layer(p)`` is split row-major into W1 (d x d_dyn) then W2 (d_dyn x d). The RoI
    features (K, S*S, d) go through ``relu(LN(R @ W1))`` and ``relu(LN(. @ W2))``, are flattened
    position-major (index = position * d + channel), and projected back to d.
    """

    def __init__(self, hidden_dim: int = 256, dim_dynamic: int = 64, pooler_resolution: int = 7):
        super().__init__()
        self.hidden_dim, self.dim_dynamic = hidden_dim, dim_dynamic
        self.num_params = hidden_dim * dim_dynamic
        self.dynamic_layer = nn.Linear(hidden_dim, 2 * self.num_params)
        self.norm1 = nn.LayerNorm(dim_dynamic)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.activation = nn.ReLU(inplace=True)
        self.out_layer = nn.Linear(hidden_dim * pooler_resolution ** 2, hidden_dim)
        self.norm3 = nn.LayerNorm(hidden_dim)

    def forward(self, proposal_features: Tensor, roi_features: Tensor) -> Tensor:
        """(K, d) proposal features, (K, S*S, d) RoI features -> (K, d)."""
        params = self.dynamic_layer(proposal_features)
        kernel1 = params[:, :self.num_params].view(-1, self.hidden_dim, self.dim_dynamic)
        kernel2 = params[:, self.num_params:].view(-1, self.dim_dynamic, self.hidden_dim)
        x = self.activation(self.norm1(torch.bmm(roi_features, kernel1)))
        x = self.activation(self.norm2(torch.bmm(x, kernel2)))
        return self.activation(self.norm3(self.out_layer(x.flatten(1))))


class AttentionInteraction(nn.Module):
    """Paper table 8's alternative instance interaction: the proposal feature (one query) attends
    to its S*S RoI features with multi-head attention."""

    def __init__(self, hidden_dim: int = 256, num_heads: int = 8, dropout: float = 0.0):
        super().__init__()
        self.attn = nn.MultiheadAttention(hidden_dim, num_heads, dropout=dropout, batch_first=True)

    def forward(self, proposal_features: Tensor, roi_features: Tensor) -> Tensor:
        """(K, d), (K, S*S, d) -> (K, d)."""
        query = proposal_features.unsqueeze(1)
        return self.attn(query, roi_features, roi_features, need_weights=False)[0].squeeze(1)


def _tower(num_layers: int, dim: int, activation: str = "relu") -> nn.Sequential:
    layers = []
    for _ in range(num_layers):
        layers += [nn.Linear(dim, dim, bias=False), nn.LayerNorm(dim), build_activation(activation)]
    return nn.Sequential(*layers)


class RCNNStage(nn.Module):
    """One refinement stage.

    ``forward(roi_features (B*N, S*S, d), proposal_features (B, N, d), boxes (B, N, 4))`` returns
    ``(class_logits (B, N, C'), boxes (B, N, 4), object_features (B, N, d))`` where the boxes are
    decoded relative to the input boxes.

    Options used by ASAG-S (``models/asag/sparse_stage.py``); the defaults are Sparse R-CNN's:
        activation: of the FFN and the class / box towers (``relu``; ASAG: ``gelu``). The dynamic
            convolution keeps its ReLU in both.
        box_format: ``xyxy`` (boxes in pixels, Sparse R-CNN) or ``cxcywh`` (boxes decoded directly
            as cxcywh in any unit, ASAG-S uses image-normalized cxcywh).
    ``forward`` also takes ``attn_mask``: (B * heads, N, N) bool, True = blocked (padded queries).
    """

    def __init__(self, cfg: SparseRCNNConfig, num_logits: int, box_coder: BoxCoder,
                 activation: str = "relu", box_format: str = "xyxy"):
        super().__init__()
        if box_format not in ("xyxy", "cxcywh"):
            raise ValueError(f"RCNNStage box_format must be 'xyxy' or 'cxcywh', got {box_format!r}")
        self.box_format = box_format
        d = cfg.hidden_dim
        self.use_self_attention = cfg.self_attention
        if cfg.self_attention:
            self.self_attn = nn.MultiheadAttention(d, cfg.num_heads, dropout=cfg.dropout, batch_first=True)
            self.norm1 = nn.LayerNorm(d)
            self.dropout1 = nn.Dropout(cfg.dropout)
        if cfg.interaction == "dynamic_conv":
            self.inst_interact = DynamicConv(d, cfg.dim_dynamic, cfg.pooler_resolution)
        elif cfg.interaction == "multihead_attention":
            self.inst_interact = AttentionInteraction(d, cfg.num_heads, cfg.dropout)
        else:
            raise ValueError(f"model.interaction must be 'dynamic_conv' or 'multihead_attention', got {cfg.interaction!r}")
        self.norm2 = nn.LayerNorm(d)
        self.dropout2 = nn.Dropout(cfg.dropout)
        self.linear1 = nn.Linear(d, cfg.dim_feedforward)
        self.dropout = nn.Dropout(cfg.dropout)
        self.linear2 = nn.Linear(cfg.dim_feedforward, d)
        self.norm3 = nn.LayerNorm(d)
        self.dropout3 = nn.Dropout(cfg.dropout)
        self.activation = build_activation(activation)
        self.cls_module = _tower(cfg.num_cls_layers, d, activation)
        self.reg_module = _tower(cfg.num_reg_layers, d, activation)
        self.class_logits = nn.Linear(d, num_logits)
        self.bboxes_delta = nn.Linear(d, 4)
        self.box_coder = box_coder

    def forward(self, roi_features: Tensor, proposal_features: Tensor, boxes: Tensor,
                attn_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        batch, num_proposals, dim = proposal_features.shape
        x = proposal_features
        if self.use_self_attention:
            # Attention runs among the N proposals of each image, never across images.
            attended = self.self_attn(x, x, x, attn_mask=attn_mask, need_weights=False)[0]
            x = self.norm1(x + self.dropout1(attended))
        x = x.reshape(batch * num_proposals, dim)
        x = self.norm2(x + self.dropout2(self.inst_interact(x, roi_features)))
        x = self.norm3(x + self.dropout3(self.linear2(self.dropout(self.activation(self.linear1(x))))))
        logits = self.class_logits(self.cls_module(x))
        deltas = self.bboxes_delta(self.reg_module(x))
        if self.box_format == "cxcywh":
            new_boxes = self.box_coder.decode_cxcywh(deltas, boxes.reshape(-1, 4))
        else:
            new_boxes = self.box_coder.decode(deltas, boxes.reshape(-1, 4))
        return (logits.view(batch, num_proposals, -1), new_boxes.view(batch, num_proposals, 4),
                x.view(batch, num_proposals, dim))


class DynamicHead(nn.Module):
    """K stages sharing one RoI pooler. Boxes are detached between stages; features are not."""

    def __init__(self, cfg: SparseRCNNConfig, levels: Sequence[int]):
        super().__init__()
        num_logits = cfg.num_classes if cfg.loss.use_focal else cfg.num_classes + 1
        box_coder = BoxCoder(cfg.box_weights, cfg.box_scale_clamp)
        self.pooler = MultiLevelRoIAlign(levels, cfg.pooler_resolution, cfg.pooler_sampling_ratio)
        self.head_series = nn.ModuleList(RCNNStage(cfg, num_logits, box_coder) for _ in range(cfg.num_stages))
        self.feature_reuse = cfg.feature_reuse
        self._reset_parameters(cfg)

    def _reset_parameters(self, cfg: SparseRCNNConfig) -> None:
        # Official init: xavier_uniform on every >= 2-D head parameter, PyTorch defaults elsewhere,
        # and a focal prior on the classifier bias. (The official code sets the prior on every
        # parameter whose last dim equals num_classes, a shape accident we do not copy.)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        if cfg.loss.use_focal:
            bias_value = -math.log((1 - cfg.loss.prior_prob) / cfg.loss.prior_prob)
            for stage in self.head_series:
                nn.init.constant_(stage.class_logits.bias, bias_value)
        if cfg.box_delta_init == "zero":
            # Opt-in (not official): every stage starts by passing its input boxes through unchanged.
            for stage in self.head_series:
                nn.init.zeros_(stage.bboxes_delta.weight)
                nn.init.zeros_(stage.bboxes_delta.bias)

    def forward(self, features: Sequence[Tensor], boxes: Tensor, proposal_features: Tensor) -> list[dict]:
        """
        Args:
            features: FPN maps in pooler level order, each (B, d, H_l, W_l).
            boxes: (B, N, 4) initial abs xyxy boxes.
            proposal_features: (B, N, d) initial proposal features.

        Returns:
            per stage ``{"pred_logits": (B, N, C'), "pred_boxes": (B, N, 4)}``.
        """
        outputs = []
        initial_features = proposal_features
        for stage in self.head_series:
            rois = self.pooler(features, list(boxes))
            rois = rois.flatten(2).transpose(1, 2)  # (B*N, S*S, d): position-major
            logits, new_boxes, object_features = stage(rois, proposal_features, boxes)
            outputs.append({"pred_logits": logits, "pred_boxes": new_boxes})
            boxes = new_boxes.detach()
            proposal_features = object_features if self.feature_reuse else initial_features
        return outputs
