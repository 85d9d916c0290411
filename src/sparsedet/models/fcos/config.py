"""``model:`` section of an FCOS / QueryDet-FCOS config (spec §5.1 [proposal]).

``fcos``: FCOS (Tian et al., ICCV 2019) on P3..P7 as AdelaiDet's ``FCOS_R_50_1x`` trains it, minus
GroupNorm in the head. ``querydet_fcos``: the same detector on P2..P7 with QueryDet's re-balanced level
weights and a query head on P3/P4 (paper table 8), so that inference can run P3/P2 sparsely.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from ...config import ConfigError
from ..backbones import BackboneConfig, FPNConfig
from ..csq import CSQConfig
from ..dense.config import DenseTestConfig
from ..querydet.config import COCO_LEVEL_WEIGHTS, QueryHeadConfig, check_querydet_config

BOX_ACTIVATIONS = ("relu", "exp")
BOX_LOSSES = ("giou", "iou")


@dataclass
class FCOSFPNConfig(FPNConfig):
    """``model.fpn`` with FCOS's defaults: C3..C5 -> P3..P7, P6/P7 from P5 (AdelaiDet)."""

    in_stages: tuple = (3, 4, 5)
    out_levels: tuple = (3, 4, 5, 6, 7)
    channels: int = 256
    top_block: str = "p6p7_from_p5"


@dataclass
class FCOSHeadConfig:
    """``model.head``: the class tower and the box tower (ltrb + centerness predictors).

    Attributes:
        num_convs: 3x3 conv + ReLU layers per tower (FCOS: 4).
        norm_groups: 0 = no GroupNorm (QueryDet's head; needed by Cascade Sparse Query, see
            ``FCOSHead``); G > 0 = GroupNorm(G) after every tower conv, as the published FCOS (32).
        prior_prob: initial foreground probability of every position (class predictor bias).
        box_activation: how the raw box output x of level l (stride s) becomes ltrb pixels:
            ``relu``: relu(scale_l * x) * s (FCOS's ``norm_reg_targets``, AdelaiDet default);
            ``exp``: exp(scale_l * x) (the original FCOS paper). scale_l is a learnable scalar per level.
    """

    num_convs: int = 4
    norm_groups: int = 0
    prior_prob: float = 0.01
    box_activation: str = "relu"


@dataclass
class FCOSTargetConfig:
    """``model.targets``: which GT a position regresses (FCOS assignment).

    Attributes:
        regression_ranges: per detection level [low, high] in pixels: a position is a candidate for a GT
            iff max(l, t, r, b) lies in [low, high]. ``null`` = FCOS's rule: level l gets [2^(l+2), 2^(l+3)]
            with the first level starting at 0 and the last ending at infinity (P3..P7: 0/64/128/256/
            512/inf; P2..P7: 0/32/64/128/256/512/inf). Write infinity as ``.inf`` in YAML.
        center_sampling_radius: a position is a candidate only inside the GT box shrunk to
            [centre +- radius * stride] (AdelaiDet 1.5); 0 = anywhere inside the box (original FCOS).
    """

    regression_ranges: Optional[tuple] = None
    center_sampling_radius: float = 1.5


@dataclass
class FCOSLossConfig:
    """``model.loss``: FCOS losses, each level's sums multiplied by beta_l.

    Attributes:
        focal_alpha, focal_gamma: sigmoid focal loss of the classifier (0.25, 2.0), summed, / #positives.
        box_loss: ``giou`` (AdelaiDet) or ``iou`` (-log IoU, the FCOS paper) on the ltrb boxes of the
            positives, weighted by their centerness target and divided by the sum of those weights.
        level_loss_weights: beta_l per detection level, ``null`` = 1.0 everywhere (FCOS). QueryDet-FCOS
            uses QueryDet's COCO values [1.0, 1.4, 2.1, 2.5, 2.9, 3.2] (spec §5.1: "beta_l as RetinaNet").
    """

    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    box_loss: str = "giou"
    level_loss_weights: Optional[tuple] = None


@dataclass
class FCOSTestConfig(DenseTestConfig):
    """``model.test`` with FCOS's defaults (AdelaiDet): score = sqrt(sigmoid(cls) * sigmoid(ctr)) must be
    > 0.05; top 1000 per level; class-aware NMS 0.6; 100 per image."""

    score_threshold: float = 0.05
    nms_threshold: float = 0.6
    max_detections: int = 100


@dataclass
class FCOSNoQueryConfig(QueryHeadConfig):
    """``model.query`` of plain FCOS: no query head by default."""

    levels: tuple = ()
    small_object_bounds: tuple = ()
    radius_scale: tuple = ()


@dataclass
class FCOSConfig:
    """``model:`` of an FCOS config.

    Attributes:
        name: ``fcos``.
        num_classes: K foreground classes.
        backbone, fpn: ``BackboneConfig`` / ``FPNConfig``; the head runs on every ``fpn.out_levels`` level.
        input_format, pixel_mean, pixel_std: ``null`` = the convention of ``backbone.layout``.
        size_divisor: batches are padded to a multiple of this (32; keeps P_l exactly 2x P_(l+1) for CSQ).
        head: ``FCOSHeadConfig``; targets: ``FCOSTargetConfig``; loss: ``FCOSLossConfig``;
        test: ``FCOSTestConfig``.
        query: ``QueryHeadConfig`` (QueryDet's query head, targets and loss; ``levels: []`` = none).
        csq: ``CSQConfig`` (Cascade Sparse Query at inference; needs query levels).
    """

    name: str = "fcos"
    num_classes: int = 80
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    fpn: FCOSFPNConfig = field(default_factory=FCOSFPNConfig)
    input_format: Optional[str] = None
    pixel_mean: Optional[tuple] = None
    pixel_std: Optional[tuple] = None
    size_divisor: int = 32
    head: FCOSHeadConfig = field(default_factory=FCOSHeadConfig)
    targets: FCOSTargetConfig = field(default_factory=FCOSTargetConfig)
    loss: FCOSLossConfig = field(default_factory=FCOSLossConfig)
    test: FCOSTestConfig = field(default_factory=FCOSTestConfig)
    query: QueryHeadConfig = field(default_factory=FCOSNoQueryConfig)
    csq: CSQConfig = field(default_factory=CSQConfig)


