"""Box AP with pycocotools (per-category 100-detection cap, as COCO defines it)."""
from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path
from typing import Mapping, Optional, Sequence

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def to_coco_results(predictions: Mapping[int, dict], category_ids: Sequence[int]) -> list[dict]:
    """``{image_id: {"boxes" xyxy, "scores", "labels"}}`` -> COCO results json entries (xywh,
    contiguous labels mapped back to category ids)."""
    results = []
    for image_id, pred in predictions.items():
        boxes = pred["boxes"].tolist()
        for (x1, y1, x2, y2), score, label in zip(boxes, pred["scores"].tolist(), pred["labels"].tolist()):
            results.append({"image_id": int(image_id), "category_id": int(category_ids[label]),
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    return results


def evaluate_detections(ground_truth: str | Path | dict, predictions: Mapping[int, dict],
                        category_ids: Sequence[int], image_ids: Optional[Sequence[int]] = None) -> dict[str, float]:
    """COCO box AP of ``predictions`` (original-image pixels) against a COCO json.

    Args:
        ground_truth: path of the COCO instances json, or its loaded dict.
        predictions: per image id, ``boxes`` (K, 4) xyxy, ``scores`` (K,), ``labels`` (K,) contiguous.
        category_ids: contiguous label -> COCO category id.
        image_ids: evaluate on these images only (default: the images in ``predictions``).

    Returns:
        ``{"AP": .., "AP50": .., ..., "AR100": ..}`` in [0, 1] (-1 where COCO has no such boxes).
    """
    if not isinstance(ground_truth, dict):
        ground_truth = json.loads(Path(ground_truth).read_text())
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = copy.deepcopy(ground_truth)
        gt.createIndex()
        results = to_coco_results(predictions, category_ids)
        dt = gt.loadRes(results) if results else COCO()
        evaluator = COCOeval(gt, dt, iouType="bbox")
        evaluator.params.imgIds = sorted(image_ids if image_ids is not None else predictions)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return dict(zip(STAT_NAMES, (float(s) for s in evaluator.stats)))
