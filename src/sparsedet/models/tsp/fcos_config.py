"""``model:`` section of a TSP-FCOS config (tsp.md §2). Defaults are the official code
(``tsp_fcos.sh`` on ``Base-FCOS-TSP.yaml``); the paper's ablation switches are keys here."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ...config import ConfigError
from ..backbones import BackboneConfig, FPNConfig
from ..fcos.config import FCOSTargetConfig

POSITION_ENCODINGS = ("sine", "none")
SET_LOSSES = ("restricted", "none", "detr")
CLASS_NORMALISERS = ("mixed_2x", "matched")


@dataclass
class TSPFCOSFPNConfig(FPNConfig):
    """``model.fpn``: C3..C5 -> P3..P7 with TSP's conv + BatchNorm P6/P7 block ("MYFPN", §1.3)."""

    in_stages: tuple = (3, 4, 5)
    out_levels: tuple = (3, 4, 5, 6, 7)
    channels: int = 256
    top_block: str = "p6p7_bn_from_p5"


@dataclass
class TSPFCOSHeadConfig:
    """``model.head``: the FCOS feature-extraction subnets (§2.2).

    Attributes:
        num_convs: [3x3 conv, GroupNorm, ReLU] layers in each of ``cls_tower`` and ``bbox_tower`` (4).
        num_groups: GroupNorm groups (32).
        prior_prob: initial foreground probability of the FoI classifier and the set classifier (0.01).
    """

    num_convs: int = 4
    num_groups: int = 32
    prior_prob: float = 0.01


@dataclass
class TSPEncoderConfig:
    """``model.transformer``: the pre-norm encoder of §1.4 (``sparsedet.layers.TransformerEncoder``).

    Attributes:
        d_model: token width (512 = the two towers' 256 + 256 channels projected by ``enc_proj``).
        nhead: attention heads (8).
        num_layers: encoder layers (6).
        dim_feedforward: FFN width (2048; the config default of the official code is 1024, the
            script overrides it).
        dropout: dropout on attention weights and residual branches (0.1).
    """

    d_model: int = 512
    nhead: int = 8
    num_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1


@dataclass
class FoIConfig:
    """``model.foi``: which features of interest enter the encoder (§2.4).

    Attributes:
        num_foi: FoIs per image by the FoI score max_c sigmoid(FCOS cls logit), train and test (700;
            paper table 8 ablates 100 / 300 / 500 / 700).
        keep_min: training keeps ``int(num_foi * f)`` of them, f ~ U(keep_min, 1] (0.7: the code's "keep
            70-100 %", the paper's "randomly drop"), one random subset for the whole batch. 1.0 = no drop.
        lift_positives: in training, FCOS-positive locations get score (s + 1) / 2 before the top-k so
            that positives enter the encoder (official; false = plain scores).
        clamp_to_locations: when an input has fewer locations than ``num_foi`` (a tiny image), take all
            of them instead of raising an error that names ``model.foi.num_foi``.
    """

    num_foi: int = 700
    keep_min: float = 0.7
    lift_positives: bool = True
    clamp_to_locations: bool = False


@dataclass
class TSPFCOSLossConfig:
    """``model.loss``: the four loss terms of §2.7 (each weight 1, summed).

    Attributes:
        focal_alpha, focal_gamma: sigmoid focal loss of both classifiers (0.25, 2.0).
        set_loss: ``restricted`` (official): each GT is matched to the cheapest of the selected FoIs
            FCOS assigned to it; the other eligible FoIs are duplicates with class weight
            ``duplicate_weight``. ``none`` (paper table 2 "w/o set prediction loss"): every eligible
            FoI is a positive of its FCOS class, as in FCOS. ``detr`` (paper Fig. 6 "DETR-like loss",
            official ``USE_DETR_LOSS``): Hungarian matching of the FoIs to all GTs of the image,
            softmax CE with no-object weight ``duplicate_weight``, 10 x GIoU and centerness on the
            matched FoIs (``fcos_detr_loss.py``).
        duplicate_weight: focal weight of an unmatched eligible FoI at its class (EOS_COEF 0.1); with
            ``detr``, the no-object class weight.
        match_giou_weight: weight of (1 - GIoU) in the matching cost (GIOU_WEIGHT 2.0; the ``detr``
            baseline uses its own 5).
        class_normaliser: ``mixed_2x`` (official): the set classification sum / (2 (N_matched +
            duplicate_weight * |E|)); ``matched``: / N_matched.
    """

    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    set_loss: str = "restricted"
    duplicate_weight: float = 0.1
    match_giou_weight: float = 2.0
    class_normaliser: str = "mixed_2x"


@dataclass
class TSPFCOSTestConfig:
    """``model.test``: inference of §2.8.

    Attributes:
        topk_candidates: (FoI, class) pairs kept per level before NMS (1000).
        score_threshold: pairs need sigmoid(logit) > this (0.0).
        nms_threshold: class-wise NMS IoU (0.6).
        max_detections: detections per image (100).
    """

    topk_candidates: int = 1000
    score_threshold: float = 0.0
    nms_threshold: float = 0.6
    max_detections: int = 100