@dataclass
class QueryDetFCOSFPNConfig(FCOSFPNConfig):
    """``model.fpn`` of QueryDet-FCOS: C2..C5 -> P2..P7."""

    in_stages: tuple = (2, 3, 4, 5)
    out_levels: tuple = (2, 3, 4, 5, 6, 7)


@dataclass
class QueryDetFCOSLossConfig(FCOSLossConfig):
    """``model.loss`` of QueryDet-FCOS: QueryDet's COCO level weights."""

    level_loss_weights: Optional[tuple] = COCO_LEVEL_WEIGHTS


@dataclass
class QueryDetFCOSConfig(FCOSConfig):
    """``model:`` of a QueryDet-FCOS config: ``FCOSConfig`` with P2..P7, QueryDet's level weights and a
    query head on P3/P4 (small bounds 32/64 = the minimum regression range of P3/P4, spec §2.2).

    Attributes:
        name: ``querydet_fcos``.
    """

    name: str = "querydet_fcos"
    fpn: QueryDetFCOSFPNConfig = field(default_factory=QueryDetFCOSFPNConfig)
    loss: QueryDetFCOSLossConfig = field(default_factory=QueryDetFCOSLossConfig)
    query: QueryHeadConfig = field(default_factory=QueryHeadConfig)


def default_regression_ranges(levels) -> tuple:
    """FCOS's ranges for consecutive ``levels``: [2^(l+2), 2^(l+3)], first from 0, last to infinity."""
    levels = list(levels)
    ranges = [[float(2 ** (lvl + 2)), float(2 ** (lvl + 3))] for lvl in levels]
    ranges[0][0] = 0.0
    ranges[-1][1] = math.inf
    return tuple(tuple(r) for r in ranges)


def check_fcos_config(cfg: FCOSConfig) -> None:
    """Raises ``ConfigError`` naming the field when the sections of ``cfg`` do not fit together."""
    levels = tuple(cfg.fpn.out_levels)
    if not levels:
        raise ConfigError("model.fpn.out_levels is empty: the FCOS head needs at least one level")
    if cfg.num_classes < 1:
        raise ConfigError(f"model.num_classes must be >= 1, got {cfg.num_classes}")
    if cfg.head.box_activation not in BOX_ACTIVATIONS:
        raise ConfigError(f"model.head.box_activation must be one of {BOX_ACTIVATIONS}, got {cfg.head.box_activation!r}")
    if not 0.0 < cfg.head.prior_prob < 1.0:
        raise ConfigError(f"model.head.prior_prob must be in (0, 1), got {cfg.head.prior_prob}")
    channels, groups = int(cfg.fpn.channels), int(cfg.head.norm_groups)
    if groups < 0 or (groups and channels % groups):
        raise ConfigError(f"model.head.norm_groups must be 0 or divide model.fpn.channels ({channels}), got {groups}")
    if groups and cfg.csq.enabled:
        raise ConfigError("model.csq.enabled needs model.head.norm_groups=0: GroupNorm statistics span the whole "
                          "feature map, which a sparse evaluation cannot reproduce")
    ranges = cfg.targets.regression_ranges
    if ranges is not None:
        if len(ranges) != len(levels):
            raise ConfigError(f"model.targets.regression_ranges has {len(ranges)} entries but model.fpn.out_levels "
                              f"has {len(levels)} levels {list(levels)}: give one [low, high] per level")
        for i, r in enumerate(ranges):
            if len(r) != 2 or not float(r[0]) < float(r[1]):
                raise ConfigError(f"model.targets.regression_ranges[{i}] must be [low, high] with low < high, got {r}")
    if cfg.targets.center_sampling_radius < 0:
        raise ConfigError(f"model.targets.center_sampling_radius must be >= 0, got {cfg.targets.center_sampling_radius}")
    if cfg.loss.box_loss not in BOX_LOSSES:
        raise ConfigError(f"model.loss.box_loss must be one of {BOX_LOSSES}, got {cfg.loss.box_loss!r}")
    weights = cfg.loss.level_loss_weights
    if weights is not None and len(weights) != len(levels):
        raise ConfigError(f"model.loss.level_loss_weights has {len(weights)} entries but model.fpn.out_levels has "
                          f"{len(levels)} levels {list(levels)}: give one weight per level (or null for all 1.0)")
    test = cfg.test
    if test.topk_candidates < 1 or test.max_detections < 1:
        raise ConfigError("model.test.topk_candidates and model.test.max_detections must be >= 1")
    if not 0.0 <= test.score_threshold < 1.0:
        raise ConfigError(f"model.test.score_threshold must be in [0, 1), got {test.score_threshold}")
    if not 0.0 < test.nms_threshold <= 1.0:
        raise ConfigError(f"model.test.nms_threshold must be in (0, 1], got {test.nms_threshold}")
    # model.query / model.csq: the same rules as QueryDet's (query levels are detection levels, one
    # bound per query level, CSQ needs a query head on its start level and every level between).
    check_querydet_config(cfg)
