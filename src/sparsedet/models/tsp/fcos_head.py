"""TSP-FCOS feature-extraction subnets (tsp.md §2.2): two GroupNorm conv towers and the FoI classifier."""
from __future__ import annotations

import math
from typing import Sequence

from torch import Tensor, nn


def gn_tower(channels: int, num_convs: int, num_groups: int) -> nn.Sequential:
    """``num_convs`` x [3x3 conv with bias, GroupNorm, ReLU]; Sequential indices 0, 3, 6, ... are the
    convs and 1, 4, 7, ... the norms, as the official ``fcos_head.cls_tower.*`` keys."""
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(num_groups, channels), nn.ReLU()]
    return nn.Sequential(*layers)


class TSPFCOSHead(nn.Module):
    """``cls_tower`` and ``bbox_tower`` (the paper's classification and auxiliary subnets, shared by
    every level) and ``cls_logits``, a 3x3 conv to K logits on the cls tower: the FoI classifier.

    The bbox tower has no predictor of its own: its output is the second half of every encoder
    token, so it learns only through the transformer.

    Init (official): every conv N(0, 0.01), bias 0; ``cls_logits`` bias -log((1 - p) / p).

    ``forward(features)`` with per level (B, C, H_l, W_l) returns three per-level lists:
    cls-tower features (B, C, H_l, W_l), bbox-tower features (B, C, H_l, W_l), FoI logits (B, K, H_l, W_l).
    """

    def __init__(self, channels: int, num_classes: int, num_convs: int = 4, num_groups: int = 32,
                 prior_prob: float = 0.01):
        super().__init__()
        self.cls_tower = gn_tower(channels, num_convs, num_groups)
        self.bbox_tower = gn_tower(channels, num_convs, num_groups)
        self.cls_logits = nn.Conv2d(channels, num_classes, 3, padding=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.constant_(module.bias, 0.0)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, features: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        cls_feats, box_feats, logits = [], [], []
        for feature in features:
            cls = self.cls_tower(feature)
            cls_feats.append(cls)
            box_feats.append(self.bbox_tower(feature))
            logits.append(self.cls_logits(cls))
        return cls_feats, box_feats, logits
