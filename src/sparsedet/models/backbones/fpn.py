"""Feature pyramid network with configurable input stages, output levels and top block."""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

TOP_BLOCKS = ("none", "maxpool", "p6p7_from_c5", "p6p7_from_p5", "p6p7_bn_from_p5")


class ConvBN(nn.Module):
    """3x3 stride-2 conv (with bias, PyTorch default init) followed by BatchNorm, no activation."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


class LastLevelP6P7BN(ExtraFPNBlock):
    """TSP's "MYFPN" top block (tsp.md §1.3): ``P6 = BN(conv(P5))``, ``P7 = BN(conv(ReLU(P6)))``
    from the FPN *output* P5. The published P6 has no ReLU. The BatchNorm uses batch statistics in
    train mode (the trainer turns it into SyncBatchNorm under DDP with ``solver.sync_bn``);
    torchvision's ``LastLevelP6P7`` has no BN and is a different model. Module names
    ``p6.conv``/``p6.bn``/``p7.*`` follow the official ``top_block.*`` keys."""

    def __init__(self, channels: int):
        super().__init__()
        self.p6 = ConvBN(channels, channels)
        self.p7 = ConvBN(channels, channels)

    def forward(self, p: list[Tensor], c: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        p6 = self.p6(p[-1])
        p7 = self.p7(F.relu(p6))
        return p + [p6, p7], names + ["p6", "p7"]


class FPN(FeaturePyramidNetwork):
    """torchvision's ``FeaturePyramidNetwork`` (lateral 1x1 + top-down nearest x2 + output 3x3,
    convs with bias, kaiming_uniform(a=1) init = detectron2's c2_xavier_fill) keyed by level.

    Args:
        in_stages: backbone stages consumed, e.g. (2, 3, 4, 5) for C2..C5.
        in_channels: their channel counts.
        channels: output channels.
        out_levels: levels returned; any level above ``max(in_stages)`` must come from ``top_block``.
        top_block: see ``TOP_BLOCKS``; ``p6p7_bn_from_p5`` is TSP's conv + BatchNorm block.
    """

    def __init__(self, in_stages: Sequence[int], in_channels: Sequence[int], channels: int,
                 out_levels: Sequence[int], top_block: str = "none"):
        extra = None
        made = list(in_stages)
        if top_block == "maxpool":
            extra = LastLevelMaxPool()
            made.append(made[-1] + 1)
        elif top_block in ("p6p7_from_c5", "p6p7_from_p5"):
            source_channels = channels if top_block == "p6p7_from_p5" else in_channels[-1]
            if top_block == "p6p7_from_c5" and source_channels == channels:
                raise ValueError("p6p7_from_c5 needs C5 channels != FPN channels (torchvision picks P5 otherwise)")
            extra = LastLevelP6P7(source_channels, channels)
            made += [made[-1] + 1, made[-1] + 2]
        elif top_block == "p6p7_bn_from_p5":
            extra = LastLevelP6P7BN(channels)
            made += [made[-1] + 1, made[-1] + 2]
        missing = [lvl for lvl in out_levels if lvl not in made]
        if missing:
            raise ValueError(f"FPN levels {missing} are not produced by in_stages={list(in_stages)} "
                             f"with top_block={top_block!r} (it makes P{min(made)}..P{max(made)})")
        super().__init__(list(in_channels), channels, extra_blocks=extra)
        self.in_stages = tuple(in_stages)
        self.out_levels = tuple(out_levels)
        self.channels = channels
        self.made_levels = tuple(made)

    def forward(self, features: "OrderedDict[str, Tensor]") -> "OrderedDict[str, Tensor]":
        """``{"c2": ..., "c5": ...}`` -> ``{"p2": ..., ...}`` restricted to ``out_levels``."""
        selected = OrderedDict((f"c{s}", features[f"c{s}"]) for s in self.in_stages)
        outputs = list(super().forward(selected).values())
        by_level = dict(zip(self.made_levels, outputs))
        return OrderedDict((f"p{lvl}", by_level[lvl]) for lvl in self.out_levels)
