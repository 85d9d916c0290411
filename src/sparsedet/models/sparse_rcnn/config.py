"""``model:`` section of a Sparse R-CNN config. Defaults are the official R50-FPN 100-proposal model."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from ...config import ConfigError
from ..backbones import BackboneConfig, FPNConfig

BOX_DELTA_INITS = ("xavier", "zero")


@dataclass
class SparseRCNNLossConfig:
    """``model.loss``: set criterion and matcher (the matcher uses the same three weights).

    Attributes:
        class_weight, l1_weight, giou_weight: loss and matching-cost weights (2, 5, 2).
        use_focal: sigmoid focal loss over C classes (official); false = softmax over C+1.
        focal_alpha, focal_gamma: focal loss parameters (0.25, 2).
        no_object_weight: softmax mode only: CE weight of the no-object class.
        deep_supervision: supervise every stage (true) or only the last.
        prior_prob: focal mode: initial foreground probability of the classifier bias.
    """

    class_weight: float = 2.0
    l1_weight: float = 5.0
    giou_weight: float = 2.0
    use_focal: bool = True
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    no_object_weight: float = 0.1
    deep_supervision: bool = True
    prior_prob: float = 0.01


@dataclass
class SparseRCNNConfig:
    """``model:`` of a Sparse R-CNN config.

    Attributes:
        name: ``sparse_rcnn``.
        num_classes: C foreground classes.
        backbone, fpn: see ``BackboneConfig`` / ``FPNConfig``; the head pools from all FPN levels.
        input_format, pixel_mean, pixel_std: colour order and 0-255 statistics the backbone weights
            expect; ``null`` = the convention of ``backbone.layout``.
        size_divisor: batches are padded to a multiple of this (the largest FPN stride).
        num_proposals: N learnable proposal boxes and features (paper table 6: 100/300/500).
        proposal_init: initial proposal boxes (paper table 5): ``image`` (whole image, official),
            ``center`` (w = h = 0.1 at the centre), ``grid`` (regular sqrt(N) x sqrt(N) grid),
            ``random`` (Gaussian centres and sizes).
        hidden_dim: d, width of proposal features.
        num_stages: iterative head stages (paper table 7).
        num_heads: self-attention heads.
        dim_feedforward, dropout: FFN width and dropout (official 0.0).
        dim_dynamic: inner width of the dynamic convolution.
        num_cls_layers, num_reg_layers: Linear-LN-ReLU layers in the class / box towers.
        pooler_resolution, pooler_sampling_ratio: RoIAlign output side and samples per bin.
        interaction: ``dynamic_conv`` (official) or ``multihead_attention`` (paper table 8: the
            proposal feature attends to its S*S RoI features).
        self_attention: self-attention among proposals (paper table 4).
        feature_reuse: pass each stage's object features to the next (paper table 3); off = every
            stage starts from the learned proposal features.
        box_weights, box_scale_clamp: box coder weights and upper clamp of the scale deltas.
        box_delta_init: initial weights of each stage's last box layer (``bboxes_delta``):
            ``xavier`` (official) or ``zero`` (opt-in training aid, not in the official model;
            Deformable DETR's choice for iterative refinement). With ``xavier`` every untrained
            stage adds random deltas of order 1, which compound over the 6 stages (stage 6 starts
            twice as far from the targets as stage 1, and later stages stay worse than stage 1 for
            the first hundreds of steps on small data); ``zero`` makes every stage start as the
            identity refinement of its input boxes.
    """

    name: str = "sparse_rcnn"
    num_classes: int = 80
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    fpn: FPNConfig = field(default_factory=FPNConfig)
    input_format: Optional[str] = None
    pixel_mean: Optional[tuple] = None
    pixel_std: Optional[tuple] = None
    size_divisor: int = 32
    num_proposals: int = 100
    proposal_init: str = "image"
    hidden_dim: int = 256
    num_stages: int = 6
    num_heads: int = 8
    dim_feedforward: int = 2048
    dropout: float = 0.0
    dim_dynamic: int = 64
    num_cls_layers: int = 1
    num_reg_layers: int = 3
    pooler_resolution: int = 7
    pooler_sampling_ratio: int = 2
    interaction: str = "dynamic_conv"
    self_attention: bool = True
    feature_reuse: bool = True
    box_weights: tuple = (2.0, 2.0, 1.0, 1.0)
    box_scale_clamp: float = math.log(100000.0 / 16)
    box_delta_init: str = "xavier"
    loss: SparseRCNNLossConfig = field(default_factory=SparseRCNNLossConfig)

    def __post_init__(self) -> None:
        # Ranges are checked when the config is read (from_dict builds this), not when a tensor
        # of a negative size fails deep inside the model.
        for name in ("num_classes", "num_proposals", "hidden_dim", "num_stages", "num_heads", "dim_feedforward",
                     "dim_dynamic", "pooler_resolution", "size_divisor"):
            value = getattr(self, name)
            if isinstance(value, int) and value < 1:
                raise ConfigError(f"model.{name}: expected an integer >= 1, got {value}")
        if isinstance(self.pooler_sampling_ratio, int) and self.pooler_sampling_ratio < 0:
            raise ConfigError(f"model.pooler_sampling_ratio: expected an integer >= 0, got {self.pooler_sampling_ratio}")
        if self.box_delta_init not in BOX_DELTA_INITS:
            raise ConfigError(f"model.box_delta_init: expected one of {', '.join(BOX_DELTA_INITS)}, got {self.box_delta_init!r}")
        if isinstance(self.dropout, (int, float)) and not 0 <= self.dropout < 1:
            raise ConfigError(f"model.dropout: expected a number in [0, 1), got {self.dropout}")
