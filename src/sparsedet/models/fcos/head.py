"""The FCOS head: a class tower and a box tower (ltrb + centerness); GroupNorm optional."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from ...layers.conv_tower import ConvTower


class FCOSHead(nn.Module):
    """``cls_tower``: num_convs x (3x3 conv + ReLU) -> 3x3 conv to K logits;
    ``box_tower``: same depth, separate weights -> two 3x3 predictors on the same trunk: 4 raw box
    outputs and 1 centerness logit (centerness on the regression branch, as AdelaiDet).

    **No GroupNorm** by default, unlike the published FCOS: GN normalises with statistics of the whole
    feature map, so a head evaluated on a sparse set of positions (Cascade Sparse Query, spec §5.1) could
    not reproduce them. Without norm layers every output depends only on a (2 * num_convs + 3)^2 window,
    and the sparse towers of ``sparsedet.models.csq`` compute exactly the dense values given enough
    context. ``norm_groups`` > 0 puts the published head's GroupNorm after every tower conv (dense only).

    Box outputs become ltrb distances in pixels with a learnable scalar ``scales[i]`` per level (FCOS's
    ``Scale`` module, which lets the shared predictor serve every stride):
    * ``relu`` (default, FCOS's ``norm_reg_targets``): ltrb = relu(scale * x) * stride. The regression
      target is in units of the stride, so every level predicts numbers of the same magnitude.
    * ``exp`` (FCOS paper): ltrb = exp(scale * x), positive by construction.
    The (G)IoU losses are scale-invariant, so computing them in pixels equals AdelaiDet's stride units.

    Init (FCOS): every conv N(0, 0.01), bias 0; the class bias -log((1 - prior) / prior); scales 1.
    """

    def __init__(self, in_channels: int, num_classes: int, strides: Sequence[int], num_convs: int = 4,
                 prior_prob: float = 0.01, box_activation: str = "relu", norm_groups: int = 0):
        super().__init__()
        if box_activation not in ("relu", "exp"):
            raise ValueError(f"box_activation must be 'relu' or 'exp', got {box_activation!r}")
        self.num_classes = num_classes
        self.strides = tuple(int(s) for s in strides)
        self.box_activation = box_activation
        self.cls_tower = ConvTower(in_channels, num_convs, (num_classes,), norm_groups=norm_groups)
        self.box_tower = ConvTower(in_channels, num_convs, (4, 1), norm_groups=norm_groups)
        self.scales = nn.Parameter(torch.ones(len(self.strides)))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.constant_(module.bias, 0.0)
        nn.init.constant_(self.cls_tower.predictors[0].bias, -math.log((1.0 - prior_prob) / prior_prob))

    def box_distances(self, raw: Tensor, level_index: int) -> Tensor:
        """Raw box-predictor outputs (..., 4) of level ``level_index`` -> ltrb pixels (..., 4). Used by
        both the dense path and the sparse (CSQ) rows, so both decode identically."""
        x = raw * self.scales[level_index]
        if self.box_activation == "exp":
            return x.float().exp()
        return x.float().relu() * self.strides[level_index]

    def forward(self, features: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """
        Args:
            features: per level (in ``strides`` order), (B, C, H_l, W_l).

        Returns (rows ordered y * W + x per image):
            logits: per level, (B, H_l * W_l, K) class logits.
            ltrb: per level, (B, H_l * W_l, 4) distances in pixels (fp32).
            centerness: per level, (B, H_l * W_l) centerness logits.
        """
        if len(features) != len(self.strides):
            raise ValueError(f"got {len(features)} feature maps for {len(self.strides)} levels")
        logits, ltrb, centerness = [], [], []
        for i, feature in enumerate(features):
            (cls,) = self.cls_tower(feature)
            box, ctr = self.box_tower(feature)
            logits.append(cls.flatten(2).transpose(1, 2))
            ltrb.append(self.box_distances(box.flatten(2).transpose(1, 2), i))
            centerness.append(ctr.flatten(1))
        return logits, ltrb, centerness
