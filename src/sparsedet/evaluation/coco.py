"""COCO box AP with faster-coco-eval (the COCO protocol, C++ matching; pycocotools is the test reference).

COCO caps detections at ``maxDets`` = 100 **per image per category**, not per image: a 300-proposal
model sends all its detections and the evaluator keeps the best 100 of each class in each image
(spec sparse_rcnn.md §4.4). Nothing here truncates.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
from faster_coco_eval import COCO, COCOeval_faster

from ..checkpoint import atomic_write_text
from .table import markdown_table

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _silent(*args, **kwargs) -> None:
    """Print function for the evaluator: its progress lines and summary are replaced by the result."""


@dataclass
class EvaluationResult:
    """COCO box metrics of one evaluation.

    Attributes:
        stats: the 12 COCO numbers (``STAT_NAMES``) in [0, 1]; -1 where the evaluated images have no
            boxes of that kind (e.g. APs without small objects), as COCO reports it.
        per_class: class name -> AP@[.5:.95] in [0, 1], area "all", 100 detections; NaN for a class
            without ground truth in the evaluated images.
        num_images: images evaluated.
        num_detections: detections on the evaluated images.
        protocol: which evaluation made it: ``coco``, ``crowdhuman`` or ``visdrone`` (the other
            protocols fill ``stats`` with their own names; every protocol has an "AP").
        rows: the stat names of each row of the printed table (default: COCO's AP and AR rows).
        results_path: the detections file (or folder) written with the result, if any.
    """

    stats: dict[str, float]
    per_class: dict[str, float] = field(default_factory=dict)
    num_images: int = 0
    num_detections: int = 0
    protocol: str = "coco"
    rows: tuple[tuple[str, ...], ...] = (STAT_NAMES[:6], STAT_NAMES[6:])
    results_path: Optional[str] = None

    def table(self, per_class: bool = True) -> str:
        """The metrics in percent with one decimal, as markdown pipe tables (readable in a log too).

        A one-line heading, the AP row and the AR row, then (``per_class``) AP per class in three
        column pairs. ``-`` marks a -1 stat or a NaN class AP (nothing to measure).
        """
        title = {"coco": "COCO box metrics", "crowdhuman": "CrowdHuman metrics (official evaluation)",
                 "visdrone": "VisDrone-DET toolkit metrics"}.get(self.protocol, f"{self.protocol} metrics")
        parts = [f"{title} (%) on {self.num_images} images, {self.num_detections} detections"]
        parts += [markdown_table(names, [[_percent(self.stats[n]) for n in names]]) for names in self.rows]
        if per_class and self.per_class:
            pairs = [(name, _percent(ap)) for name, ap in self.per_class.items()]
            columns = min(3, len(pairs))
            rows_needed = math.ceil(len(pairs) / columns)
            # Fill column-major, so the class list reads top to bottom like an index.
            rows = []
            for r in range(rows_needed):
                row = []
                for c in range(columns):
                    index = c * rows_needed + r
                    row += pairs[index] if index < len(pairs) else ("", "")
                rows.append(row)
            heading = "AP@[.5] per class (%)" if self.protocol == "crowdhuman" else "AP@[.5:.95] per class (%)"
            parts += ["", heading, markdown_table(["class", "AP"] * columns, rows)]
        return "\n".join(parts)

    def to_dict(self) -> dict:
        """JSON-serialisable copy: NaN per-class APs become ``None`` (strict JSON has no NaN)."""
        return {
            "stats": {name: float(value) for name, value in self.stats.items()},
            "per_class": {name: (None if math.isnan(ap) else float(ap)) for name, ap in self.per_class.items()},
            "num_images": int(self.num_images),
            "num_detections": int(self.num_detections),
            "protocol": self.protocol,
        }


def _percent(value: float) -> str:
    if value is None or math.isnan(value) or value < 0:
        return "-"
    return f"{100 * value:.1f}"


def to_coco_results(predictions: Mapping[int, dict], category_ids: Sequence[int]) -> list[dict]:
    """``{image_id: {"boxes" (K, 4) xyxy, "scores" (K,), "labels" (K,)}}`` -> COCO results json entries.

    Boxes are in original-image pixels and become ``[x, y, w, h]``; contiguous labels 0..C-1 map to
    ``category_ids[label]``. Tensors or numpy arrays are accepted.

    Raises:
        ValueError: mismatched lengths, a label outside 0..C-1, or a non-finite box or score.
    """
    results = []
    num_classes = len(category_ids)
    for image_id, pred in predictions.items():
        boxes = np.asarray(_to_numpy(pred["boxes"]), dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(_to_numpy(pred["scores"]), dtype=np.float64).reshape(-1)
        labels = np.asarray(_to_numpy(pred["labels"])).reshape(-1)
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(f"image {image_id}: {len(boxes)} boxes, {len(scores)} scores and {len(labels)} labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"image {image_id}: labels must be in 0..{num_classes - 1} "
                             f"(len(category_ids)), got {labels.min()}..{labels.max()}")
        if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
            raise ValueError(f"image {image_id}: non-finite boxes or scores (a diverged model?)")
        for (x1, y1, x2, y2), score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
            results.append({"image_id": int(image_id), "category_id": int(category_ids[int(label)]),
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
    return results


def _to_numpy(values):
    return values.detach().cpu().numpy() if hasattr(values, "detach") else values


def evaluate_detections(ground_truth: str | Path | dict, predictions: Mapping[int, dict],
                        category_ids: Sequence[int], class_names: Optional[Sequence[str]] = None,
                        image_ids: Optional[Sequence[int]] = None,
                        results_path: str | Path | None = None) -> EvaluationResult:
    """COCO box AP/AR of ``predictions`` against a COCO instances json.

    Args:
        ground_truth: path of the COCO instances json, or its loaded dict (not modified).
        predictions: per image id, ``boxes`` (K, 4) xyxy in original-image pixels, ``scores`` (K,),
            ``labels`` (K,) contiguous 0..C-1. Send every detection: COCO keeps the top 100 per
            image per category itself.
        category_ids: contiguous label -> COCO category id (length C).
        class_names: names for ``per_class``, in label order (default: the ground truth's category
            names of ``category_ids``).
        image_ids: evaluate on these images only (default: the images in ``predictions``, or every
            ground-truth image when ``predictions`` is empty, i.e. the model found nothing).
        results_path: also write the COCO results json (all predictions) to this file, atomically.

    Returns:
        The :class:`EvaluationResult`. An image without detections counts as all-missed (AP 0).

    Raises:
        ValueError: image ids unknown to the ground truth, category ids it lacks, bad class names.
    """
    source = str(ground_truth) if not isinstance(ground_truth, dict) else "the ground-truth dict"
    gt = _load_ground_truth(ground_truth, source)

    known_categories = {c["id"]: c.get("name", str(c["id"])) for c in gt.dataset["categories"]}
    missing = [c for c in category_ids if c not in known_categories]
    if missing:
        raise ValueError(f"category_ids {missing} are not categories of {source}")
    if class_names is None:
        class_names = [known_categories[c] for c in category_ids]
    if len(class_names) != len(category_ids) or len(set(class_names)) != len(class_names):
        raise ValueError(f"class_names must be {len(category_ids)} distinct names (one per category id), "
                         f"got {list(class_names)}")

    known_images = set(gt.getImgIds())
    for what, ids in (("predictions", predictions), ("image_ids", image_ids or ())):
        unknown = sorted({int(i) for i in ids} - known_images)
        if unknown:
            shown = ", ".join(map(str, unknown[:10])) + (" ..." if len(unknown) > 10 else "")
            raise ValueError(f"{what} name {len(unknown)} image id(s) not in {source}: {shown}")
    if image_ids is not None:
        eval_ids = sorted({int(i) for i in image_ids})
    else:
        eval_ids = sorted({int(i) for i in predictions}) if predictions else sorted(known_images)

    results = to_coco_results(predictions, category_ids)
    if results_path is not None:
        atomic_write_text(results_path, json.dumps(results))  # readers never see half a file
    evaluated = set(eval_ids)
    num_detections = sum(1 for r in results if r["image_id"] in evaluated)

    detections = gt.loadRes(results)
    evaluator = COCOeval_faster(gt, detections, iouType="bbox", print_function=_silent)
    evaluator.params.imgIds = eval_ids
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    stats = dict(zip(STAT_NAMES, (float(s) for s in evaluator.stats[: len(STAT_NAMES)])))

    # precision: (iou thresholds T, recall points R, categories K, area ranges A, max dets M);
    # area "all" and the largest maxDets, as COCO's AP. -1 marks "no ground truth" for that class.
    precision = np.asarray(evaluator.eval["precision"])
    area_all = evaluator.params.areaRngLbl.index("all")
    evaluated_categories = [int(c) for c in evaluator.params.catIds]
    per_class = {}
    for name, category_id in zip(class_names, category_ids):
        values = precision[:, :, evaluated_categories.index(category_id), area_all, -1]
        values = values[values > -1]
        per_class[name] = float(values.mean()) if values.size else float("nan")
    return EvaluationResult(stats=stats, per_class=per_class, num_images=len(eval_ids),
                            num_detections=num_detections)


def _load_ground_truth(ground_truth: str | Path | dict, source: str) -> COCO:
    if isinstance(ground_truth, dict):
        dataset = ground_truth
    else:
        try:
            dataset = json.loads(Path(ground_truth).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"ground-truth json not found: {source}") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{source} is not valid json: {err}") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset.get(key), list):
            raise ValueError(f"{source}: COCO field '{key}' (a list) is missing")
    # The evaluator writes an "ignore" flag into the annotation dicts: a caller's dict is deep-copied.
    gt = COCO(print_function=_silent)
    gt.dataset = COCO.load_json(dataset, use_deepcopy=isinstance(ground_truth, dict))
    gt.createIndex()
    return gt

