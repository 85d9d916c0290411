"""The official CrowdHuman evaluation: AP, mMR, recall and JI (numpy port of CrowdDet's
``lib/evaluate``: ``compute_APMR.py``, ``compute_JI.py``, ``database.py``, as used by Sparse R-CNN
and ASAG; spec sparse_rcnn.md §6.2 / asag.md §5).

Every detection counts (no per-image cap, unlike COCO's 100). Per image, ground truth and
detections are clipped to the image (``clip_boundary``), then matched "Caltech style" at IoU 0.5:

* detections in descending score order; each takes the unmatched person box of highest IoU if
  that IoU is > 0.5 (true positive). Only when no person box qualifies, an ignore region whose
  IoA (intersection / detection area) is > 0.5 swallows it (neither TP nor FP; an ignore region
  can swallow any number of detections). Otherwise it is a false positive.
* AP: all images' detections sorted by score; the recall/precision points after each TP or FP
  are integrated with the trapezoid rule (starting from the first point, as the official code).
* mMR: miss rate 1 - recall against false positives per image (FPPI); at each of the nine FPPI
  references 10^-2, 10^-1.75, ..., 10^0 the miss rate of the first point with FPPI >= it (the
  last point when none reaches it); mMR = exp(mean(log(those miss rates))). Lower is better.
* recall: the recall with every detection (the last point).
* JI: for each score threshold 0.0, 0.1, ..., 0.9, each image's detections above it are matched
  one-to-one to its person boxes by a maximum bipartite matching on the pairs with IoU > 0.5;
  unmatched detections and unmatched person boxes lying mostly (IoA > 0.5) inside an ignore region
  are left out; the image's ratio is k / (m + n - k) (k matches, m person boxes, n detections);
  JI = the best threshold's mean ratio over the images with m or n non-zero.

When there are no detections at all the official code returns NaN for mMR; here it is 1.0 (every
person missed).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching

from ..checkpoint import atomic_write_text
from .coco import EvaluationResult

STAT_NAMES = ("AP", "mMR", "Recall", "JI")
MATCH_IOU = 0.5
FPPI_REFERENCES = (0.0100, 0.0178, 0.03160, 0.0562, 0.1000, 0.1778, 0.3162, 0.5623, 1.000)
JI_SCORE_THRESHOLDS = tuple(0.1 * i for i in range(10))


@dataclass
class CrowdHumanImage:
    """Ground truth and detections of one image, in its original pixels.

    Attributes:
        name: the image's ``ID`` (file name without ``.jpg``), for the results file.
        height, width: image size.
        boxes: (M, 4) xyxy person boxes.
        ignore_boxes: (K, 4) xyxy ignore regions.
        det_boxes: (N, 4) xyxy detections.
        det_scores: (N,) their scores.
    """

    name: str
    height: int
    width: int
    boxes: np.ndarray
    ignore_boxes: np.ndarray
    det_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    det_scores: np.ndarray = field(default_factory=lambda: np.zeros((0,)))


def clip_boundary(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """The official clipping: x1 to [0, width - 1], x2 to [0, width] (same for y). (N, 4) -> (N, 4)."""
    boxes = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    boxes[:, 0] = np.minimum(np.maximum(boxes[:, 0], 0), width - 1)
    boxes[:, 1] = np.minimum(np.maximum(boxes[:, 1], 0), height - 1)
    boxes[:, 2] = np.maximum(np.minimum(boxes[:, 2], width), 0)
    boxes[:, 3] = np.maximum(np.minimum(boxes[:, 3], height), 0)
    return boxes


def overlaps(a: np.ndarray, b: np.ndarray, iou: bool) -> np.ndarray:
    """(N, 4) x (K, 4) xyxy -> (N, K) IoU, or IoA = intersection / area of the ``a`` box."""
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.maximum(iw, 0) * np.maximum(ih, 0)
    area_a = ((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]))[:, None]
    if not iou:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(area_a > 0, inter / area_a, 0.0)
    area_b = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))[None, :]
    union = area_a + area_b - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def match_image(image: CrowdHumanImage, threshold: float = MATCH_IOU) -> list[tuple[float, int]]:
    """Caltech-style matching of one image (module docstring).

    Returns:
        ``[(score, 1 for TP / 0 for FP)]`` for every detection not swallowed by an ignore region,
        in descending score order.
    """
    if len(image.det_scores) == 0:
        return []
    order = np.argsort(-np.asarray(image.det_scores), kind="stable")
    dets = clip_boundary(image.det_boxes, image.height, image.width)[order]
    scores = np.asarray(image.det_scores, dtype=np.float64)[order]
    # Person boxes first, then ignore regions (the official code sorts the ground truth by its tag).
    persons = clip_boundary(image.boxes, image.height, image.width)
    ignores = clip_boundary(image.ignore_boxes, image.height, image.width)
    num_persons = len(persons)
    gts = np.concatenate([persons, ignores])
    iou, ioa = overlaps(dets, gts, iou=True), overlaps(dets, gts, iou=False)
    matched = np.zeros(len(gts), dtype=bool)
    scored = []
    for i in range(len(dets)):
        best, best_overlap = -1, threshold
        for j in range(len(gts)):
            if matched[j]:
                continue
            if j < num_persons:
                if iou[i, j] > best_overlap:
                    best, best_overlap = j, iou[i, j]
            else:
                if best >= 0:
                    break
                if ioa[i, j] > threshold:
                    best, best_overlap = j, ioa[i, j]
        if best >= 0 and best < num_persons:
            matched[best] = True
            scored.append((float(scores[i]), 1))
        elif best < 0:
            scored.append((float(scores[i]), 0))
    return scored


def average_precision_and_miss_rate(scored: Sequence[tuple[float, int]], num_persons: int,
                                    num_images: int) -> tuple[float, float, float]:
    """AP, mMR and recall from every image's ``match_image`` output (module docstring).

    Args:
        scored: ``(score, is_tp)`` of all images together (any order).
        num_persons: person boxes (not ignore regions) in all images.
        num_images: images evaluated (the FPPI denominator).
    """
    ranked = sorted(scored, key=lambda item: item[0], reverse=True)
    if not ranked:
        return 0.0, 1.0, 0.0
    is_tp = np.array([tp for _, tp in ranked], dtype=np.float64)
    tp = np.cumsum(is_tp)
    fp = np.cumsum(1.0 - is_tp)
    recall = tp / num_persons if num_persons else np.zeros_like(tp)
    precision = tp / (tp + fp)
    ap = float(np.sum((recall[1:] - recall[:-1]) * (precision[1:] + precision[:-1]) / 2))
    fppi = fp / max(num_images, 1)
    miss_rate = 1.0 - recall
    references = []
    for reference in FPPI_REFERENCES:
        reached = np.nonzero(fppi >= reference)[0]
        references.append(miss_rate[reached[0]] if len(reached) else miss_rate[-1])
    with np.errstate(divide="ignore"):
        mmr = float(np.exp(np.mean(np.log(np.array(references)))))
    return ap, mmr, float(recall[-1])


def _bipartite_matches(iou: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """A maximum matching of detections (rows) to person boxes (columns) over pairs with IoU > threshold."""
    if iou.size == 0:
        return []
    graph = csr_matrix((iou > threshold).astype(np.int8))
    column_of_row = maximum_bipartite_matching(graph, perm_type="column")
    return [(row, int(col)) for row, col in enumerate(column_of_row) if col >= 0]


def _count_in_ignore(boxes: np.ndarray, ignores: np.ndarray, threshold: float) -> int:
    if not len(ignores) or not len(boxes):
        return 0
    return int((overlaps(boxes, ignores, iou=False).max(axis=1) > threshold).sum())


def jaccard_index(images: Sequence[CrowdHumanImage], threshold: float = MATCH_IOU) -> tuple[float, float]:
    """JI (module docstring): ``(best mean ratio, its score threshold)``; (0, 0) without images."""
    best, best_threshold = 0.0, 0.0
    for score_threshold in JI_SCORE_THRESHOLDS:
        ratios, counted = [], 0
        for image in images:
            persons = clip_boundary(image.boxes, image.height, image.width)
            ignores = clip_boundary(image.ignore_boxes, image.height, image.width)
            dets = clip_boundary(image.det_boxes, image.height, image.width)
            dets = dets[np.asarray(image.det_scores, dtype=np.float64).reshape(-1) > score_threshold]
            matches = _bipartite_matches(overlaps(dets, persons, iou=True), threshold) if len(persons) else []
            matched_dets = {d for d, _ in matches}
            matched_persons = {p for _, p in matches}
            unmatched_dets = dets[[i for i in range(len(dets)) if i not in matched_dets]]
            unmatched_persons = persons[[i for i in range(len(persons)) if i not in matched_persons]]
            k = len(matches)
            m = len(persons) - _count_in_ignore(unmatched_persons, ignores, threshold)
            n = len(dets) - _count_in_ignore(unmatched_dets, ignores, threshold)
            ratios.append(k / (m + n - k + 1e-6))
            counted += int(m != 0 or n != 0)
        mean_ratio = sum(ratios) / counted if counted else 0.0
        if mean_ratio > best:
            best, best_threshold = mean_ratio, score_threshold
    return best, best_threshold


def write_odgt_results(path: str | Path, images: Sequence[CrowdHumanImage]) -> None:
    """The detections as the official tool reads them: one JSON line per image with ``ID``,
    ``height``, ``width`` and ``dtboxes`` ``[{"box": [x, y, w, h], "score": s, "tag": 1}]``."""
    lines = []
    for image in images:
        boxes = np.asarray(image.det_boxes, dtype=np.float64).reshape(-1, 4)
        dtboxes = [{"box": [x1, y1, x2 - x1, y2 - y1], "score": float(score), "tag": 1}
                   for (x1, y1, x2, y2), score in zip(boxes.tolist(), np.asarray(image.det_scores).tolist())]
        lines.append(json.dumps({"ID": image.name, "height": image.height, "width": image.width,
                                 "dtboxes": dtboxes}))
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))


def evaluate_crowdhuman(images: Sequence[CrowdHumanImage], results_path: str | Path | None = None,
                        class_name: str = "person") -> EvaluationResult:
    """AP, mMR, recall and JI of the detections in ``images`` (all in [0, 1]).

    ``per_class`` holds the one class's AP. ``results_path``: also write the ``.odgt`` results.
    """
    scored = [item for image in images for item in match_image(image)]
    num_persons = sum(len(image.boxes) for image in images)
    ap, mmr, recall = average_precision_and_miss_rate(scored, num_persons, len(images))
    ji, _ = jaccard_index(images)
    if results_path is not None:
        write_odgt_results(results_path, images)
    return EvaluationResult(stats={"AP": ap, "mMR": mmr, "Recall": recall, "JI": ji}, per_class={class_name: ap},
                            num_images=len(images), num_detections=sum(len(i.det_scores) for i in images),
                            protocol="crowdhuman", rows=(STAT_NAMES,),
                            results_path=str(results_path) if results_path is not None else None)


def crowdhuman_images(records: Sequence, predictions: Mapping[int, dict]) -> list[CrowdHumanImage]:
    """DetectionRecords + ``{image_id: {"boxes", "scores", ...}}`` -> :class:`CrowdHumanImage` list.
    An image without an entry in ``predictions`` has no detections."""
    images = []
    for record in records:
        pred = predictions.get(record.image_id, {})
        boxes = _numpy(pred.get("boxes", np.zeros((0, 4)))).reshape(-1, 4)
        scores = _numpy(pred.get("scores", np.zeros((0,)))).reshape(-1)
        if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
            raise ValueError(f"image {record.image_id}: non-finite boxes or scores (a diverged model?)")
        images.append(CrowdHumanImage(Path(record.image_path).stem, record.height, record.width,
                                      _numpy(record.boxes).reshape(-1, 4), _numpy(record.ignore_boxes).reshape(-1, 4),
                                      boxes, scores))
    return images


def _numpy(values) -> np.ndarray:
    values = values.detach().cpu().numpy() if hasattr(values, "detach") else values
    return np.asarray(values, dtype=np.float64)


__all__ = ["CrowdHumanImage", "STAT_NAMES", "average_precision_and_miss_rate", "clip_boundary",
           "crowdhuman_images", "evaluate_crowdhuman", "jaccard_index", "match_image", "write_odgt_results"]
