"""Deformable-DETR neck: input projections + a 6-layer deformable encoder (beside the FPN).

    C3, C4, C5 --1x1 conv + GroupNorm--> 3 maps of ``channels``
    C5 --3x3/2 conv + GroupNorm--> one extra level (stride 64)
    each level: tokens + (sine 2-D position + level embedding) -> encoder layers -> E3..E6

The output maps keep the input layout (B, channels, H_l, W_l), strides 8/16/32/64, so that RoIAlign
and the ASAG anchor generator read them like FPN levels. Padding: the per-level masks come from the
un-padded image sizes; padded cells give no value to the attention, reference points are scaled
by the valid ratios and positions are normalised by the valid extent (Deformable DETR). As there,
the GroupNorm statistics and the convolutions near the image border still see the padding.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from ...config import ConfigError
from ...layers.deformable_attention import flatten_levels
from ...layers.deformable_transformer import (DeformableEncoderLayer, encoder_reference_points,
                                              level_padding_mask, sine_map_position, valid_ratios)
from .build import BackboneConfig, build_body, load_body_weights

__all__ = ["DeformableEncoderConfig", "DeformableEncoderNeck", "BackboneWithDeformableEncoder",
           "build_deformable_backbone"]


@dataclass
class DeformableEncoderConfig:
    """``model.encoder``: the deformable encoder neck (Deformable DETR's defaults).

    Attributes:
        in_stages: backbone stages projected to the first levels (3, 4, 5 = C3..C5, strides 8..32).
        num_levels: levels in all (4): the ``in_stages`` ones, then stride-2 3x3 conv + GroupNorm
            levels from the last stage's output (the first) or the previous extra level.
        channels: width of every level and of the encoder (256).
        num_layers: encoder layers (6; 0 = projections only).
        num_heads, num_points: deformable attention heads and points per head and level (8 / 4).
        dim_feedforward: encoder FFN width (1024).
        dropout: encoder dropout (0.1).
        activation: encoder FFN activation (``relu``).
        norm_groups: GroupNorm groups of the projections (32); must divide ``channels``.
    """

    in_stages: tuple = (3, 4, 5)
    num_levels: int = 4
    channels: int = 256
    num_layers: int = 6
    num_heads: int = 8
    num_points: int = 4
    dim_feedforward: int = 1024
    dropout: float = 0.1
    activation: str = "relu"
    norm_groups: int = 32

    def __post_init__(self):
        if self.num_levels < len(self.in_stages):
            raise ConfigError(f"model.encoder.num_levels ({self.num_levels}) must be >= the number of "
                              f"model.encoder.in_stages {list(self.in_stages)}")
        if self.channels % self.norm_groups:
            raise ConfigError(f"model.encoder.norm_groups ({self.norm_groups}) must divide "
                              f"model.encoder.channels ({self.channels})")
        if self.channels % self.num_heads:
            raise ConfigError(f"model.encoder.num_heads ({self.num_heads}) must divide "
                              f"model.encoder.channels ({self.channels})")

    @property
    def strides(self) -> tuple[int, ...]:
        """Pixel strides of the output levels, e.g. (8, 16, 32, 64)."""
        first = 2 ** self.in_stages[0]
        return tuple(first * 2 ** k for k in range(self.num_levels))


class DeformableEncoderNeck(nn.Module):
    """Args:
        in_channels: channels of the backbone stages in ``cfg.in_stages``.
        cfg: see :class:`DeformableEncoderConfig`.

    ``forward(stages, image_sizes)``: ``stages`` = {"c3": (B, C3, H/8, W/8), ...}, ``image_sizes``
    (B, 2) un-padded (h, w) -> OrderedDict ``e3``.. (B, channels, H_l, W_l).
    """

    def __init__(self, in_channels: Sequence[int], cfg: DeformableEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.in_stages = tuple(cfg.in_stages)
        self.strides = cfg.strides
        self.channels = cfg.channels
        d, groups = cfg.channels, cfg.norm_groups
        projections = [nn.Sequential(nn.Conv2d(c, d, kernel_size=1), nn.GroupNorm(groups, d)) for c in in_channels]
        source = in_channels[-1]
        for _ in range(cfg.num_levels - len(in_channels)):
            projections.append(nn.Sequential(nn.Conv2d(source, d, kernel_size=3, stride=2, padding=1),
                                             nn.GroupNorm(groups, d)))
            source = d
        self.input_proj = nn.ModuleList(projections)
        self.level_embed = nn.Parameter(torch.empty(cfg.num_levels, d))
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(d, cfg.dim_feedforward, cfg.dropout, cfg.activation, cfg.num_levels,
                                   cfg.num_heads, cfg.num_points) for _ in range(cfg.num_layers))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Deformable DETR's init: xavier_uniform projection convs with zero bias, N(0, 1) level
        embeddings (the attention modules initialise themselves)."""
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        nn.init.normal_(self.level_embed)

    def forward(self, stages: "OrderedDict[str, Tensor]", image_sizes: Tensor) -> "OrderedDict[str, Tensor]":
        maps = [proj(stages[f"c{s}"]) for proj, s in zip(self.input_proj, self.in_stages)]
        last = stages[f"c{self.in_stages[-1]}"]
        for proj in self.input_proj[len(self.in_stages):]:
            last = proj(last)
            maps.append(last)
        masks = [level_padding_mask(image_sizes, m.shape[-2:], s) for m, s in zip(maps, self.strides)]
        positions = [sine_map_position(mask, self.channels).to(m.dtype) + self.level_embed[k].view(1, -1, 1, 1)
                     for k, (mask, m) in enumerate(zip(masks, maps))]
        tokens, spatial_shapes, starts = flatten_levels(maps)
        pos = flatten_levels(positions)[0]
        padding = torch.cat([m.flatten(1) for m in masks], 1)
        ratios = torch.stack([valid_ratios(m) for m in masks], 1)                  # (B, L, 2)
        shapes = [tuple(m.shape[-2:]) for m in maps]
        reference = encoder_reference_points(shapes, ratios).to(tokens.dtype)
        for layer in self.layers:
            tokens = layer(tokens, pos, reference, spatial_shapes, starts, padding)
        out = OrderedDict()
        for k, ((h, w), start) in enumerate(zip(shapes, starts.tolist())):
            level = self.in_stages[0] + k
            out[f"e{level}"] = tokens[:, start:start + h * w].transpose(1, 2).reshape(tokens.shape[0], -1, h, w)
        return out


class BackboneWithDeformableEncoder(nn.Module):
    """Body + deformable encoder neck. ``forward(x (B, 3, H, W), image_sizes (B, 2) (h, w))``
    returns OrderedDict ``e3``..``e6``: (B, channels, H/stride, W/stride) (strides 8..64)."""

    def __init__(self, body: nn.Module, neck: DeformableEncoderNeck):
        super().__init__()
        self.body = body
        self.neck = neck
        self.out_channels = neck.channels
        self.strides = neck.strides

    def forward(self, x: Tensor, image_sizes: Tensor) -> "OrderedDict[str, Tensor]":
        return self.neck(self.body(x), image_sizes)


def build_deformable_backbone(backbone: BackboneConfig, encoder: DeformableEncoderConfig) -> BackboneWithDeformableEncoder:
    """ResNet / MobileNetV2 body (``model.backbone``) + deformable encoder (``model.encoder``)."""
    body = build_body(backbone)
    lacking = [s for s in encoder.in_stages if f"c{s}" not in body.out_channels]
    if lacking:
        raise ConfigError(f"model.encoder.in_stages names stages {lacking} that backbone {backbone.name} does not have "
                          f"(it has {sorted(body.out_channels)})")
    neck = DeformableEncoderNeck([body.out_channels[f"c{s}"] for s in encoder.in_stages], encoder)
    if backbone.weights:
        load_body_weights(body, backbone)
    return BackboneWithDeformableEncoder(body, neck)
