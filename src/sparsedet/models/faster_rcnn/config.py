"""``model:`` section of a Faster R-CNN config: detectron2-style FPN Faster R-CNN whose RPN has a query
branch, so that Cascade Sparse Query can evaluate the RPN on P3/P2 sparsely (spec §5.2, paper table 9).
Defaults are detectron2's ``faster_rcnn_R_50_FPN_1x`` except the paper's 3-conv RPN trunk and query branch."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from ...config import ConfigError
from ..backbones import BackboneConfig, FPNConfig
from ..csq import CSQConfig
from ..querydet.config import check_query_cascade


@dataclass
class FasterRCNNFPNConfig(FPNConfig):
    """``model.fpn`` with detectron2's defaults: C2..C5 -> P2..P6, P6 = stride-2 max-pool of P5."""

    in_stages: tuple = (2, 3, 4, 5)
    out_levels: tuple = (2, 3, 4, 5, 6)
    channels: int = 256
    top_block: str = "maxpool"


@dataclass
class RPNConfig:
    """``model.rpn``: the region proposal network on every ``model.fpn.out_levels`` level.

    Attributes:
        anchor_sizes: one anchor size per RPN level (detectron2: 32, 64, 128, 256, 512 on P2..P6).
        aspect_ratios: h / w ratios (A = len(aspect_ratios) anchors per position).
        anchor_offset: anchor centre offset in strides (detectron2 0.0).
        num_convs: 3x3 conv + ReLU layers of the shared trunk (paper table 9: 3; detectron2: 1).
        predictor_kernel_size: of the objectness / deltas / query predictors (1, as detectron2's RPN).
        iou_thresholds: (low, high): IoU < low negative, >= high positive, between ignored (0.3, 0.7);
            each GT's best anchors are also positive (low-quality matches).
        batch_size_per_image, positive_fraction: anchors sampled per image for the losses (256, 0.5).
        box_weights, box_scale_clamp: box coder of the anchor deltas ((1, 1, 1, 1), log(1000 / 16)).
        smooth_l1_beta: of the delta loss (0 = L1, detectron2).
        cls_loss_weight, box_loss_weight: multiply ``loss_rpn_cls`` / ``loss_rpn_loc``.
        pre_nms_topk_train, pre_nms_topk_test: per level, the best anchors kept before NMS (2000 / 1000).
        post_nms_topk_train, post_nms_topk_test: proposals kept per image after NMS (1000 / 1000).
        nms_threshold: IoU of the per-level NMS of the proposals (0.7).
        min_box_size: proposals with a side <= this (pixels, after clipping) are dropped (0).
    """

    anchor_sizes: tuple = (32, 64, 128, 256, 512)
    aspect_ratios: tuple = (0.5, 1.0, 2.0)
    anchor_offset: float = 0.0
    num_convs: int = 3
    predictor_kernel_size: int = 1
    iou_thresholds: tuple = (0.3, 0.7)
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    box_weights: tuple = (1.0, 1.0, 1.0, 1.0)
    box_scale_clamp: float = math.log(1000.0 / 16)
    smooth_l1_beta: float = 0.0
    cls_loss_weight: float = 1.0
    box_loss_weight: float = 1.0
    pre_nms_topk_train: int = 2000
    pre_nms_topk_test: int = 1000
    post_nms_topk_train: int = 1000
    post_nms_topk_test: int = 1000
    nms_threshold: float = 0.7
    min_box_size: float = 0.0


@dataclass
class RPNQueryConfig:
    """``model.query``: the RPN's query branch (a 1-channel predictor on the shared trunk) and its
    training targets/loss, as QueryDet's (spec §2.2-2.3, §5.2).

    Attributes:
        levels: RPN levels whose query output is trained (paper: P3, P4); [] = no query branch.
        small_object_bounds: per query level, small iff sqrt(area) < bound. Default 32 / 64 mirrors
            RetinaNet-QueryDet; the paper's rule (smallest anchor of the level) would be 64 / 128.
        radius_mode, radius_scale, loss_weight: as ``QueryHeadConfig`` (``code``, [1, 1], 10).
        focal_alpha, focal_gamma: query focal loss (paper table 9: 0.25, 1.2).
    """

    levels: tuple = (3, 4)
    small_object_bounds: tuple = (32.0, 64.0)
    radius_mode: str = "code"
    radius_scale: tuple = (1.0, 1.0)
    loss_weight: float = 10.0
    focal_alpha: float = 0.25
    focal_gamma: float = 1.2


@dataclass
class RoIHeadsConfig:
    """``model.roi_heads``: the second stage (torchvision ``RoIHeads`` with a box head only).

    Attributes:
        in_levels: FPN levels RoIAlign pools from (P2..P5), level chosen by box size (FPN eq. 1).
        pooler_resolution, sampling_ratio: ``MultiScaleRoIAlign`` output side (7) and samples per bin (2).
        representation_size: width of the two fully connected layers (``TwoMLPHead``, 1024).
        batch_size_per_image, positive_fraction: RoIs sampled per image for the losses (512, 0.25).
        iou_threshold: proposals with IoU >= this to a GT are foreground (0.5), the rest background.
        box_weights: box coder weights of the second stage (10, 10, 5, 5).
        score_threshold, nms_threshold, max_detections: inference (0.05, per-class NMS 0.5, 100).
    """

    in_levels: tuple = (2, 3, 4, 5)
    pooler_resolution: int = 7
    sampling_ratio: int = 2
    representation_size: int = 1024
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    iou_threshold: float = 0.5
    box_weights: tuple = (10.0, 10.0, 5.0, 5.0)
    score_threshold: float = 0.05
    nms_threshold: float = 0.5
    max_detections: int = 100


