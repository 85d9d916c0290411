"""``model:`` section of an ASAG config. Defaults are the official ASAG-A R50-FPN, setting 100."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ...config import ConfigError
from ..backbones import BackboneConfig, DeformableEncoderConfig, FPNConfig

# model.setting -> per-setting anchor-generator values (spec section 1.4.1 / 4).
SETTINGS = {
    100: dict(anchors_per_fixed_patch=50, anchors_per_probe_patch=20, keep_threshold=0.1,
              min_anchors=5, max_anchors=200, nms_threshold=None),
    300: dict(anchors_per_fixed_patch=150, anchors_per_probe_patch=50, keep_threshold=0.05,
              min_anchors=50, max_anchors=500, nms_threshold=0.7),
}
DECODER_TYPES = ("adamixer", "sparse_rcnn", "deformable")
TEST_HEADS = ("main", "aux_0", "aux_1", "aux_2")
INFERENCE_LEVELS = ("P3P6", "P4P6", "P5P6")


@dataclass
class AnchorGeneratorConfig:
    """``model.anchors``: the Adaptive Sparse Anchor Generator (spec section 1.4).

    Attributes:
        compress_hidden: channels of the first (1x1) conv of each level's compress block (128).
        compress_dim: channels of the compressed maps (8); the patch MLPs are 1800 -> 125*8 wide.
        patch_size: side of every patch in cells (15); the fixed part resizes P5 to 2*15 x 2*15.
        high_threshold, low_threshold: eta_h / eta_l: anchors with eta_l < score < eta_h that are
            smaller than half a next-level patch are probed (0.7 / 0.1).
        patch_nms_threshold: IoU of the per-image NMS between candidate patches (0.25).
        min_training_patches: N_TP, patches per image and probing level in training (4).
        target_patch_iters: training iterations during which ground-truth patches stand in for
            generated ones (the official code does this for epoch 0: ~7330 iterations at 16 images
            per batch). Counted by the ``anchor_generator.train_steps`` buffer.
        inference_levels: ``P3P6`` (full), ``P4P6`` (no P3 probing) or ``P5P6`` (no probing).
        anchors_per_fixed_patch, anchors_per_probe_patch, keep_threshold (eta_f), min_anchors,
            max_anchors: ``null`` = the value of ``model.setting``.
        fast_stop_below: fast inference only: an image stops probing when fewer than this many of
            its anchors are selected (paper: 3).
        fast_max_patches: fast inference only: patches per image and level kept after NMS (15).
        max_patches: patches per image and level kept after NMS in the standard forward (training
            and official inference); ``null`` = no cap (official COCO code), 60 in the official
            CrowdHuman code.
        activation: ``gelu`` (official) or ``relu`` inside the compress blocks and MLPs.
    """

    compress_hidden: int = 128
    compress_dim: int = 8
    patch_size: int = 15
    high_threshold: float = 0.7
    low_threshold: float = 0.1
    patch_nms_threshold: float = 0.25
    min_training_patches: int = 4
    target_patch_iters: int = 7330
    inference_levels: str = "P3P6"
    anchors_per_fixed_patch: Optional[int] = None
    anchors_per_probe_patch: Optional[int] = None
    keep_threshold: Optional[float] = None
    min_anchors: Optional[int] = None
    max_anchors: Optional[int] = None
    fast_stop_below: int = 3
    fast_max_patches: int = 15
    max_patches: Optional[int] = None
    activation: str = "gelu"


@dataclass
class ASAGLossConfig:
    """``model.loss``: matching costs, loss weights and Query Weighting (spec section 2).

    Attributes:
        class_weight, l1_weight, giou_weight: weights of the proposal and head losses and of the
            matching costs (2 / 5 / 2).
        anchor_loss_coef: lambda_an; the anchor losses weigh (2, 1, 0.5) x this (4).
        area_weight: a = area_weight - (area_weight - 1) * sqrt(w h) per target (4; 1 = off).
        gamma1, gamma2: Query Weighting exponents of the score and IoU (0.4 / 0.6).
        query_weighting: off = every matched pair weighs 1 and w_neg = 0 (ablation, paper table 5a).
        focal_alpha, focal_gamma: focal matching cost (0.25 / 2).
        p6_flip_compat: reproduce the official (buggy) targets of the flipped P6 copies.
    """

    class_weight: float = 2.0
    l1_weight: float = 5.0
    giou_weight: float = 2.0
    anchor_loss_coef: float = 4.0
    area_weight: float = 4.0
    gamma1: float = 0.4
    gamma2: float = 0.6
    query_weighting: bool = True
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    p6_flip_compat: bool = False


@dataclass
class DenoisingConfig:
    """``model.denoising`` (spec section 2.6, off by default; the "ASAG-A-dn" checkpoint).

    Attributes:
        enabled: prefix ``num_queries`` noised ground-truth boxes to the anchors in training.
        num_queries: dn queries per image (200).
        noise_scale: lambda of the box noise (0.4).
        fix_noise_scale: keep lambda fixed; otherwise lambda = 2*noise_scale - 0.04 * epoch with
            epochs counted as ``target_patch_iters`` iterations.
    """

    enabled: bool = False
    num_queries: int = 200
    noise_scale: float = 0.4
    fix_noise_scale: bool = True


@dataclass
class ASAGConfig:
    """``model:`` of an ASAG config.

    Attributes:
        name: ``asag``.
        num_classes: C foreground classes.
        backbone, fpn: see ``BackboneConfig`` / ``FPNConfig``; ASAG-A/-S need P2..P5 (``out_levels``
            [2, 3, 4, 5]): the generator reads P3..P5, RoIAlign and the heads P2..P5.
        encoder: ASAG-D only (``decoder_type: deformable``): the deformable encoder neck that
            replaces the FPN (see ``DeformableEncoderConfig``; levels E3..E6, strides 8..64): the
            generator reads E3..E5, RoIAlign and the heads E3..E6. ``fpn`` is then unused.
        input_format, pixel_mean, pixel_std: ``null`` = the backbone weights' convention.
        size_divisor: batches are padded to a multiple of this (32).
        setting: 100 or 300: the paper's query settings (K1/K2, eta_f, anchor bounds, test NMS).
        decoder_type: ``adamixer`` (ASAG-A), ``sparse_rcnn`` (ASAG-S) or ``deformable`` (ASAG-D:
            deformable encoder + Deformable-DETR decoder layers; the reconstruction of spec §3.3,
            no official code or checkpoint exists).
        num_heads_decoder: parallel one-layer heads (4: aux_0..aux_2 and main). 1 builds only
            one head, named ``main`` (the one-head speed model; convert with ``keep_head``).
        test_head: head whose detections are returned: ``main`` (head 3) or ``aux_0``..``aux_2``.
        fast_inference: the paper's speed path (early stop, patch cap, lazy compress); eval only.
        hidden_dim, num_attention_heads, dim_feedforward, dropout: query width, attention heads,
            FFN width, dropout (256 / 8 / 2048 / 0).
        activation: ``gelu`` (official) or ``relu`` in the RPN block and the heads.
        adamixer_in_points, adamixer_out_points, adamixer_groups: AdaMixer sampling points per
            group, mixed output points, groups (32 / 128 / 4).
        deformable_points, deformable_feedforward: ASAG-D heads: deformable cross-attention
            points per attention head and level (4) and FFN width (1024), Deformable DETR's values.
        detections_per_image: top-k over the Q x C scores at test (100).
        test_nms_threshold: class-wise NMS IoU at test; ``null`` = the setting's (none / 0.7).
        anchors, loss, denoising: see their dataclasses.
    """

    name: str = "asag"
    num_classes: int = 80
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    fpn: FPNConfig = field(default_factory=FPNConfig)
    encoder: DeformableEncoderConfig = field(default_factory=DeformableEncoderConfig)
    input_format: Optional[str] = None
    pixel_mean: Optional[tuple] = None
    pixel_std: Optional[tuple] = None
    size_divisor: int = 32
    setting: int = 100
    decoder_type: str = "adamixer"
    num_heads_decoder: int = 4
    test_head: str = "aux_2"
    fast_inference: bool = False
    hidden_dim: int = 256
    num_attention_heads: int = 8
    dim_feedforward: int = 2048
    dropout: float = 0.0
    activation: str = "gelu"
    adamixer_in_points: int = 32
    adamixer_out_points: int = 128
    adamixer_groups: int = 4
    deformable_points: int = 4
    deformable_feedforward: int = 1024
    detections_per_image: int = 100
    test_nms_threshold: Optional[float] = None
    anchors: AnchorGeneratorConfig = field(default_factory=AnchorGeneratorConfig)
    loss: ASAGLossConfig = field(default_factory=ASAGLossConfig)
    denoising: DenoisingConfig = field(default_factory=DenoisingConfig)

    def __post_init__(self):
        if self.setting not in SETTINGS:
            raise ConfigError(f"model.setting must be 100 or 300, got {self.setting!r}")
        if self.decoder_type not in DECODER_TYPES:
            raise ConfigError(f"model.decoder_type must be one of {DECODER_TYPES}, got {self.decoder_type!r}")
        if self.anchors.inference_levels not in INFERENCE_LEVELS:
            raise ConfigError(f"model.anchors.inference_levels must be one of {INFERENCE_LEVELS}, "
                              f"got {self.anchors.inference_levels!r}")
        if self.activation not in ("gelu", "relu") or self.anchors.activation not in ("gelu", "relu"):
            raise ConfigError("model.activation and model.anchors.activation must be 'gelu' or 'relu'")
        if self.anchors.max_patches is not None and self.anchors.max_patches < 1:
            raise ConfigError(f"model.anchors.max_patches must be null or an integer >= 1, got {self.anchors.max_patches}")
        if not 1 <= self.num_heads_decoder <= 4:
            raise ConfigError(f"model.num_heads_decoder must be 1..4, got {self.num_heads_decoder}")
        self.test_head_index()  # validates test_head

    def head_names(self) -> list[str]:
        """Names of the built heads in index order: ``aux_0`` .. ``aux_{n-2}``, then ``main``."""
        return [f"aux_{k}" for k in range(self.num_heads_decoder - 1)] + ["main"]

    def test_head_index(self) -> int:
        """Index of ``test_head`` among the built heads (aux_k = k, main = last)."""
        names = self.head_names()
        if self.test_head not in names:
            raise ConfigError(f"model.test_head must be one of {names} for a model with "
                              f"model.num_heads_decoder={self.num_heads_decoder}, got {self.test_head!r}")
        return names.index(self.test_head)

    def setting_value(self, key: str):
        """An anchor value of ``model.anchors`` if set, else the one of ``model.setting``."""
        value = getattr(self.anchors, key, None)
        return SETTINGS[self.setting][key] if value is None else value
