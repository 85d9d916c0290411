"""``model:`` section of a RetinaNet config. Defaults are the official COCO R50-FPN baseline of the
QueryDet repository (``RetinaNet_D2``: detectron2 RetinaNet on P3..P7)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from ..backbones import BackboneConfig, FPNConfig
from ..dense.config import AnchorConfig, DenseHeadConfig, DenseLossConfig, DenseTestConfig, IoUMatcherConfig


@dataclass
class RetinaNetFPNConfig(FPNConfig):
    """``model.fpn`` with RetinaNet's defaults: C3..C5 -> P3..P7, P6 from C5, P7 from ReLU(P6).

    (A subclass rather than a default_factory so that a partial ``fpn:`` section in a config keeps
    these defaults for the keys it does not give.)
    """

    in_stages: tuple = (3, 4, 5)
    out_levels: tuple = (3, 4, 5, 6, 7)
    channels: int = 256
    top_block: str = "p6p7_from_c5"


@dataclass
class RetinaNetConfig:
    """``model:`` of a RetinaNet config.

    Attributes:
        name: ``retinanet``.
        num_classes: K foreground classes.
        backbone, fpn: see ``BackboneConfig`` / ``FPNConfig``. The detection head runs on every
            level of ``fpn.out_levels`` (default C3..C5 -> P3..P7, P6 from C5). The backbone
            default is ``BackboneConfig``'s (torchvision-layout R-50); the official recipes in
            ``configs/retinanet`` set ``layout: caffe`` (MSRA weights, BGR, mean only).
        input_format, pixel_mean, pixel_std: colour order and 0-255 statistics the backbone
            weights expect; ``null`` = the convention of ``backbone.layout`` (caffe: BGR, mean only).
        size_divisor: batches are padded bottom/right to a multiple of this (32).
        anchors: ``AnchorConfig`` (one base size per detection level).
        head: ``DenseHeadConfig`` (tower depth, prior probability).
        matcher: ``IoUMatcherConfig`` (0.4 / 0.5 with low-quality matches).
        box_weights, box_scale_clamp: box coder weights (1, 1, 1, 1) and upper clamp of the
            decoded scale deltas, log(1000 / 16).
        loss: ``DenseLossConfig`` (focal, smooth-L1, level weights, EMA normaliser).
        test: ``DenseTestConfig`` (top-k, score threshold, NMS, detections per image).
    """

    name: str = "retinanet"
    num_classes: int = 80
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    fpn: RetinaNetFPNConfig = field(default_factory=RetinaNetFPNConfig)
    input_format: Optional[str] = None
    pixel_mean: Optional[tuple] = None
    pixel_std: Optional[tuple] = None
    size_divisor: int = 32
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    head: DenseHeadConfig = field(default_factory=DenseHeadConfig)
    matcher: IoUMatcherConfig = field(default_factory=IoUMatcherConfig)
    box_weights: tuple = (1.0, 1.0, 1.0, 1.0)
    box_scale_clamp: float = math.log(1000.0 / 16)
    loss: DenseLossConfig = field(default_factory=DenseLossConfig)
    test: DenseTestConfig = field(default_factory=DenseTestConfig)
