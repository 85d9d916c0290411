"""AdaMixer's adaptive mixing (spec §3.2 steps 2-3): per-query generated channel and spatial mixing
of the sampled points, and the module that combines it with 3-D sampling.

Attribute names follow the official keys ``sampling_n_mixing.{sampling_offset_generator.0, norm,
adaptive_mixing.parameter_generator.0, adaptive_mixing.out_proj}``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .sampling_3d import make_sample_points, sampling_3d
from ...layers.activation import build_activation

__all__ = ["AdaptiveMixing", "AdaptiveSamplingMixing"]


class AdaptiveMixing(nn.Module):
    """Mixes the sampled features of each query with weights generated from the query.

    Per query and group, ``parameter_generator`` produces M (c x c, row-major in x out, c = C/G)
    followed by S (P_out x P_in). With x the (P_in, c) samples:
    ``x = act(LN(x @ M)); x = act(LN(S @ x))`` (LayerNorms over the whole matrix, no affine),
    then the (G, P_out, c) result is flattened and projected back to the query width by
    ``out_proj``, and added to the query (residual).
    """

    def __init__(self, in_dim: int = 256, in_points: int = 32, out_points: int = 128, num_groups: int = 4,
                 query_dim: int = 256, activation: str = "gelu"):
        super().__init__()
        self.num_groups = num_groups
        self.group_dim = in_dim // num_groups
        self.in_points, self.out_points = in_points, out_points
        self.m_parameters = self.group_dim * self.group_dim
        self.s_parameters = in_points * out_points
        self.parameter_generator = nn.Sequential(
            nn.Linear(query_dim, num_groups * (self.m_parameters + self.s_parameters)))
        self.out_proj = nn.Linear(self.group_dim * out_points * num_groups, query_dim)
        self.act1 = build_activation(activation)
        self.act2 = build_activation(activation)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # Zero generator weight: at init every query mixes with the same (bias-only) parameters.
        nn.init.zeros_(self.parameter_generator[-1].weight)

    def forward(self, sampled: Tensor, query: Tensor) -> Tensor:
        """(B, Q, G, P_in, c) samples, (B, Q, d) query -> (B, Q, d) ``query + mixed``."""
        batch, num_queries, groups, points, channels = sampled.shape
        per_group = self.m_parameters + self.s_parameters
        params = self.parameter_generator(query).reshape(batch * num_queries, groups, per_group)
        m, s = params.split([self.m_parameters, self.s_parameters], dim=2)
        m = m.reshape(batch * num_queries, groups, channels, channels)
        s = s.reshape(batch * num_queries, groups, self.out_points, points)
        x = sampled.reshape(batch * num_queries, groups, points, channels)
        x = torch.matmul(x, m)                                                   # channel mixing
        x = self.act1(F.layer_norm(x, _static(x.shape[-2:])))
        x = torch.matmul(s, x)                                                   # spatial mixing
        x = self.act2(F.layer_norm(x, _static(x.shape[-2:])))
        return query + self.out_proj(x.reshape(batch, num_queries, self.out_proj.in_features))


def _static(shape) -> list[int]:
    """Python ints of fixed dims (points, channels): an ONNX trace needs a constant normalised shape."""
    return [int(v) for v in shape]


class AdaptiveSamplingMixing(nn.Module):
    """Offsets from the query -> 3-D sampling over the pyramid -> adaptive mixing -> LayerNorm.

    Args:
        in_points, out_points: P_in sampled / P_out mixed points per group (32 / 128).
        num_groups: G (4).
        content_dim: query width d; feature maps must have d channels too.
        strides: pixel stride of each feature level (4, 8, 16, 32).
        tau: level temperature of the 3-D sampling (2).
    """

    def __init__(self, in_points: int = 32, out_points: int = 128, num_groups: int = 4, content_dim: int = 256,
                 activation: str = "gelu", strides: Sequence[int] = (4, 8, 16, 32), tau: float = 2.0):
        super().__init__()
        self.in_points, self.num_groups = in_points, num_groups
        self.strides = tuple(strides)
        self.tau = tau
        self.sampling_offset_generator = nn.Sequential(nn.Linear(content_dim, in_points * num_groups * 3))
        self.norm = nn.LayerNorm(content_dim)
        self.adaptive_mixing = AdaptiveMixing(content_dim, in_points, out_points, num_groups, content_dim, activation)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Zero offset weight; bias U(-0.5, 0.5) for (dx, dy) and -1 for dz (one level finer)."""
        linear = self.sampling_offset_generator[-1]
        nn.init.zeros_(linear.weight)
        bias = linear.bias.view(self.num_groups, self.in_points, 3)
        nn.init.uniform_(bias, -0.5, 0.5)
        nn.init.constant_(bias[:, :, 2:3], -1.0)
        self.adaptive_mixing.reset_parameters()

    def forward(self, features: Sequence[Tensor], query: Tensor, xyzr: Tensor) -> Tensor:
        """P2..P5 maps (B, d, H_l, W_l), (B, Q, d) query, (B, Q, 4) xyzr -> (B, Q, d)."""
        if len(features) != len(self.strides):
            raise ValueError(f"AdaMixer sampling expects {len(self.strides)} feature maps (strides {self.strides}), "
                             f"got {len(features)}")
        if features[0].shape[1] % self.num_groups:
            raise ValueError(f"AdaMixer sampling: {features[0].shape[1]} feature channels do not split into "
                             f"{self.num_groups} groups")
        points = make_sample_points(self.sampling_offset_generator(query), xyzr)
        sampled = sampling_3d(points, features, self.strides, self.num_groups, self.tau)
        return self.norm(self.adaptive_mixing(sampled, query))
