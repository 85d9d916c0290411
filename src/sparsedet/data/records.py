"""What every dataset reader produces: per-image records, a load report, and the dataset.

The readers (``coco.py``, ``voc.py``, ``yolo.py``) differ only in the annotation format; they all
return a :class:`DetectionDataset` whose records hold clean training targets (finite boxes inside
the image, known classes) and whose :class:`LoadReport` says what was fixed or skipped and why.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

logger = logging.getLogger("sparsedet.data")

# Reasons counted by the readers. Tests and users may match on these strings.
BOX_CLIPPED = "box clipped"
BOX_DEGENERATE = "box dropped: degenerate"
BOX_NEGATIVE = "box dropped: negative size"
BOX_OUTSIDE = "box dropped: outside the image"
BOX_NON_FINITE = "box dropped: NaN"
UNKNOWN_CATEGORY = "annotation dropped: unknown category"
UNKNOWN_IMAGE = "annotation dropped: unknown image id"
DUPLICATE_ANNOTATION_ID = "duplicate annotation id (renumbered)"
CROWD = "crowd box (not a training target; an ignore region in evaluation)"
DIFFICULT = "difficult box (not a training target; an ignore region in evaluation)"
EMPTY_IMAGE = "image without boxes (kept)"
EXIF_SIZE = "image size: annotation gives the stored size, EXIF rotates it (oriented size used)"
MISSING_FILE = "image skipped: missing file"
UNDECODABLE = "image skipped: cannot decode"
SIZE_MISMATCH = "image skipped: size differs from the annotation"
NO_LABEL_FILE = "label file missing (image kept without boxes)"
ORPHAN_LABEL = "label file without image (ignored)"
CROWDHUMAN_IGNORE = "ignore region (CrowdHuman tag not person, or extra.ignore set)"
VISDRONE_IGNORE_REGION = "ignored region (VisDrone class 0)"
VISDRONE_OTHERS = "'others' box (VisDrone class 11: background in training, not evaluated)"
VISDRONE_QUADRANT_TRUNCATED = "box truncated at a quadrant split line"

# Reasons that are expected in clean data: logged at INFO instead of WARNING.
_INFO_REASONS = frozenset({CROWD, DIFFICULT, EMPTY_IMAGE, BOX_CLIPPED, NO_LABEL_FILE, CROWDHUMAN_IGNORE,
                           VISDRONE_IGNORE_REGION, VISDRONE_OTHERS, VISDRONE_QUADRANT_TRUNCATED})


@dataclass
class LoadReport:
    """Counts of everything a reader fixed, dropped or skipped, with a few example messages each.

    ``counts[reason]`` is the number of occurrences; ``examples[reason]`` the first
    ``max_examples`` messages, each naming the file and the field. Those first examples are
    logged when added (WARNING for skips and drops, INFO for expected cases like crowd boxes), the
    rest are only counted, so a dataset with 100k clipped boxes does not flood the log.
    """

    source: str = ""
    max_examples: int = 3
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, message: str) -> None:
        """Counts one occurrence of ``reason``; ``message`` names the file and the field."""
        self.counts[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < self.max_examples:
            examples.append(message)
            level = logging.INFO if reason in _INFO_REASONS else logging.WARNING
            logger.log(level, "%s: %s", reason, message)

    def __getitem__(self, reason: str) -> int:
        return self.counts.get(reason, 0)

    def summary(self) -> str:
        """Multi-line text: one line per reason with its count and first example."""
        if not self.counts:
            return f"{self.source}: no problems found"
        lines = [f"{self.source}:"]
        for reason, count in sorted(self.counts.items()):
            example = self.examples.get(reason, [""])[0]
            lines.append(f"  {reason}: {count}" + (f"  (e.g. {example})" if example else ""))
        return "\n".join(lines)


def _empty_boxes() -> torch.Tensor:
    return torch.zeros((0, 4), dtype=torch.float32)


def _empty_labels() -> torch.Tensor:
    return torch.zeros((0,), dtype=torch.int64)


@dataclass
class DetectionRecord:
    """One image and its boxes.

    Attributes:
        image_path: the image file.
        image_id: integer id (COCO: the json's id; VOC/YOLO: 1-based position in the dataset).
        height, width: size of the image as displayed (EXIF orientation applied).
        boxes: (M, 4) float32 xyxy pixels of that image, clipped to it, every side > 1e-5.
        labels: (M,) int64 contiguous class indices 0..C-1.
        ignore_boxes: (K, 4) float32 xyxy regions that are not training targets but must not be
            counted as false positives in evaluation (COCO crowd boxes, VOC ``difficult`` objects).
        ignore_labels: (K,) int64 their classes.
        crop: (x0, y0, x1, y1) integer pixels when the record is a part of the image file (the
            VisDrone training quadrants); ``height``/``width`` and the boxes are then those of the
            part. None: the whole file.
        extra: format-specific ground truth the evaluator of that format needs (VisDrone: the
            file's raw rows), None otherwise.
    """

    image_path: Path
    image_id: int
    height: int
    width: int
    boxes: torch.Tensor = field(default_factory=_empty_boxes)
    labels: torch.Tensor = field(default_factory=_empty_labels)
    ignore_boxes: torch.Tensor = field(default_factory=_empty_boxes)
    ignore_labels: torch.Tensor = field(default_factory=_empty_labels)
    crop: Optional[tuple[int, int, int, int]] = None
    extra: Optional[object] = field(default=None, repr=False)


# The evaluation protocol of each format (``engine/evaluate.py`` dispatches on it).
PROTOCOLS = ("coco", "crowdhuman", "visdrone")


@dataclass
class DetectionDataset:
    """A dataset read from disk: records, the class list and how it was loaded.

    Attributes:
        records: one per kept image.
        class_names: name of each contiguous label.
        category_ids: contiguous label -> dataset category id (COCO: the json's ids; VOC and YOLO:
            1..C). Evaluation results are written with these ids.
        source: a short description of where it came from (for logs).
        report: what the reader fixed or skipped.
        json_path: the COCO json this was read from (None for VOC/YOLO).
        protocol: the data set's own evaluation, one of ``PROTOCOLS``: ``coco`` (COCO, VOC, YOLO),
            ``crowdhuman`` (AP, mMR, recall, JI) or ``visdrone`` (the VisDrone-DET toolkit).
    """

    records: list[DetectionRecord]
    class_names: list[str]
    category_ids: list[int]
    source: str
    report: LoadReport = field(default_factory=LoadReport)
    json_path: Optional[Path] = None
    protocol: str = "coco"
    # COCO input keeps the json's own entries (its "area" drives COCO's small/medium/large
    # ranges); VOC/YOLO ground truth is built from the records.
    _coco_ground_truth: Optional[dict] = field(default=None, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def category_names(self) -> list[str]:
        """Alias of ``class_names`` (the name the first COCO reader used)."""
        return self.class_names

    def __len__(self) -> int:
        return len(self.records)

    def aspect_ratios(self) -> list[float]:
        """width / height of each record, for aspect-ratio grouping of training batches."""
        return [r.width / r.height for r in self.records]

    def coco_ground_truth(self) -> dict:
        """The dataset as a COCO ground-truth dict for the evaluator.

        COCO input: the json's images (kept ones only), categories and annotations, boxes fixed as
        for training (clipped; degenerate, NaN and unknown-category ones dropped), crowd
        annotations kept with ``iscrowd=1`` so COCOeval ignores detections on them; the
        ``segmentation`` field is left out (box evaluation does not use it). VOC/YOLO: built from
        the records, ignore boxes (VOC ``difficult``) as ``iscrowd=1`` regions.
        """
        if self._coco_ground_truth is not None:
            return self._coco_ground_truth
        images, annotations = [], []
        for record in self.records:
            images.append({"id": record.image_id, "file_name": record.image_path.name,
                           "height": record.height, "width": record.width})
            for boxes, labels, crowd in ((record.boxes, record.labels, 0),
                                         (record.ignore_boxes, record.ignore_labels, 1)):
                for (x1, y1, x2, y2), label in zip(boxes.tolist(), labels.tolist()):
                    if label >= len(self.category_ids):  # a background box (VisDrone "others"): no category
                        continue
                    w, h = x2 - x1, y2 - y1
                    annotations.append({"id": len(annotations) + 1, "image_id": record.image_id,
                                        "category_id": self.category_ids[label], "bbox": [x1, y1, w, h],
                                        "area": w * h, "iscrowd": crowd})
        categories = [{"id": cid, "name": name} for cid, name in zip(self.category_ids, self.class_names)]
        return {"images": images, "annotations": annotations, "categories": categories}

    def without_empty(self) -> "DetectionDataset":
        """A copy without the images that have no training boxes (QueryDet's COCO recipe; the
        config key ``input.filter_empty_annotations``)."""
        kept = [r for r in self.records if len(r.labels)]
        gt = self._coco_ground_truth
        if gt is not None:
            ids = {r.image_id for r in kept}
            gt = dict(gt, images=[i for i in gt["images"] if i["id"] in ids],
                      annotations=[a for a in gt["annotations"] if a["image_id"] in ids])
        return DetectionDataset(kept, self.class_names, self.category_ids, self.source, self.report,
                                self.json_path, self.protocol, gt)
