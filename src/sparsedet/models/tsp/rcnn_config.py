"""``model:`` section of a TSP-RCNN config (spec §3). Defaults are the official ``tsp_rcnn.sh`` R-50 3x
model (code behaviour); every paper/code difference of spec §8 the model has is a key documented here."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from ...config import ConfigError
from ..backbones import BackboneConfig, FPNConfig

# Anchor sizes per RPN level P3..P7 (spec §3.2). The official script has 51.80 on P3 (a typo for
# 2^(2/3) * 32 = 50.80); "retinanet" gives the exact octave sizes of RetinaNet.
ANCHOR_PRESETS = {
    "official": ((32.0, 40.32, 51.80), (64.0, 80.63, 101.59), (128.0, 161.27, 203.19),
                 (256.0, 322.54, 406.37), (512.0, 645.08, 812.75)),
    "retinanet": tuple(tuple(base * 2.0 ** (i / 3.0) for i in range(3)) for base in (32.0, 64.0, 128.0, 256.0, 512.0)),
}
POSITION_ENCODINGS = ("box8", "box4", "none")
LOSS_TYPES = ("tsp", "detr")
IOU_COMPARISONS = ("at_least", "above")


@dataclass
class TSPRCNNFPNConfig(FPNConfig):
    """``model.fpn``: C2..C5 -> P2..P7, P6/P7 = conv + BatchNorm from P5 ("MYFPN", spec §1.3)."""

    in_stages: tuple = (2, 3, 4, 5)
    out_levels: tuple = (2, 3, 4, 5, 6, 7)
    channels: int = 256
    top_block: str = "p6p7_bn_from_p5"


@dataclass
class TSPRPNConfig:
    """``model.rpn``: the RPN of spec §3.2 (two unshared 2-conv branches, per-level BatchNorm).

    Attributes:
        levels: FPN levels the RPN runs on (P3..P7).
        anchor_preset: ``official`` (the script's sizes, P3 = [32, 40.32, 51.80]) or ``retinanet``
            (exact 2^(k/3) sizes, P3 = [32, 40.32, 50.80]); used when ``anchor_sizes`` is null.
        anchor_sizes: null, or per level a list of anchor sizes (overrides the preset).
        aspect_ratios: h / w ratios (0.5, 1, 2); 9 anchors per position with 3 sizes.
        anchor_offset: anchor centre offset in strides (0.0: cell corners, detectron2).
        num_convs: conv + BN + ReLU layers of each branch (2).
        iou_thresholds: (low, high) = (0.3, 0.7): below low negative, from high positive; each GT's best
            anchors are positive too (low-quality matches).
        batch_size_per_image, positive_fraction: anchors sampled per image for the losses (256, 0.5).
        box_weights, box_scale_clamp: anchor delta coder ((1, 1, 1, 1), log(1000 / 16)).
        smooth_l1_beta: of the delta loss (0 = L1).
        box_loss_weight: multiplies ``loss_rpn_loc`` (official ``BBOX_REG_LOSS_WEIGHT`` 2.0).
        pre_nms_topk_train, pre_nms_topk_test: per level, anchors kept before NMS (2000 / 1000).
        num_proposals: proposals kept per image after the per-level NMS, train and test (700): the
            number of encoder inputs of paper table 8 (100 / 300 / 500 / 700).
        nms_threshold: IoU of the per-level NMS (0.7).
        min_box_size: proposals with a side <= this (pixels) are dropped (0).
    """

    levels: tuple = (3, 4, 5, 6, 7)
    anchor_preset: str = "official"
    anchor_sizes: Optional[tuple] = None
    aspect_ratios: tuple = (0.5, 1.0, 2.0)
    anchor_offset: float = 0.0
    num_convs: int = 2
    iou_thresholds: tuple = (0.3, 0.7)
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    box_weights: tuple = (1.0, 1.0, 1.0, 1.0)
    box_scale_clamp: float = math.log(1000.0 / 16)
    smooth_l1_beta: float = 0.0
    box_loss_weight: float = 2.0
    pre_nms_topk_train: int = 2000
    pre_nms_topk_test: int = 1000
    num_proposals: int = 700
    nms_threshold: float = 0.7
    min_box_size: float = 0.0

    def resolved_anchor_sizes(self) -> tuple:
        """Per level, the anchor sizes in use."""
        if self.anchor_sizes is not None:
            return tuple(tuple(float(s) for s in level) for level in self.anchor_sizes)
        return ANCHOR_PRESETS[self.anchor_preset]


@dataclass
class TSPRoIHeadsConfig:
    """``model.roi_heads``: proposal sampling, RoI features, the transformer box head and predictor.

    Attributes:
        in_levels: FPN levels RoIAlign pools from (P2..P5; level by box size, ROIAlignV2 ``aligned``).
        pooler_resolution, sampling_ratio: RoIAlign output side (7) and samples per bin (0 = adaptive).
        iou_threshold: a proposal is foreground of its argmax-IoU GT when its IoU reaches this (0.5).
        iou_comparison: ``at_least`` (code: IoU >= iou_threshold) or ``above`` (paper: IoU > iou_threshold).
        batch_size_per_image, positive_fraction: proposals sampled per image (700, 0.25: at most 175 fg).
        keep_ratio_min, keep_ratio_max: training only: per image keep ``int(n * f)`` random proposals,
            f ~ U(keep_ratio_min, keep_ratio_max] (official 0.7, 1.0: "keep 70-100 %"; the paper's text
            "randomly drop 70 % inputs" read literally is 0.3, 0.3); keep_ratio_min 1.0 turns it off.
        num_fc: input projection depth: 1 = Linear(12544, d) (script), 2 = Linear(12544, 1024) + ReLU +
            Linear(1024, d) (the paper's 63.6 M parameters).
        fc_dim: hidden width of the 2-layer projection (1024).
        d_model, num_heads, num_layers, dim_feedforward, dropout: the pre-norm encoder (512, 8, 6, 2048, 0.1).
        position_encoding: ``box8`` (code: sine of cx, cy, w, h, x0, y0, x1, y1 x 2 pi, d/8 dims each),
            ``box4`` (paper: sine of cx, cy, w, h in [0, 1], d/4 dims each) or ``none`` (paper table 2
            ablation "w/o positional encoding").
        cls_agnostic_bbox_reg: one box per proposal instead of one per class (required by the cascade).
        box_weights, box_scale_clamp: delta coder of the predictor ((10, 10, 5, 5), log(1000 / 16)).
        score_threshold, nms_threshold, max_detections: inference (0.0, class-wise NMS 0.7, 100);
            nms_threshold 1.0 = no NMS (the paper's pure set prediction, which the code does not use).
    """

    in_levels: tuple = (2, 3, 4, 5)
    pooler_resolution: int = 7
    sampling_ratio: int = 0
    iou_threshold: float = 0.5
    iou_comparison: str = "at_least"
    batch_size_per_image: int = 700
    positive_fraction: float = 0.25
    keep_ratio_min: float = 0.7
    keep_ratio_max: float = 1.0
    num_fc: int = 1
    fc_dim: int = 1024
    d_model: int = 512
    num_heads: int = 8
    num_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    position_encoding: str = "box8"
    cls_agnostic_bbox_reg: bool = False
    box_weights: tuple = (10.0, 10.0, 5.0, 5.0)
    box_scale_clamp: float = math.log(1000.0 / 16)
    score_threshold: float = 0.0
    nms_threshold: float = 0.7
    max_detections: int = 100


@dataclass
class TSPRCNNLossConfig:
    """``model.loss``: the second-stage losses (spec §3.7, §3.10).

    Attributes:
        type: ``tsp`` (official: restricted matching, each proposal only with its argmax-IoU GT) or
            ``detr`` (paper fig. 6 baseline: per-image Hungarian over all proposals, CE x 0.5 with
            no-object weight 0.1, GIoU x 2 on matched proposals only).
        set_prediction: ``tsp`` only. true = set-like classification (one positive per GT, duplicates
            are background with weight ``eos_coef``); false = paper table 2 "w/o set prediction loss":
            every eligible proposal is a positive of its GT's class, plain softmax CE averaged over the
            proposals (Fast R-CNN style). The box loss is the same in both.
        eos_coef: CE weight of the non-matched proposals (0.1).
        focal_factor: scale s of the focal-style factor s * (1 - p_bg)^gamma on non-matched proposals
            (official 2.0 and gamma 2); 0 turns the factor off (plain weighted CE).
        focal_gamma: exponent of the factor (2).
        l1_weight, giou_weight: box loss weights on every eligible proposal (1.0, 2.0).
        match_giou_weight: GIoU weight of the restricted matching cost (2.0).
        detr_class_weight, detr_giou_weight, detr_match_giou_weight: the ``detr`` baseline (0.5, 2.0, 5.0).
    """

    type: str = "tsp"
    set_prediction: bool = True
    eos_coef: float = 0.1
    focal_factor: float = 2.0
    focal_gamma: float = 2.0
    l1_weight: float = 1.0
    giou_weight: float = 2.0
    match_giou_weight: float = 2.0
    detr_class_weight: float = 0.5
    detr_giou_weight: float = 2.0
    detr_match_giou_weight: float = 5.0


@dataclass
class TSPCascadeConfig:
    """``model.cascade``: iterative refinement of paper App. D (``CascadeTransformerROIHeads``, spec §3.9).

    Attributes:
        num_stages: 1 = no cascade (official script); N > 1 = N box heads, each with its own encoder.
        iou_thresholds: per stage, the foreground IoU ((0.5, 0.7)); stage 0 uses it instead of
            ``roi_heads.iou_threshold``.
        box_weights: per stage, the predictor's delta weights ((10, 10, 5, 5), (20, 20, 10, 10)).
        inherit_match: stages > 0 keep stage 0's labels instead of re-matching at their IoU.
    """

    num_stages: int = 1
    iou_thresholds: tuple = (0.5, 0.7)
    box_weights: tuple = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0))
    inherit_match: bool = False


@dataclass
class TSPRCNNConfig:
    """``model:`` of a TSP-RCNN config.

    Attributes:
        name: ``tsp_rcnn``.
        num_classes: C foreground classes (the softmax adds background at index C).
        backbone, fpn: ``BackboneConfig`` / ``TSPRCNNFPNConfig`` (must give every RPN and RoI level).
        input_format, pixel_mean, pixel_std: ``null`` = the convention of ``backbone.layout``.
        size_divisor: batches are padded to a multiple of this (32).
        rpn: ``TSPRPNConfig``; roi_heads: ``TSPRoIHeadsConfig``; loss: ``TSPRCNNLossConfig``;
        cascade: ``TSPCascadeConfig``.
    """

    name: str = "tsp_rcnn"
    num_classes: int = 80
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    fpn: TSPRCNNFPNConfig = field(default_factory=TSPRCNNFPNConfig)
    input_format: Optional[str] = None
    pixel_mean: Optional[tuple] = None
    pixel_std: Optional[tuple] = None
    size_divisor: int = 32
    rpn: TSPRPNConfig = field(default_factory=TSPRPNConfig)
    roi_heads: TSPRoIHeadsConfig = field(default_factory=TSPRoIHeadsConfig)
    loss: TSPRCNNLossConfig = field(default_factory=TSPRCNNLossConfig)
    cascade: TSPCascadeConfig = field(default_factory=TSPCascadeConfig)


def check_tsp_rcnn_config(cfg: TSPRCNNConfig) -> None:
    """Raises ``ConfigError`` naming the key when the sections of ``cfg`` are invalid or do not fit."""
    rpn, roi, loss, cascade = cfg.rpn, cfg.roi_heads, cfg.loss, cfg.cascade
    levels = tuple(int(lvl) for lvl in cfg.fpn.out_levels)
    if cfg.num_classes < 1:
        raise ConfigError(f"model.num_classes must be >= 1, got {cfg.num_classes}")
    for key, wanted in (("model.rpn.levels", rpn.levels), ("model.roi_heads.in_levels", roi.in_levels)):
        missing = [int(lvl) for lvl in wanted if int(lvl) not in levels]
        if missing or not wanted:
            raise ConfigError(f"{key} = {list(wanted)} names levels {['P%d' % m for m in missing]} that the backbone "
                              f"does not produce (model.fpn.out_levels = {list(levels)})")
    if rpn.anchor_sizes is None and rpn.anchor_preset not in ANCHOR_PRESETS:
        raise ConfigError(f"model.rpn.anchor_preset must be one of {sorted(ANCHOR_PRESETS)}, got {rpn.anchor_preset!r}")
    sizes = rpn.resolved_anchor_sizes()
    if len(sizes) != len(rpn.levels):
        raise ConfigError(f"model.rpn.anchor_sizes has {len(sizes)} levels but model.rpn.levels has {len(rpn.levels)}")
    if len({len(s) for s in sizes}) != 1:
        raise ConfigError("model.rpn.anchor_sizes: every level needs the same number of sizes")
    if len(rpn.iou_thresholds) != 2 or not 0.0 <= rpn.iou_thresholds[0] <= rpn.iou_thresholds[1] <= 1.0:
        raise ConfigError(f"model.rpn.iou_thresholds must be [low, high] in [0, 1], got {list(rpn.iou_thresholds)}")
    for key in ("batch_size_per_image", "pre_nms_topk_train", "pre_nms_topk_test", "num_proposals", "num_convs"):
        if getattr(rpn, key) < 1:
            raise ConfigError(f"model.rpn.{key} must be >= 1, got {getattr(rpn, key)}")
    if roi.position_encoding not in POSITION_ENCODINGS:
        raise ConfigError(f"model.roi_heads.position_encoding must be one of {list(POSITION_ENCODINGS)}, "
                          f"got {roi.position_encoding!r}")
    if roi.num_fc not in (1, 2):
        raise ConfigError(f"model.roi_heads.num_fc must be 1 or 2, got {roi.num_fc}")
    divisor = {"box8": 16, "box4": 8, "none": 1}[roi.position_encoding]
    if roi.d_model % divisor or roi.d_model % roi.num_heads:
        raise ConfigError(f"model.roi_heads.d_model ({roi.d_model}) must be divisible by num_heads ({roi.num_heads}) "
                          f"and by {divisor} for position_encoding={roi.position_encoding!r}")
    if not 0.0 < roi.keep_ratio_min <= roi.keep_ratio_max <= 1.0:
        raise ConfigError(f"model.roi_heads.keep_ratio_min / keep_ratio_max must satisfy 0 < min <= max <= 1, got "
                          f"{roi.keep_ratio_min} / {roi.keep_ratio_max}")
    if roi.iou_comparison not in IOU_COMPARISONS:
        raise ConfigError(f"model.roi_heads.iou_comparison must be one of {list(IOU_COMPARISONS)}, "
                          f"got {roi.iou_comparison!r}")
    if not 0.0 < roi.positive_fraction <= 1.0 or roi.batch_size_per_image < 1:
        raise ConfigError("model.roi_heads: positive_fraction must be in (0, 1] and batch_size_per_image >= 1")
    if loss.type not in LOSS_TYPES:
        raise ConfigError(f"model.loss.type must be one of {list(LOSS_TYPES)}, got {loss.type!r}")
    if cascade.num_stages < 1:
        raise ConfigError(f"model.cascade.num_stages must be >= 1, got {cascade.num_stages}")
    if cascade.num_stages > 1:
        if not roi.cls_agnostic_bbox_reg:
            raise ConfigError("model.cascade.num_stages > 1 needs model.roi_heads.cls_agnostic_bbox_reg=true "
                              "(official CascadeTransformerROIHeads asserts it)")
        if len(cascade.iou_thresholds) != cascade.num_stages or len(cascade.box_weights) != cascade.num_stages:
            raise ConfigError(f"model.cascade.iou_thresholds and model.cascade.box_weights need one entry per stage "
                              f"({cascade.num_stages})")
        if loss.type != "tsp":
            raise ConfigError("model.cascade.num_stages > 1 is only defined with model.loss.type=tsp")


def stage_settings(cfg: TSPRCNNConfig) -> list[tuple[float, tuple]]:
    """Per box-head stage, (foreground IoU, delta weights)."""
    if cfg.cascade.num_stages == 1:
        return [(float(cfg.roi_heads.iou_threshold), tuple(cfg.roi_heads.box_weights))]
    return [(float(iou), tuple(w)) for iou, w in zip(cfg.cascade.iou_thresholds, cfg.cascade.box_weights)]