@dataclass
class FasterRCNNCSQConfig(CSQConfig):
    """``model.csq`` with this model's defaults: sigma 0.15 (paper table 9) and a 7x7 context, which makes
    the sparse RPN exact (3 trunk 3x3 convs + 1x1 predictors read a 7x7 window)."""

    threshold: float = 0.15
    context: int = 7


@dataclass
class FasterRCNNConfig:
    """``model:`` of a Faster R-CNN config.

    Attributes:
        name: ``faster_rcnn``.
        num_classes: K foreground classes (labels 0..K-1; the second stage adds its own background).
        backbone, fpn: ``BackboneConfig`` / ``FPNConfig`` (the RPN runs on every ``fpn.out_levels`` level).
        input_format, pixel_mean, pixel_std: ``null`` = the convention of ``backbone.layout``.
        size_divisor: batches are padded to a multiple of this (32).
        rpn: ``RPNConfig``; query: ``RPNQueryConfig``; roi_heads: ``RoIHeadsConfig``.
        csq: ``CSQConfig`` (sparse RPN on the levels below ``start_level`` at inference).
    """

    name: str = "faster_rcnn"
    num_classes: int = 80
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    fpn: FasterRCNNFPNConfig = field(default_factory=FasterRCNNFPNConfig)
    input_format: Optional[str] = None
    pixel_mean: Optional[tuple] = None
    pixel_std: Optional[tuple] = None
    size_divisor: int = 32
    rpn: RPNConfig = field(default_factory=RPNConfig)
    query: RPNQueryConfig = field(default_factory=RPNQueryConfig)
    roi_heads: RoIHeadsConfig = field(default_factory=RoIHeadsConfig)
    csq: FasterRCNNCSQConfig = field(default_factory=FasterRCNNCSQConfig)


def check_faster_rcnn_config(cfg: FasterRCNNConfig) -> None:
    """Raises ``ConfigError`` naming the field when the sections of ``cfg`` do not fit together."""
    levels = tuple(cfg.fpn.out_levels)
    rpn, query, roi, csq = cfg.rpn, cfg.query, cfg.roi_heads, cfg.csq
    if cfg.num_classes < 1:
        raise ConfigError(f"model.num_classes must be >= 1, got {cfg.num_classes}")
    if len(rpn.anchor_sizes) != len(levels):
        raise ConfigError(f"model.rpn.anchor_sizes has {len(rpn.anchor_sizes)} entries but model.fpn.out_levels has "
                          f"{len(levels)} levels {list(levels)}: give one anchor size per level")
    if not rpn.aspect_ratios or any(r <= 0 for r in rpn.aspect_ratios) or any(s <= 0 for s in rpn.anchor_sizes):
        raise ConfigError("model.rpn.anchor_sizes and model.rpn.aspect_ratios must be positive and non-empty")
    if rpn.predictor_kernel_size not in (1, 3):
        raise ConfigError(f"model.rpn.predictor_kernel_size must be 1 or 3, got {rpn.predictor_kernel_size}")
    if rpn.num_convs < 0:
        raise ConfigError(f"model.rpn.num_convs must be >= 0, got {rpn.num_convs}")
    low_high = tuple(rpn.iou_thresholds)
    if len(low_high) != 2 or not 0.0 <= low_high[0] <= low_high[1] <= 1.0:
        raise ConfigError(f"model.rpn.iou_thresholds must be [low, high] with 0 <= low <= high <= 1, got {list(low_high)}")
    if len(rpn.box_weights) != 4 or len(roi.box_weights) != 4:
        raise ConfigError("model.rpn.box_weights and model.roi_heads.box_weights need 4 values each")
    for name in ("batch_size_per_image", "pre_nms_topk_train", "pre_nms_topk_test", "post_nms_topk_train",
                 "post_nms_topk_test"):
        if getattr(rpn, name) < 1:
            raise ConfigError(f"model.rpn.{name} must be >= 1, got {getattr(rpn, name)}")
    for section, obj in (("rpn", rpn), ("roi_heads", roi)):
        if not 0.0 < obj.positive_fraction <= 1.0:
            raise ConfigError(f"model.{section}.positive_fraction must be in (0, 1], got {obj.positive_fraction}")
    missing = [lvl for lvl in roi.in_levels if lvl not in levels]
    if missing or not roi.in_levels:
        raise ConfigError(f"model.roi_heads.in_levels {list(roi.in_levels)} must be non-empty FPN levels "
                          f"(model.fpn.out_levels = {list(levels)})")
    if not 0.0 <= roi.score_threshold < 1.0 or not 0.0 < roi.nms_threshold <= 1.0 or roi.max_detections < 1:
        raise ConfigError("model.roi_heads: score_threshold must be in [0, 1), nms_threshold in (0, 1], "
                          "max_detections >= 1")

    check_query_cascade(levels, query, csq)
