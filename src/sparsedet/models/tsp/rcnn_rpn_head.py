"""TSP-RCNN's RPN head (official ``MyStandardRPNHead``, spec §3.2): two unshared branches of
[3x3 conv, BatchNorm, ReLU] layers, convs shared by all levels but one BatchNorm per level and layer."""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from ..dense.head import flatten_level


class TSPRPNHead(nn.Module):
    """Objectness branch -> 1x1 conv to A logits; deltas branch -> 1x1 conv to 4A deltas.

    Official names (converter ``tsp_rcnn``): ``obj_conv.{i}.conv`` -> ``objectness_convs.{i}``,
    ``anchor_conv.{i}.conv`` -> ``deltas_convs.{i}``, ``obj_bn_list.{level}.{i}`` -> ``objectness_norms.{level}.{i}``,
    ``anchor_bn_list`` -> ``deltas_norms``, ``objectness_logits`` and ``anchor_deltas`` unchanged.

    The BatchNorms use batch statistics in training (SyncBatchNorm when the trainer converts the
    model for DDP) and running statistics in eval. Init: 3x3 convs PyTorch default, the 1x1
    predictors N(0, 0.01) with bias 0.

    Args:
        in_channels: FPN channels (also the branch width).
        num_anchors: A per position.
        num_levels: RPN levels (one BatchNorm set each).
        num_convs: layers per branch (2).
    """

    def __init__(self, in_channels: int, num_anchors: int, num_levels: int, num_convs: int = 2):
        super().__init__()
        self.num_anchors = num_anchors

        def convs() -> nn.ModuleList:
            return nn.ModuleList(nn.Conv2d(in_channels, in_channels, 3, padding=1) for _ in range(num_convs))

        def norms() -> nn.ModuleList:
            return nn.ModuleList(nn.ModuleList(nn.BatchNorm2d(in_channels) for _ in range(num_convs))
                                 for _ in range(num_levels))

        self.objectness_convs, self.objectness_norms = convs(), norms()
        self.deltas_convs, self.deltas_norms = convs(), norms()
        self.objectness_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.anchor_deltas = nn.Conv2d(in_channels, 4 * num_anchors, 1)
        for predictor in (self.objectness_logits, self.anchor_deltas):
            nn.init.normal_(predictor.weight, std=0.01)
            nn.init.constant_(predictor.bias, 0.0)

    @staticmethod
    def _branch(x: Tensor, convs: nn.ModuleList, norms: nn.ModuleList) -> Tensor:
        for conv, norm in zip(convs, norms):
            x = norm(conv(x)).relu_()
        return x

    def forward(self, features: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """
        Args:
            features: per RPN level, (B, C, H_l, W_l).

        Returns:
            objectness: per level (B, H_l * W_l * A) logits, rows (y * W + x) * A + a.
            deltas: per level (B, H_l * W_l * A, 4).
        """
        if len(features) != len(self.objectness_norms):
            raise ValueError(f"TSPRPNHead has BatchNorms for {len(self.objectness_norms)} levels, got {len(features)}")
        objectness, deltas = [], []
        for level, feature in enumerate(features):
            obj = self._branch(feature, self.objectness_convs, self.objectness_norms[level])
            dlt = self._branch(feature, self.deltas_convs, self.deltas_norms[level])
            objectness.append(flatten_level(self.objectness_logits(obj), self.num_anchors, 1).squeeze(2))
            deltas.append(flatten_level(self.anchor_deltas(dlt), self.num_anchors, 4))
        return objectness, deltas