@dataclass
class TSPFCOSConfig:
    """``model:`` of a TSP-FCOS config.

    Attributes:
        name: ``tsp_fcos``.
        num_classes: K foreground classes (80).
        backbone, fpn: ``BackboneConfig`` / ``TSPFCOSFPNConfig`` (the head runs on every
            ``fpn.out_levels`` level; at most ``len(level embeddings)`` = number of levels).
        input_format, pixel_mean, pixel_std: ``null`` = the convention of ``backbone.layout``.
        size_divisor: batches are padded to a multiple of this (32).
        head: ``TSPFCOSHeadConfig``; targets: ``FCOSTargetConfig`` (AdelaiDet assignment, §2.3).
        transformer: ``TSPEncoderConfig``; foi: ``FoIConfig``.
        position_encoding: ``sine`` (official: 2-D normalised sine per level, y first, in (0, 2pi],
            plus a learnable per-level vector initialised to ones; added to Q and K) or ``none``
            (paper table 2 "w/o positional encoding").
        loss: ``TSPFCOSLossConfig``; test: ``TSPFCOSTestConfig``.
    """

    name: str = "tsp_fcos"
    num_classes: int = 80
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(layout="caffe"))
    fpn: TSPFCOSFPNConfig = field(default_factory=TSPFCOSFPNConfig)
    input_format: Optional[str] = None
    pixel_mean: Optional[tuple] = None
    pixel_std: Optional[tuple] = None
    size_divisor: int = 32
    head: TSPFCOSHeadConfig = field(default_factory=TSPFCOSHeadConfig)
    targets: FCOSTargetConfig = field(default_factory=FCOSTargetConfig)
    transformer: TSPEncoderConfig = field(default_factory=TSPEncoderConfig)
    foi: FoIConfig = field(default_factory=FoIConfig)
    position_encoding: str = "sine"
    loss: TSPFCOSLossConfig = field(default_factory=TSPFCOSLossConfig)
    test: TSPFCOSTestConfig = field(default_factory=TSPFCOSTestConfig)


def check_tsp_fcos_config(cfg: TSPFCOSConfig) -> None:
    """Raises ``ConfigError`` naming the key when a value is out of its domain."""
    def choice(key: str, value, allowed) -> None:
        if value not in allowed:
            raise ConfigError(f"model.{key} must be one of {list(allowed)}, got {value!r}")

    choice("position_encoding", cfg.position_encoding, POSITION_ENCODINGS)
    choice("loss.set_loss", cfg.loss.set_loss, SET_LOSSES)
    choice("loss.class_normaliser", cfg.loss.class_normaliser, CLASS_NORMALISERS)
    if cfg.num_classes < 1:
        raise ConfigError(f"model.num_classes must be >= 1, got {cfg.num_classes}")
    if not cfg.fpn.out_levels:
        raise ConfigError("model.fpn.out_levels is empty: TSP-FCOS needs at least one level")
    if cfg.foi.num_foi < 1:
        raise ConfigError(f"model.foi.num_foi must be >= 1, got {cfg.foi.num_foi}")
    if not 0.0 < cfg.foi.keep_min <= 1.0:
        raise ConfigError(f"model.foi.keep_min must be in (0, 1], got {cfg.foi.keep_min}")
    if cfg.transformer.d_model < 4 or cfg.transformer.d_model % 4:
        raise ConfigError(f"model.transformer.d_model must be a multiple of 4 (y and x sine halves), "
                          f"got {cfg.transformer.d_model}")
    if cfg.transformer.d_model % cfg.transformer.nhead:
        raise ConfigError(f"model.transformer.d_model ({cfg.transformer.d_model}) must be divisible by "
                          f"model.transformer.nhead ({cfg.transformer.nhead})")
    if cfg.fpn.channels % cfg.head.num_groups:
        raise ConfigError(f"model.fpn.channels ({cfg.fpn.channels}) must be divisible by "
                          f"model.head.num_groups ({cfg.head.num_groups}) for the GroupNorm towers")
    if not 0.0 < cfg.head.prior_prob < 1.0:
        raise ConfigError(f"model.head.prior_prob must be in (0, 1), got {cfg.head.prior_prob}")
    ranges = cfg.targets.regression_ranges
    if ranges is not None and len(ranges) != len(cfg.fpn.out_levels):
        raise ConfigError(f"model.targets.regression_ranges has {len(ranges)} entries but model.fpn.out_levels "
                          f"has {len(cfg.fpn.out_levels)} levels {list(cfg.fpn.out_levels)}")
    if cfg.test.topk_candidates < 1 or cfg.test.max_detections < 1:
        raise ConfigError("model.test.topk_candidates and model.test.max_detections must be >= 1")
    if not 0.0 < cfg.test.nms_threshold <= 1.0:
        raise ConfigError(f"model.test.nms_threshold must be in (0, 1], got {cfg.test.nms_threshold}")
