"""FCOS inference post-processing, per level then merged (dense and CSQ levels alike).

A level is ``FCOSLevelOutputs(logits (R, K), ltrb (R, 4) pixels, centerness (R,) logits, points (R, 2))``
for one image; a dense level has R = H * W rows, a Cascade Sparse Query level only its queried children.
The merge (one class-aware NMS, rescale, clip) is the dense detectors' ``merge_detections``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from ..dense.postprocess import Candidates, merge_detections, topk_count


class FCOSLevelOutputs(NamedTuple):
    logits: Tensor      # (R, K) class logits
    ltrb: Tensor        # (R, 4) distances in pixels
    centerness: Tensor  # (R,) centerness logits
    points: Tensor      # (R, 2) (x, y) pixels


def fcos_level_candidates(level: FCOSLevelOutputs, topk_candidates: int) -> Candidates:
    """score = sqrt(sigmoid(cls) * sigmoid(centerness)) per (point, class) (detectron2's FCOS); keep the
    top min(topk, R) scores (``merge_detections`` then drops those <= the score threshold: the same
    set as the top-k of those above it); decode box = (x - l, y - t, x + r, y + b)."""
    logits, ltrb, centerness, points = level
    num_rows, num_classes = logits.shape
    scores = (logits.float().sigmoid() * centerness.float().sigmoid()[:, None]).sqrt().flatten()
    scores, flat_index = scores.topk(topk_count(topk_candidates, num_rows))
    rows = torch.div(flat_index, num_classes, rounding_mode="floor")
    labels = flat_index % num_classes
    d, p = ltrb.index_select(0, rows).float(), points.index_select(0, rows).float()
    boxes = torch.stack((p[:, 0] - d[:, 0], p[:, 1] - d[:, 1], p[:, 0] + d[:, 2], p[:, 1] + d[:, 3]), dim=1)
    return Candidates(boxes, scores, labels)


def fcos_postprocess_image(levels: Sequence[FCOSLevelOutputs], topk_candidates: int, score_threshold: float,
                           nms_threshold: float, max_detections: int, image_size: tuple[int, int],
                           original_size: Optional[tuple[int, int]] = None) -> dict:
    """``fcos_level_candidates`` on every level, then one class-aware NMS (``merge_detections``)."""
    if not levels:
        raise ValueError("fcos_postprocess_image needs at least one level")
    candidates = [fcos_level_candidates(FCOSLevelOutputs(*lv), topk_candidates) for lv in levels]
    return merge_detections(candidates, score_threshold, nms_threshold, max_detections, image_size, original_size)
