"""The VisDrone-DET toolkit's evaluation (numpy port of the Python port bundled with QueryDet, which
follows the official MATLAB kit; spec querydet.md §4.3).

Rows are the toolkit's: ``[x, y, w, h, score, category]`` in original image pixels, categories
1..10 evaluated (0 = "ignored regions", 11 = "others", which is never evaluated).

1. Per image, ground-truth and detection boxes lying at least 50 % inside the ignored regions are
   dropped. Like the toolkit this is measured on the pixel grid: the regions are painted into a
   0/1 map and a box's covered share is read from its integral image, with the toolkit's exact
   integer rounding (boxes of zero rounded area are dropped when the image has ignored regions).
   Ground truth with score 0 becomes "ignore" ground truth: it can absorb a detection but is
   never a true positive.
2. Only the first ``max_dets`` rows of an image count (the toolkit reads the first 500 lines of
   a results file; the writer orders them by descending score).
3. Per class and IoU threshold 0.50:0.05:0.95: greedy matching in descending score order (a
   detection takes the unmatched ground truth of highest IoU >= the threshold; failing that, an
   ignore box with IoF >= the threshold swallows it), then VOC all-point AP over all images;
   AR@1/10/100/500 = the recall with the first 1/10/100/500 detections per image. The recall's
   denominator counts the class's score-0 ground truth too, as the toolkit does.
4. The means over classes: with ``class_weighting="image_frequency"`` (the bundled port, the
   default for comparability with the papers) each class counts once per image that contains it;
   ``"uniform"`` counts every class present in the ground truth once (the MATLAB kit).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from ..checkpoint import atomic_write_text
from .coco import EvaluationResult

STAT_NAMES = ("AP", "AP50", "AP75", "AR1", "AR10", "AR100", "AR500")
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
MAX_DETS = (1, 10, 100, 500)
CLASS_WEIGHTINGS = ("image_frequency", "uniform")
NUM_CLASSES = 10  # categories 1..10; 0 = ignored regions, 11 = others


@dataclass
class VisDroneImage:
    """One image: ``gt`` (M, 6) and ``det`` (N, 6) rows ``[x, y, w, h, score, category]``, ``det``
    in the order of the results file (descending score)."""

    name: str
    height: int
    width: int
    gt: np.ndarray
    det: np.ndarray = field(default_factory=lambda: np.zeros((0, 6)))


def _integral_image(mask: np.ndarray) -> np.ndarray:
    return mask.cumsum(axis=0).cumsum(axis=1)


def drop_in_ignored_regions(gt: np.ndarray, det: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Step 1 of the module docstring: ``(gt without class 0 and without boxes >= 50 % inside the
    ignored regions, det without such boxes)``; rows ``[x, y, w, h, score, category]``."""
    regions_mask = gt[:, 5] == 0
    kept_gt = gt[~regions_mask]
    regions = gt[regions_mask, :4].clip(min=1).astype(np.int64)
    if not len(regions):
        return kept_gt, det
    ignore_map = np.zeros((height, width), dtype=np.int64)
    for x1, y1, w, h in regions:
        x2, y2 = min(x1 + w, width), min(y1 + h, height)
        ignore_map[y1 - 1:y2, x1 - 1:x2] = 1
    integral = _integral_image(ignore_map)

    def outside(boxes: np.ndarray) -> np.ndarray:
        keep = np.zeros(len(boxes), dtype=bool)
        for i, box in enumerate(boxes):
            x, y, w, h = np.round(box[:4]).astype(np.int64).clip(min=1)
            x, y = max(1, min(width, x)), max(1, min(height, y))
            right, bottom = min(width, x + w), max(1, min(height, y + h))
            covered = (integral[y - 1, x - 1] + integral[bottom - 1, right - 1]
                       - integral[y - 1, right - 1] - integral[bottom - 1, x - 1])
            area = w * h
            keep[i] = area > 0 and covered / area < 0.5
        return keep

    return kept_gt[outside(kept_gt)], det[outside(det)]


def _xyxy(rows: np.ndarray) -> np.ndarray:
    boxes = rows[:, :4].astype(np.float64).copy()
    boxes[:, 2:] += boxes[:, :2]
    return boxes


