"""``model:`` section of a QueryDet config. Defaults are the official COCO R50-FPN QueryDet
(``RetinaNetQueryDet``): RetinaNet on P2..P7 with re-balanced level weights and a query head on P3/P4."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ...config import ConfigError
from ..backbones import FPNConfig
from ..csq import CSQConfig
from ..dense.config import AnchorConfig, DenseLossConfig, DenseTestConfig
from ..retinanet.config import RetinaNetConfig

# Official level weights beta_l for P2..P7 (spec §2.3). The paper's wording ("linear 1 -> 3",
# "1 -> 2.6") would give [1.0, 1.4, 1.8, 2.2, 2.6, 3.0] and [1.0, 1.32, 1.64, 1.96, 2.28, 2.6].
COCO_LEVEL_WEIGHTS = (1.0, 1.4, 2.1, 2.5, 2.9, 3.2)
VISDRONE_LEVEL_WEIGHTS = (1.0, 1.4, 1.8, 2.2, 2.6, 2.6)
PAPER_COCO_LEVEL_WEIGHTS = (1.0, 1.4, 1.8, 2.2, 2.6, 3.0)
PAPER_VISDRONE_LEVEL_WEIGHTS = (1.0, 1.32, 1.64, 1.96, 2.28, 2.6)

RADIUS_MODES = ("code", "paper")


@dataclass
class QueryHeadConfig:
    """``model.query``: the query head and its training targets (spec §2.1-2.3).

    Attributes:
        levels: levels with a query head (one shared set of weights); [] = no query head (the
            paper's "HR + RB" ablation row). Official [3, 4].
        num_convs: 3x3 conv + ReLU layers before the 1-channel predictor (official 4).
        small_object_bounds: per query level, an object is small iff sqrt(area) < bound (32, 64).
        radius_mode: ``code`` (official): a position is positive iff its distance to the nearest
            small object's centre is < that object's own sqrt(area) * radius_scale; ``paper``:
            < the level's bound (the paper's s_l) * radius_scale.
        radius_scale: per query level, the radius multiplier (official ENCODE_CENTER_DIS_COEFF [1, 1]).
        loss_weight: multiplies each level's mean focal loss (10).
        focal_alpha, focal_gamma: focal loss of the query logits (0.25; gamma 1.2 COCO, 1.3 VisDrone).
    """

    levels: tuple = (3, 4)
    num_convs: int = 4
    small_object_bounds: tuple = (32.0, 64.0)
    radius_mode: str = "code"
    radius_scale: tuple = (1.0, 1.0)
    loss_weight: float = 10.0
    focal_alpha: float = 0.25
    focal_gamma: float = 1.2


# Subclasses (not default_factory lambdas) so that a partial section in a config, e.g.
# ``test: {max_detections: 500}``, keeps QueryDet's defaults for the keys it does not give.

@dataclass
class QueryDetFPNConfig(FPNConfig):
    """``model.fpn`` with QueryDet's defaults: C2..C5 -> P2..P7, P6 from C5."""

    in_stages: tuple = (2, 3, 4, 5)
    out_levels: tuple = (2, 3, 4, 5, 6, 7)
    channels: int = 256
    top_block: str = "p6p7_from_c5"


@dataclass
class QueryDetAnchorConfig(AnchorConfig):
    """``model.anchors`` with QueryDet's defaults: base sizes 16..512 on P2..P7."""

    sizes: tuple = (16, 32, 64, 128, 256, 512)


@dataclass
class QueryDetLossConfig(DenseLossConfig):
    """``model.loss`` with QueryDet's defaults: the COCO code level weights."""

    level_loss_weights: Optional[tuple] = COCO_LEVEL_WEIGHTS


@dataclass
class QueryDetTestConfig(DenseTestConfig):
    """``model.test`` with QueryDet's defaults: score threshold 1e-4."""

    score_threshold: float = 1e-4


@dataclass
class QueryDetConfig(RetinaNetConfig):
    """``model:`` of a QueryDet config: every ``RetinaNetConfig`` field (with QueryDet defaults:
    P2..P7, anchors 16..512, COCO code level weights, score threshold 1e-4), plus ``query``
    (``QueryHeadConfig``) and ``csq`` (``CSQConfig``).

    Attributes:
        name: ``querydet``.
    """

    name: str = "querydet"
    fpn: QueryDetFPNConfig = field(default_factory=QueryDetFPNConfig)
    anchors: QueryDetAnchorConfig = field(default_factory=QueryDetAnchorConfig)
    loss: QueryDetLossConfig = field(default_factory=QueryDetLossConfig)
    test: QueryDetTestConfig = field(default_factory=QueryDetTestConfig)
    query: QueryHeadConfig = field(default_factory=QueryHeadConfig)
    csq: CSQConfig = field(default_factory=CSQConfig)


def check_querydet_config(cfg: QueryDetConfig) -> None:
    """Raises ``ConfigError`` naming the field for inconsistent ``model.query`` / ``model.csq``."""
    check_query_cascade(tuple(cfg.fpn.out_levels), cfg.query, cfg.csq)
    if cfg.query.levels and cfg.query.num_convs < 0:
        raise ConfigError(f"model.query.num_convs must be >= 0, got {cfg.query.num_convs}")


def check_query_cascade(levels: tuple, query, csq: CSQConfig) -> None:
    """``model.query`` and ``model.csq`` against a model's levels (detection levels, or an RPN's):
    the checks every model with a query head shares (QueryDet, QueryDet-FCOS, the CSQ RPN).

    Raises:
        ConfigError: naming the field.
    """
    q_levels = tuple(query.levels)
    missing = [lvl for lvl in q_levels if lvl not in levels]
    if missing:
        raise ConfigError(f"model.query.levels {list(q_levels)}: levels {missing} are not detection levels "
                          f"(model.fpn.out_levels = {list(levels)})")
    if len(set(q_levels)) != len(q_levels):
        raise ConfigError(f"model.query.levels has duplicates: {list(q_levels)}")
    for name in ("small_object_bounds", "radius_scale"):
        if len(getattr(query, name)) != len(q_levels):
            raise ConfigError(f"model.query.{name} has {len(getattr(query, name))} entries but model.query.levels "
                              f"has {len(q_levels)}: give one per query level")
    if query.radius_mode not in RADIUS_MODES:
        raise ConfigError(f"model.query.radius_mode must be one of {RADIUS_MODES}, got {query.radius_mode!r}")
    if not csq.enabled:  # CSQConfig checks its own fields
        return
    if not q_levels:
        raise ConfigError("model.csq.enabled needs a query head, but model.query.levels is empty")
    if csq.start_level not in q_levels:
        raise ConfigError(f"model.csq.start_level P{csq.start_level} has no query head: it must be one of "
                          f"model.query.levels {list(q_levels)}")
    # Each sparse level except the lowest must produce queries for the next level down.
    sparse = sorted(lvl for lvl in levels if lvl < csq.start_level)
    if not sparse:
        raise ConfigError(f"model.csq.start_level P{csq.start_level} has no detection level below it "
                          f"(model.fpn.out_levels = {list(levels)}): nothing to query")
    if sparse != list(range(sparse[0], csq.start_level)):
        raise ConfigError(f"model.csq: the levels below model.csq.start_level must be consecutive, got {sparse}")
    unqueried = [lvl for lvl in sparse[1:] if lvl not in q_levels]
    if unqueried:
        raise ConfigError(f"model.csq: the cascade from P{csq.start_level} needs query heads on levels {unqueried} "
                          f"too (add them to model.query.levels = {list(q_levels)}, or raise model.csq.start_level)")
