"""RetinaNet: the dense detector on P3..P7 (QueryDet's baseline, spec §1)."""
from __future__ import annotations

from ..dense.detector import DenseDetector
from .config import RetinaNetConfig


class RetinaNet(DenseDetector):
    """RetinaNet detector; see ``DenseDetector`` for the call contract and ``RetinaNetConfig``
    for every option. Training returns ``{"loss_cls", "loss_box_reg"}``."""

    def __init__(self, cfg: RetinaNetConfig):
        super().__init__(cfg)
