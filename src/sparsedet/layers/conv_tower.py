"""Convolutional head towers shared by the dense detectors (RetinaNet, FCOS, RPN, QueryDet).

A tower is ``num_convs`` x (3x3 conv + ReLU) followed by one or more predictor convs that read
the same trunk. Keeping the layers as plain ``nn.Conv2d`` modules lets the sparse heads of
Cascade Sparse Query (``sparsedet.layers.sparse_conv``) re-use the dense weights as they are.
An optional GroupNorm after each trunk conv (the published FCOS head) is for dense-only models.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn


class ConvTower(nn.Module):
    """Trunk of 3x3 convs with ReLU, then predictors on the trunk's output.

    Args:
        in_channels: channels of the input feature map.
        num_convs: trunk depth (RetinaNet: 4).
        out_channels: one entry per predictor, e.g. ``(A * K,)`` for a class tower or
            ``(A * 4, 1)`` for a box tower with a centerness output.
        hidden_channels: trunk width (default ``in_channels``).
        predictor_kernel_size: 3 (RetinaNet, FCOS) or 1 (an RPN's 1x1 predictors).
        norm_groups: 0 (default) = no normalisation; G > 0 = GroupNorm(G) between each trunk conv
            and its ReLU (``norms``). GroupNorm statistics span the whole map, so a sparse
            evaluation (Cascade Sparse Query) cannot reproduce them: dense-only models.

    ``forward(x (B, in_channels, H, W))`` returns a list with one ``(B, out_channels[i], H, W)``
    tensor per predictor.
    """

    def __init__(self, in_channels: int, num_convs: int, out_channels: Sequence[int],
                 hidden_channels: int | None = None, predictor_kernel_size: int = 3, norm_groups: int = 0):
        super().__init__()
        hidden = hidden_channels or in_channels
        self.subnet = nn.ModuleList(
            nn.Conv2d(in_channels if i == 0 else hidden, hidden, 3, padding=1) for i in range(num_convs))
        self.norms = nn.ModuleList(nn.GroupNorm(norm_groups, hidden) for _ in range(num_convs if norm_groups else 0))
        trunk_out = hidden if num_convs else in_channels
        self.predictors = nn.ModuleList(
            nn.Conv2d(trunk_out, c, predictor_kernel_size, padding=predictor_kernel_size // 2)
            for c in out_channels)

    def trunk(self, x: Tensor) -> Tensor:
        for i, conv in enumerate(self.subnet):
            x = conv(x)
            if self.norms:
                x = self.norms[i](x)
            x = x.relu_()
        return x

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.trunk(x)
        return [predictor(x) for predictor in self.predictors]
