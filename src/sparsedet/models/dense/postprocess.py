"""Inference post-processing of anchor-based dense detectors (spec §1.6, §3.5).

The unit of work is a *level*: ``(logits (R, K), deltas (R, 4), anchors (R, 4))`` for one image,
R = number of anchor rows. A dense level has R = H * W * A; a Cascade Sparse Query level holds only
the anchors of its queried positions (R = n * A). Both go through the same code:

1. ``select_level_top``: the top min(topk, R) (anchor, class) logits of the level, with their
   deltas and anchors; all levels' selections are then decoded at once (``decode_selection``;
   ``level_candidates`` = both steps on one level);
2. ``merge_detections``: concatenate all levels, drop scores ``<= score_threshold``, one
   class-aware NMS, keep ``max_detections``, rescale to the original image size, clip, drop empty
   boxes.

Taking the top-k before the threshold gives the same set as detectron2's threshold-then-top-k (when
more than k scores pass, the top k all pass), and lets every level of an image share one threshold
filter: a boolean filter synchronises a GPU with the host, so one per image instead of one per level.
Everything runs in fp32, whatever the head's dtype under autocast.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor
from ...layers.box_coder import BoxCoder
from ...layers.box_ops import class_aware_nms
from ..preprocess import rescale_boxes


def topk_count(k: int, num_rows):
    """``min(k, num_rows)``; ``num_rows`` is a 0-dim tensor when traced for ONNX export, and the
    result must stay a traced value there (a Python ``min`` would freeze the export-time count)."""
    if isinstance(num_rows, Tensor):
        return torch.clamp(num_rows, max=int(k))
    return min(int(k), num_rows)


class LevelOutputs(NamedTuple):
    """One image's head outputs on one level (dense or sparse), rows ordered position-major."""

    logits: Tensor   # (R, K)
    deltas: Tensor   # (R, 4)
    anchors: Tensor  # (R, 4) xyxy


class Candidates(NamedTuple):
    boxes: Tensor    # (n, 4) xyxy, fp32
    scores: Tensor   # (n,)
    labels: Tensor   # (n,) int64


class LevelSelection(NamedTuple):
    """A level's top-k (anchor, class) pairs before decoding (``select_level_top``)."""

    logits: Tensor   # (k,) selected class logits, descending
    labels: Tensor   # (k,) int64 class index
    deltas: Tensor   # (k, 4) deltas of the selected rows
    anchors: Tensor  # (k, 4) their anchors


def select_level_top(level: LevelOutputs, topk_candidates: int) -> LevelSelection:
    """The level's top min(topk, R) (anchor, class) pairs by logit, with their deltas and anchors.

    The cap is ``min(topk_candidates, R)`` with R the number of anchor rows (not R * K): this is
    detectron2 0.4's rule, which the official QueryDet numbers were produced with. The selection runs
    on the logits (sigmoid is increasing), so only the k selected scores go through the sigmoid: a
    dense P2 level has tens of millions of logits.
    """
    logits, deltas, anchors = level
    num_rows, num_classes = logits.shape
    top_logits, flat_index = logits.flatten().topk(topk_count(topk_candidates, num_rows))  # sorted, descending
    rows = torch.div(flat_index, num_classes, rounding_mode="floor")
    return LevelSelection(top_logits, flat_index % num_classes, deltas.index_select(0, rows),
                          anchors.index_select(0, rows))


def decode_selection(selection: LevelSelection, box_coder: BoxCoder) -> Candidates:
    """Decoded boxes (fp32) and sigmoid scores of selected pairs (one level's or several levels'
    concatenated: every step is element-wise, so decoding levels together or apart is the same)."""
    boxes = box_coder.decode(selection.deltas.float(), selection.anchors.float())
    return Candidates(boxes, selection.logits.float().sigmoid(), selection.labels)


def level_candidates(level: LevelOutputs, box_coder: BoxCoder, topk_candidates: int) -> Candidates:
    """The level's top min(topk, R) (anchor, class) pairs by score, decoded (spec §1.6 steps 1-4,
    without the score threshold, which ``merge_detections`` applies to all levels at once); see
    ``select_level_top`` for the top-k rule."""
    return decode_selection(select_level_top(level, topk_candidates), box_coder)


def merge_detections(candidates: Sequence[Candidates], score_threshold: float, nms_threshold: float,
                     max_detections: int, image_size: tuple[int, int],
                     original_size: Optional[tuple[int, int]] = None) -> dict:
    """All levels' candidates of one image -> ``{"boxes" (K, 4), "scores" (K,), "labels" (K,)}``.

    Keep the scores ``> score_threshold``, one class-aware NMS over all levels (torchvision
    ``batched_nms`` semantics in one ``nms`` call: ``layers.box_ops.class_aware_nms``), keep the
    ``max_detections`` best, map from the network input's ``image_size``
    (H, W) to ``original_size`` (per-axis scale; ``None`` = stay in input pixels), clip to it, and drop
    boxes with zero width or height.
    """
    scores = torch.cat([c.scores for c in candidates])
    keep = (scores > score_threshold).nonzero().squeeze(1)
    boxes = torch.cat([c.boxes for c in candidates]).index_select(0, keep)
    labels = torch.cat([c.labels for c in candidates]).index_select(0, keep)
    scores = scores.index_select(0, keep)
    keep = class_aware_nms(boxes, scores, labels, nms_threshold)[:max_detections]  # sorted by score
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    boxes = rescale_boxes(boxes, tuple(image_size), None if original_size is None else tuple(original_size))
    nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return {"boxes": boxes[nonempty], "scores": scores[nonempty], "labels": labels[nonempty]}


def postprocess_image(levels: Sequence[LevelOutputs], box_coder: BoxCoder, topk_candidates: int,
                      score_threshold: float, nms_threshold: float, max_detections: int,
                      image_size: tuple[int, int], original_size: Optional[tuple[int, int]] = None) -> dict:
    """Every level's top-k (``select_level_top``), decoded together, then ``merge_detections``.

    Same detections as ``level_candidates`` per level: the top-k is per level, and what follows
    is element-wise, so it runs once over all levels' selections (one decode instead of one per
    level: ~40 small ops, i.e. GPU launches, per level saved).
    """
    if not levels:
        raise ValueError("postprocess_image needs at least one level")
    selections = [select_level_top(LevelOutputs(*level), topk_candidates) for level in levels]
    if len(selections) > 1:
        selections = [LevelSelection(*(torch.cat(parts) for parts in zip(*selections)))]
    candidates = [decode_selection(selections[0], box_coder)]
    return merge_detections(candidates, score_threshold, nms_threshold, max_detections, image_size, original_size)
