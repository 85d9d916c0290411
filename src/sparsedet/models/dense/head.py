"""The RetinaNet detection head: a class tower and a box tower shared by every pyramid level."""
from __future__ import annotations

import math
from typing import Sequence

from torch import Tensor, nn

from ...layers.conv_tower import ConvTower


def level_view(x: Tensor, num_anchors: int, channels_per_anchor: int) -> Tensor:
    """(B, A * C, H, W) predictor output -> (B, H, W, A, C) view of the same memory (no copy).

    Channel ``a * C + c`` belongs to anchor a, class/coordinate c (detectron2 layout), so the view
    is (B, A, C, H, W) and the permute puts positions first, then anchors.
    """
    b, _, h, w = x.shape
    return x.view(b, num_anchors, channels_per_anchor, h, w).permute(0, 3, 4, 1, 2)


def flatten_level(x: Tensor, num_anchors: int, channels_per_anchor: int) -> Tensor:
    """(B, A * C, H, W) predictor output -> (B, H * W * A, C) rows ordered (y * W + x) * A + a
    (``level_view`` copied to rows)."""
    return level_view(x, num_anchors, channels_per_anchor).reshape(x.shape[0], -1, channels_per_anchor)


class RetinaNetHead(nn.Module):
    """``cls_tower``: num_convs x (3x3 conv + ReLU) -> 3x3 conv to A * K logits;
    ``box_tower``: same depth, separate weights -> 3x3 conv to A * 4 deltas (dx, dy, dw, dh).

    No normalisation layers (official QueryDet/RetinaNet: ``HEAD_BN=False``), which is what lets
    Cascade Sparse Query run these exact modules on a sparse set of positions.

    Init (spec §1.3): every conv N(0, 0.01), bias 0; the class predictor's bias is
    ``-log((1 - prior_prob) / prior_prob)`` so that every anchor starts at probability prior_prob
    (otherwise the focal loss of the ~100k background anchors swamps the first iterations).
    """

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, num_convs: int = 4,
                 prior_prob: float = 0.01):
        super().__init__()
        self.num_anchors = num_anchors
        self.num_classes = num_classes
        self.cls_tower = ConvTower(in_channels, num_convs, (num_anchors * num_classes,))
        self.box_tower = ConvTower(in_channels, num_convs, (num_anchors * 4,))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.constant_(module.bias, 0.0)
        nn.init.constant_(self.cls_tower.predictors[0].bias, -math.log((1.0 - prior_prob) / prior_prob))

    def forward(self, features: Sequence[Tensor], flatten: bool = True) -> tuple[list[Tensor], list[Tensor]]:
        """
        Args:
            features: per level, (B, C, H_l, W_l).
            flatten: False = return the (B, H_l, W_l, A, C) views of the conv outputs instead of
                row copies (the training losses read them in place).

        Returns:
            logits: per level, (B, H_l * W_l * A, K) (or (B, H_l, W_l, A, K)).
            deltas: per level, (B, H_l * W_l * A, 4) (or (B, H_l, W_l, A, 4)).
        """
        to_rows = flatten_level if flatten else level_view
        logits, deltas = [], []
        for feature in features:
            logits.append(to_rows(self.cls_tower(feature)[0], self.num_anchors, self.num_classes))
            deltas.append(to_rows(self.box_tower(feature)[0], self.num_anchors, 4))
        return logits, deltas


def init_query_tower(tower: ConvTower) -> None:
    """QueryDet's query head init: Xavier-normal weights and zero bias for every conv (the
    official ``pred_prior`` argument is never used, so no prior-probability bias)."""
    for module in tower.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.xavier_normal_(module.weight)
            nn.init.constant_(module.bias, 0.0)