def _overlap(a: np.ndarray, b: np.ndarray, mode: str) -> np.ndarray:
    """(N, 4) x (K, 4) xyxy -> (N, K) IoU (``mode="iou"``) or IoF = intersection / area of ``a``."""
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.maximum(iw, 0) * np.maximum(ih, 0)
    area_a = ((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]))[:, None]
    denominator = area_a if mode == "iof" else area_a + ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, inter / denominator, 0.0)


def match_class(gt: np.ndarray, det: np.ndarray, threshold: float) -> tuple[int, np.ndarray, np.ndarray]:
    """Greedy matching of one class in one image (step 3).

    Args:
        gt: (M, 6) ground-truth rows of the class (score 0 = ignore ground truth).
        det: (N, 6) detection rows of the class.

    Returns:
        ``(M, scores (N,) in descending order, match (N,))``: match 1 = TP, 0 = FP, -1 = swallowed
        by ignore ground truth.
    """
    det = det[np.argsort(-det[:, 4], kind="stable")]
    ignore = gt[:, 4] == 0
    boxes = np.concatenate([_xyxy(gt[~ignore]), _xyxy(gt[ignore])])
    kind = np.concatenate([np.zeros(int((~ignore).sum())), -np.ones(int(ignore.sum()))])  # 0 free, 1 taken, -1 ignore
    dets = _xyxy(det)
    overlap = np.concatenate([_overlap(dets, boxes[kind == 0], "iou"), _overlap(dets, boxes[kind == -1], "iof")], axis=1)
    match = np.zeros(len(det))
    for d in range(len(det)):
        best_overlap, best, best_kind = threshold, -1, 0
        for g in range(len(boxes)):
            if kind[g] == 1:
                continue
            if best_kind != 0 and kind[g] == -1:
                break
            if overlap[d, g] < best_overlap:
                continue
            best_overlap, best = overlap[d, g], g
            best_kind = 1 if kind[g] == 0 else -1
        match[d] = best_kind
        if best_kind == 1:
            kind[best] = 1
    return len(gt), det[:, 4], match


def voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC all-point AP: area under the precision envelope."""
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    changes = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[changes + 1] - mrec[changes]) * mpre[changes + 1]))


def evaluate_visdrone(images: Sequence[VisDroneImage], class_names: Sequence[str],
                      class_weighting: str = "image_frequency", max_dets: int = 500,
                      results_dir: str | Path | None = None) -> EvaluationResult:
    """The toolkit's AP, AP50, AP75, AR1/10/100/500 (in [0, 1]) and AP per class.

    Args:
        images: ground truth and detections (module docstring).
        class_names: the 10 names of categories 1..10.
        class_weighting: ``image_frequency`` (default, the bundled port) or ``uniform``.
        max_dets: detections per image for AP (the toolkit's 500); AR uses 1/10/100/500.
        results_dir: also write the per-image ``<name>.txt`` results files there.

    Raises:
        ValueError: an unknown ``class_weighting``.
    """
    if class_weighting not in CLASS_WEIGHTINGS:
        raise ValueError(f"VisDrone class_weighting: expected one of {', '.join(CLASS_WEIGHTINGS)}, "
                         f"got {class_weighting!r}")
    if len(class_names) != NUM_CLASSES:
        raise ValueError(f"VisDrone evaluation needs the {NUM_CLASSES} class names, got {list(class_names)}")
    if results_dir is not None:
        write_visdrone_results(results_dir, images)
    filtered = [drop_in_ignored_regions(np.asarray(i.gt, dtype=np.float64).reshape(-1, 6),
                                        np.asarray(i.det, dtype=np.float64).reshape(-1, 6), i.height, i.width)
                for i in images]
    limits = sorted(set(MAX_DETS) | {max_dets})
    ap = np.zeros((NUM_CLASSES, len(IOU_THRESHOLDS)))
    ar = np.zeros((NUM_CLASSES, len(IOU_THRESHOLDS), len(MAX_DETS)))
    images_with_class = np.zeros(NUM_CLASSES, dtype=np.int64)
    for c in range(NUM_CLASSES):
        category = c + 1
        images_with_class[c] = sum(bool(np.any(gt[:, 5] == category)) for gt, _ in filtered)
        for t, threshold in enumerate(IOU_THRESHOLDS):
            for limit in limits:
                num_gt, scores, matches = 0, [], []
                for gt, det in filtered:
                    det = det[:limit]
                    n, s, m = match_class(gt[gt[:, 5] == category], det[det[:, 5] == category], threshold)
                    num_gt += n
                    scores.append(s)
                    matches.append(m)
                scores, matches = np.concatenate(scores), np.concatenate(matches)
                ranked = matches[np.argsort(-scores, kind="stable")]
                tp = np.cumsum(ranked == 1)
                recall = tp / max(1, num_gt)
                if limit in MAX_DETS and len(recall):
                    ar[c, t, MAX_DETS.index(limit)] = recall.max()
                if limit == max_dets:
                    fp = np.cumsum(ranked == 0)
                    ap[c, t] = voc_ap(recall, tp / np.maximum(fp + tp, 1))
    present = images_with_class > 0
    weights = images_with_class if class_weighting == "image_frequency" else present.astype(np.int64)

    def mean(values: np.ndarray) -> float:
        return float((values * weights).sum() / weights.sum()) if weights.sum() else 0.0

    stats = {"AP": mean(ap.mean(axis=1)), "AP50": mean(ap[:, 0]), "AP75": mean(ap[:, 5])}
    for k, limit in enumerate(MAX_DETS):
        stats[f"AR{limit}"] = mean(ar[:, :, k].mean(axis=1))
    per_class = {name: (float(ap[c].mean()) if present[c] else float("nan")) for c, name in enumerate(class_names)}
    return EvaluationResult(stats=stats, per_class=per_class, num_images=len(images),
                            num_detections=sum(len(np.asarray(i.det).reshape(-1, 6)) for i in images),
                            protocol="visdrone", rows=(STAT_NAMES[:3], STAT_NAMES[3:]),
                            results_path=str(results_dir) if results_dir is not None else None)


def write_visdrone_results(folder: str | Path, images: Sequence[VisDroneImage]) -> None:
    """One ``<name>.txt`` per image, lines ``x,y,w,h,score,category,-1,-1`` as the toolkit reads them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for image in images:
        rows = np.asarray(image.det, dtype=np.float64).reshape(-1, 6)
        lines = [f"{x:.2f},{y:.2f},{w:.2f},{h:.2f},{score:.6f},{int(category)},-1,-1"
                 for x, y, w, h, score, category in rows.tolist()]
        atomic_write_text(folder / f"{image.name}.txt", "\n".join(lines) + ("\n" if lines else ""))


def visdrone_images(records: Sequence, predictions: Mapping[int, dict], category_ids: Sequence[int]) -> list[VisDroneImage]:
    """DetectionRecords (their ``extra`` holds the file's ground-truth rows) + ``{image_id: {"boxes"
    xyxy, "scores", "labels"}}`` -> :class:`VisDroneImage` list, detections by descending score.

    Raises:
        ValueError: a record without VisDrone rows (e.g. a quadrant-split training set), or
            non-finite detections.
    """
    images = []
    for record in records:
        if record.extra is None or record.crop is not None:
            raise ValueError(f"{record.image_path}: not a whole VisDrone image with its annotation rows "
                             "(VisDrone evaluation needs data.*.format visdrone without split_quadrants)")
        pred = predictions.get(record.image_id, {})
        boxes = _numpy(pred.get("boxes", np.zeros((0, 4)))).reshape(-1, 4)
        scores = _numpy(pred.get("scores", np.zeros((0,)))).reshape(-1)
        labels = _numpy(pred.get("labels", np.zeros((0,)))).reshape(-1).astype(np.int64)
        if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
            raise ValueError(f"image {record.image_id}: non-finite boxes or scores (a diverged model?)")
        order = np.argsort(-scores, kind="stable")
        categories = np.asarray(category_ids, dtype=np.float64)[labels[order]] if len(labels) else np.zeros(0)
        det = np.column_stack([boxes[order, :2], boxes[order, 2:] - boxes[order, :2], scores[order], categories])
        images.append(VisDroneImage(Path(record.image_path).stem, record.height, record.width,
                                    np.asarray(record.extra, dtype=np.float64).reshape(-1, 6), det.reshape(-1, 6)))
    return images


def _numpy(values) -> np.ndarray:
    values = values.detach().cpu().numpy() if hasattr(values, "detach") else values
    return np.asarray(values, dtype=np.float64)
