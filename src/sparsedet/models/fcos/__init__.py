"""FCOS and QueryDet-FCOS (spec §5.1): anchor-free head without GroupNorm, QueryDet's query head and
Cascade Sparse Query inference through the generic driver ``sparsedet.models.csq``."""
from .config import FCOSConfig, QueryDetFCOSConfig
from .detector import FCOS
from .head import FCOSHead
from .losses import fcos_losses
from .postprocess import FCOSLevelOutputs, fcos_level_candidates
from .targets import centerness_targets, fcos_targets, level_points

__all__ = ["FCOS", "FCOSConfig", "FCOSHead", "FCOSLevelOutputs", "QueryDetFCOSConfig", "centerness_targets",
           "fcos_level_candidates", "fcos_losses", "fcos_targets", "level_points"]
