"""IoU matcher for anchor-based dense detectors (detectron2 ``Matcher`` semantics)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

# Labels of ``IoUMatcher`` outputs.
BACKGROUND, IGNORE, FOREGROUND = 0, -1, 1


class IoUMatcher:
    """Assigns each anchor to at most one ground-truth box by IoU.

    With thresholds ``(low, high)`` (RetinaNet: 0.4, 0.5), an anchor whose best IoU over the GT
    boxes is ``< low`` is background (label 0), ``low <= IoU < high`` is ignored (label -1: left
    out of the classification loss) and ``>= high`` is foreground (label 1) of its best GT.

    ``allow_low_quality_matches``: for each GT, every anchor whose IoU equals that GT's highest
    IoU is promoted to foreground, so that no GT is left without an anchor. These are detectron2
    ``Matcher`` semantics (the RetinaNet baseline): the promoted anchor keeps its own argmax GT
    as match (which may be another GT with larger IoU), and ties promote all tied anchors. The
    QueryDet configs use detectron2's ``LoopMatcher`` instead, which differs only on exact ties;
    we use ``Matcher`` everywhere. One deliberate guard: a GT whose highest IoU is 0 (a box that
    overlaps no anchor at all) promotes nothing, where detectron2 would promote every anchor.
    """

    def __init__(self, thresholds: Sequence[float] = (0.4, 0.5), allow_low_quality_matches: bool = True):
        if len(thresholds) != 2 or not 0.0 <= thresholds[0] <= thresholds[1] <= 1.0:
            raise ValueError(f"matcher thresholds must be (low, high) with 0 <= low <= high <= 1, got {list(thresholds)}")
        self.low, self.high = float(thresholds[0]), float(thresholds[1])
        self.allow_low_quality_matches = bool(allow_low_quality_matches)

    def __call__(self, iou: Tensor) -> tuple[Tensor, Tensor]:
        """
        Args:
            iou: (M, N) IoU between M ground-truth boxes and N anchors (M may be 0).

        Returns:
            matches: (N,) int64 index of each anchor's best GT (0 when M = 0; meaningless for
                background/ignored anchors).
            labels: (N,) int8 label, ``FOREGROUND`` 1 / ``BACKGROUND`` 0 / ``IGNORE`` -1.
        """
        num_anchors = iou.shape[1]
        if iou.shape[0] == 0:
            # No GT: every anchor is background (spec §1.4).
            return (torch.zeros(num_anchors, dtype=torch.int64, device=iou.device),
                    torch.full((num_anchors,), BACKGROUND, dtype=torch.int8, device=iou.device))
        best_iou, matches = iou.max(dim=0)
        labels = torch.full((num_anchors,), IGNORE, dtype=torch.int8, device=iou.device)
        labels[best_iou < self.low] = BACKGROUND
        labels[best_iou >= self.high] = FOREGROUND
        if self.allow_low_quality_matches:
            highest_per_gt = iou.max(dim=1, keepdim=True).values        # (M, 1)
            is_best = (iou == highest_per_gt) & (highest_per_gt > 0)     # (M, N)
            labels[is_best.any(dim=0)] = FOREGROUND
        return matches, labels
