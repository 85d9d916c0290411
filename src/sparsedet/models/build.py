"""``build_model``: config (bundled name, YAML path or dict) -> detector."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Optional, Union

from torch import nn

from ..config import ConfigError, from_dict, load_config
from .asag.config import ASAGConfig
from .asag.detector import ASAG
from .faster_rcnn import FasterRCNN, FasterRCNNConfig
from .fcos import FCOS, FCOSConfig, QueryDetFCOSConfig
from .querydet import QueryDet, QueryDetConfig
from .retinanet import RetinaNet, RetinaNetConfig
from .sparse_rcnn import SparseRCNN, SparseRCNNConfig
from .tsp import TSPFCOS, TSPFCOSConfig, TSPRCNN, TSPRCNNConfig

# model.name -> (typed config, detector class)
MODELS = {
    "sparse_rcnn": (SparseRCNNConfig, SparseRCNN),
    "retinanet": (RetinaNetConfig, RetinaNet),
    "querydet": (QueryDetConfig, QueryDet),
    "fcos": (FCOSConfig, FCOS),
    "querydet_fcos": (QueryDetFCOSConfig, FCOS),
    "faster_rcnn": (FasterRCNNConfig, FasterRCNN),
    "tsp_fcos": (TSPFCOSConfig, TSPFCOS),
    "tsp_rcnn": (TSPRCNNConfig, TSPRCNN),
    "asag": (ASAGConfig, ASAG),
}


def build_model(config: Union[str, Path, Mapping], overrides: Optional[Union[Iterable[str], Mapping]] = None) -> nn.Module:
    """Builds a detector.

    Args:
        config: a bundled config name (``sparse_rcnn/r50_fpn_100pro_3x``), a YAML path, or a dict.
        overrides: dotted overrides, ``["model.num_proposals=300"]`` or ``{"model.num_proposals": 300}``.

    Returns:
        The detector, in training mode, with the resolved config dict as ``model.config``.
    """
    full = load_config(config, overrides)
    model_cls = MODELS[_model_name(full, config if isinstance(config, (str, Path)) else None)][1]
    model = model_cls(model_config(full))
    model.config = full
    return model


def model_config(config: Mapping):
    """The typed ``model:`` section of a resolved config (no weights built: cheap). Raises
    ``ConfigError`` for an unknown model name or key, so the trainer can check a config before it
    spends time reading data."""
    config_cls = MODELS[_model_name(config, None)][0]
    return from_dict(config_cls, config["model"], "model")


def _model_name(full: Mapping, source: Optional[Union[str, Path]]) -> str:
    section = full.get("model")
    if not isinstance(section, Mapping) or "name" not in section:
        where = f"config {source}" if source is not None else "the config"
        what = "no model section" if not isinstance(section, Mapping) else "a model section without a name"
        raise ConfigError(f"{where} has no model.name ({what}, neither in it nor in its _base_): set model.name to one of "
                          f"{', '.join(sorted(MODELS))}, or start from a bundled config (sparsedet configs)")
    name = section["name"]
    if name not in MODELS:
        raise ConfigError(f"model.name {name!r} is not one of {sorted(MODELS)}")
    return name
