"""Config sections shared by the anchor-based dense detectors (``model.anchors``, ``model.head``,
``model.matcher``, ``model.loss``, ``model.test``). Defaults are the official COCO RetinaNet's."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class AnchorConfig:
    """``model.anchors`` (detectron2 DefaultAnchorGenerator, spec §1.2).

    Attributes:
        sizes: base anchor size x per detection level, one per ``model.fpn.out_levels`` entry
            (RetinaNet P3..P7: 32..512; QueryDet P2..P7: 16..512).
        scales_per_octave: each level gets sizes x * 2^(i / n), i < n (3: x, 1.26x, 1.59x).
        aspect_ratios: h / w ratios (0.5, 1, 2). A = scales_per_octave * len(aspect_ratios).
        offset: anchor centre offset in strides (detectron2 default 0.0: centre at (x*s, y*s)).
    """

    sizes: tuple = (32, 64, 128, 256, 512)
    scales_per_octave: int = 3
    aspect_ratios: tuple = (0.5, 1.0, 2.0)
    offset: float = 0.0


@dataclass
class DenseHeadConfig:
    """``model.head``: the shared class / box towers.

    Attributes:
        num_convs: 3x3 conv + ReLU layers per tower before the predictor (official 4).
        prior_prob: initial foreground probability of every anchor (class predictor bias).
    """

    num_convs: int = 4
    prior_prob: float = 0.01


@dataclass
class IoUMatcherConfig:
    """``model.matcher``: anchor-to-GT assignment by IoU (spec §1.4).

    Attributes:
        thresholds: (low, high): IoU < low background, low <= IoU < high ignored, >= high foreground.
        allow_low_quality_matches: also make each GT's best anchor(s) foreground.
    """

    thresholds: tuple = (0.4, 0.5)
    allow_low_quality_matches: bool = True


@dataclass
class DenseLossConfig:
    """``model.loss``: detection losses (spec §1.5, §2.3).

    Attributes:
        focal_alpha, focal_gamma: sigmoid focal loss of the classifier (0.25, 2.0).
        smooth_l1_beta: smooth-L1 beta of the box deltas (0.1; 0 = L1).
        level_loss_weights: beta_l per detection level (multiplies both the class and the box sum
            of that level); ``null`` = 1.0 everywhere (RetinaNet). QueryDet's re-balancing: COCO
            [1.0, 1.4, 2.1, 2.5, 2.9, 3.2], VisDrone [1.0, 1.4, 1.8, 2.2, 2.6, 2.6] (official code);
            the paper's "linear 1 -> 3" is [1.0, 1.4, 1.8, 2.2, 2.6, 3.0] and "1 -> 2.6" is
            [1.0, 1.32, 1.64, 1.96, 2.28, 2.6].
        normalizer_init, normalizer_momentum: EMA of the foreground-anchor count that divides the
            losses (100, 0.9).
    """

    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    smooth_l1_beta: float = 0.1
    level_loss_weights: Optional[tuple] = None
    normalizer_init: float = 100.0
    normalizer_momentum: float = 0.9


@dataclass
class DenseTestConfig:
    """``model.test``: inference post-processing (spec §1.6).

    Attributes:
        topk_candidates: per level, at most min(this, #anchors of the level) scores are kept.
        score_threshold: scores must be > this (COCO RetinaNet 0.05, VisDrone RetinaNet 0.005,
            QueryDet 1e-4).
        nms_threshold: IoU of the class-aware NMS over all levels.
        max_detections: detections kept per image after NMS (COCO 200, VisDrone 500).
    """

    topk_candidates: int = 1000
    score_threshold: float = 0.05
    nms_threshold: float = 0.5
    max_detections: int = 200


def check_dense_config(cfg) -> None:
    """Raises ``ConfigError`` naming the field when the dense-detector sections of ``cfg`` (a
    ``RetinaNetConfig`` or subclass) do not fit together."""
    from ...config import ConfigError

    levels = tuple(cfg.fpn.out_levels)
    if not levels:
        raise ConfigError("model.fpn.out_levels is empty: the detection head needs at least one level")
    if cfg.num_classes < 1:
        raise ConfigError(f"model.num_classes must be >= 1, got {cfg.num_classes}")
    if len(cfg.anchors.sizes) != len(levels):
        raise ConfigError(f"model.anchors.sizes has {len(cfg.anchors.sizes)} entries {list(cfg.anchors.sizes)} but "
                          f"model.fpn.out_levels has {len(levels)} levels {list(levels)}: give one base size per level")
    if cfg.anchors.scales_per_octave < 1 or not cfg.anchors.aspect_ratios:
        raise ConfigError("model.anchors.scales_per_octave must be >= 1 and model.anchors.aspect_ratios non-empty")
    if any(r <= 0 for r in cfg.anchors.aspect_ratios) or any(s <= 0 for s in cfg.anchors.sizes):
        raise ConfigError("model.anchors.sizes and model.anchors.aspect_ratios must be positive")
    thresholds = tuple(cfg.matcher.thresholds)
    if len(thresholds) != 2 or not 0.0 <= thresholds[0] <= thresholds[1] <= 1.0:
        raise ConfigError(f"model.matcher.thresholds must be [low, high] with 0 <= low <= high <= 1, got {list(thresholds)}")
    weights = cfg.loss.level_loss_weights
    if weights is not None and len(weights) != len(levels):
        raise ConfigError(f"model.loss.level_loss_weights has {len(weights)} entries but model.fpn.out_levels has "
                          f"{len(levels)} levels {list(levels)}: give one weight per level (or null for all 1.0)")
    if len(cfg.box_weights) != 4:
        raise ConfigError(f"model.box_weights must have 4 values, got {list(cfg.box_weights)}")
    test = cfg.test
    if test.topk_candidates < 1 or test.max_detections < 1:
        raise ConfigError("model.test.topk_candidates and model.test.max_detections must be >= 1")
    if not 0.0 <= test.score_threshold < 1.0:
        raise ConfigError(f"model.test.score_threshold must be in [0, 1), got {test.score_threshold}")
    if not 0.0 < test.nms_threshold <= 1.0:
        raise ConfigError(f"model.test.nms_threshold must be in (0, 1], got {test.nms_threshold}")
