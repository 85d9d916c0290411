"""Reading VisDrone-DET annotations (one txt per image) into a DetectionDataset.

Layout: ``<images>/<name>.jpg`` and ``<annotations>/<name>.txt``, one object per line::

    x,y,w,h,score,category,truncation,occlusion      (pixels; a trailing comma is tolerated)

Categories: 0 "ignored regions", 1..10 the classes below, 11 "others". How each is used
(spec querydet.md §4.3, the official QueryDet preparation):

* 1..10 with score 1: training targets, labels 0..9 (category id = label + 1).
* 0 (ignored regions) and score-0 boxes: not training targets.
* 11 (others), option ``others``: ``background`` (the official QueryDet code, set by the VisDrone
  configs) keeps them as targets with label 10 = ``num_classes``, which the dense detectors
  (RetinaNet, QueryDet) train as background (anchors matched to them: all-zero class target, no
  box loss) and the QueryDet query targets count; ``drop`` (the default, for every other model)
  leaves them out.
* The evaluation (``evaluation/visdrone.py``) reads the file's rows as they are, kept in each
  record's ``extra``: class-0 regions swallow what lies in them, score-0 boxes are ignore ground
  truth, class 11 is not evaluated.

``split_quadrants`` (training only) cuts every image into four parts at (⌊h/2⌋, ⌊w/2⌋), as the
official training set: a box belongs to the part holding its top-left corner and is truncated at
the split line(s) it crosses (right edge at the vertical line if it starts left of it, bottom edge
at the horizontal line if it starts above it); its remainder in the other parts gets no label.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from . import records as R
from .records import DetectionDataset, DetectionRecord, LoadReport, logger
from .validation import check_mode, clean_boxes, inspect_images, resolve_image_size

CLASS_NAMES = ("pedestrian", "people", "bicycle", "car", "van", "truck", "tricycle", "awning-tricycle", "bus", "motor")
IGNORED_REGION, OTHERS = 0, 11
OTHERS_MODES = ("drop", "background")
MISSING_ANNOTATION = "image skipped: missing annotation file"
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".PNG")


def parse_visdrone_txt(path: Path) -> np.ndarray:
    """A VisDrone annotation file -> (N, 8) float64 rows.

    Raises:
        ValueError: a line without 8 comma-separated numbers, a category outside 0..11 or a
            non-finite value; the message names the file, the line and the field.
    """
    fields = ("x", "y", "w", "h", "score", "category", "truncation", "occlusion")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.strip()
        if not text:
            continue
        parts = [p.strip() for p in text.rstrip(",").split(",")]
        if len(parts) != 8:
            raise ValueError(f"{path}:{number}: expected 8 comma-separated values "
                             f"({','.join(fields)}), got {len(parts)}: {text!r}")
        row = []
        for name, part in zip(fields, parts):
            try:
                value = float(part)
            except ValueError:
                raise ValueError(f"{path}:{number}: field {name}: expected a number, got {part!r}") from None
            if not math.isfinite(value):
                raise ValueError(f"{path}:{number}: field {name}: not finite ({part!r})")
            row.append(value)
        if row[5] != int(row[5]) or not IGNORED_REGION <= row[5] <= OTHERS:
            raise ValueError(f"{path}:{number}: field category: expected 0..11, got {parts[5]!r}")
        rows.append(row)
    return np.asarray(rows, dtype=np.float64).reshape(-1, 8)


def split_into_quadrants(boxes: torch.Tensor, height: int, width: int) -> list[tuple[tuple[int, int, int, int], torch.Tensor, torch.Tensor]]:
    """The four training parts of an image (module docstring).

    Args:
        boxes: (M, 4) xyxy boxes of the whole image.

    Returns:
        ``[(crop (x0, y0, x1, y1), boxes (k, 4) xyxy in the part's pixels, index (k,) into boxes)]``
        for top-left, top-right, bottom-left, bottom-right.
    """
    mid_x, mid_y = width // 2, height // 2
    boxes = boxes.reshape(-1, 4)
    right = boxes[:, 0] >= mid_x
    below = boxes[:, 1] >= mid_y
    truncated = boxes.clone()
    truncated[:, 2] = torch.where(~right, truncated[:, 2].clamp(max=mid_x), truncated[:, 2])
    truncated[:, 3] = torch.where(~below, truncated[:, 3].clamp(max=mid_y), truncated[:, 3])
    parts = []
    for is_below in (False, True):
        for is_right in (False, True):
            x0, x1 = (mid_x, width) if is_right else (0, mid_x)
            y0, y1 = (mid_y, height) if is_below else (0, mid_y)
            index = torch.nonzero((right == is_right) & (below == is_below)).flatten()
            shifted = truncated[index] - torch.tensor([x0, y0, x0, y0], dtype=boxes.dtype)
            parts.append(((x0, y0, x1, y1), shifted, index))
    return parts


def _image_path(images_dir: Path, stem: str) -> Path:
    candidates = [images_dir / (stem + suffix) for suffix in _IMAGE_SUFFIXES]
    return next((c for c in candidates if c.is_file()), candidates[0])


def read_visdrone(images_dir: str | Path, annotations_dir: str | Path, split_quadrants: bool = False,
                  others: str = "drop", check_images: str = "header") -> DetectionDataset:
    """Reads a VisDrone-DET folder pair (format in the module docstring).

    Args:
        images_dir: the images (``VisDrone2019-DET-val/images``).
        annotations_dir: one ``<name>.txt`` per image (``.../annotations``).
        split_quadrants: cut each image into its four training parts (training sets only: the
            VisDrone evaluation needs whole images).
        others: ``drop`` (default) or ``background`` (label 10, for the dense detectors), see above.
        check_images: "header" or "full" (the txt files give no image size, so "none" is refused).

    Returns:
        a :class:`DetectionDataset` with the 10 classes (category ids 1..10), image ids 1..N in
        sorted name order (parts: 4 per image), ``protocol`` ``visdrone``.

    Raises:
        FileNotFoundError: a folder is missing.
        ValueError: a malformed line (names the file and line), ``check_images="none"``, an
            unknown ``others``.
    """
    if others not in OTHERS_MODES:
        raise ValueError(f"VisDrone others: expected one of {', '.join(OTHERS_MODES)}, got {others!r}")
    images_dir, annotations_dir = Path(images_dir), Path(annotations_dir)
    for folder in (images_dir, annotations_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"VisDrone folder not found: {folder}")
    check_mode(check_images, str(annotations_dir))
    if check_images == "none":
        raise ValueError(f"{annotations_dir}: VisDrone annotations give no image size: check_images must be "
                         "'header' or 'full'")
    report = LoadReport(source=str(annotations_dir))
    stems = sorted(p.stem for p in images_dir.iterdir() if p.suffix in _IMAGE_SUFFIXES)
    paths, rows = [], []
    for stem in stems:
        txt = annotations_dir / f"{stem}.txt"
        if not txt.is_file():
            report.add(MISSING_ANNOTATION, f"{images_dir / stem}: {txt} does not exist")
            continue
        paths.append(_image_path(images_dir, stem))
        rows.append((txt, parse_visdrone_txt(txt)))
    infos = inspect_images(paths, check_images, desc=f"checking {images_dir} images")
    records = []
    for path, (txt, table), info in zip(paths, rows, infos):
        size = resolve_image_size(path, None, info, report, str(txt))
        if size is None:
            continue
        height, width = size
        xyxy = torch.tensor(table[:, :4], dtype=torch.float32).reshape(-1, 4)
        xyxy[:, 2:] += xyxy[:, :2]
        category, score = table[:, 5].astype(np.int64), table[:, 4]
        wanted = (category >= 1) & (category <= (OTHERS if others == "background" else 10))
        target = torch.from_numpy(wanted & (score != 0))
        for j in np.nonzero(category == IGNORED_REGION)[0].tolist():
            report.add(R.VISDRONE_IGNORE_REGION, f"{txt}:{j + 1}")
        for j in np.nonzero(category == OTHERS)[0].tolist():
            report.add(R.VISDRONE_OTHERS, f"{txt}:{j + 1}")
        index = torch.nonzero(target).flatten()
        boxes, keep = clean_boxes(xyxy[index], height, width, report, lambda j: f"{txt}:{int(index[j]) + 1}")
        labels = torch.from_numpy(category - 1)[index]
        boxes, labels, index = boxes[keep], labels[keep], index[keep]
        if not split_quadrants:
            record = DetectionRecord(path, len(records) + 1, height, width, boxes, labels,
                                     extra=table[:, :6].copy())
            if not len(labels):
                report.add(R.EMPTY_IMAGE, f"{txt}: no boxes")
            records.append(record)
            continue
        for crop, part_boxes, part_index in split_into_quadrants(boxes, height, width):
            x0, y0, x1, y1 = crop
            changed = (part_boxes - (boxes[part_index] - torch.tensor([x0, y0, x0, y0]))).abs().sum(dim=1) > 0
            for j in torch.nonzero(changed).flatten().tolist():
                report.add(R.VISDRONE_QUADRANT_TRUNCATED, f"{txt}:{int(index[part_index[j]]) + 1}")
            part_boxes, part_keep = clean_boxes(part_boxes, y1 - y0, x1 - x0, report,
                                                lambda j: f"{txt}:{int(index[part_index[j]]) + 1} (quadrant {crop})")
            records.append(DetectionRecord(path, len(records) + 1, y1 - y0, x1 - x0, part_boxes[part_keep],
                                           labels[part_index][part_keep], crop=crop))
    dataset = DetectionDataset(records, list(CLASS_NAMES), list(range(1, len(CLASS_NAMES) + 1)),
                               source=f"visdrone {annotations_dir}", report=report, protocol="visdrone")
    logger.info("read %d %s, %d boxes from %s", len(records), "quadrants" if split_quadrants else "images",
                sum(len(r.labels) for r in records), annotations_dir)
    if report.counts:
        logger.info("%s", report.summary())
    return dataset
