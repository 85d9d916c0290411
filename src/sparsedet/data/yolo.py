"""Reading YOLO txt labels (``class cx cy w h`` normalised to [0, 1]) into a DetectionDataset.

Layout: every image under ``images_dir`` (sub-folders too) has its labels at the same relative
path under ``labels_dir`` with a ``.txt`` suffix; a missing label file means an image without
objects (the YOLO convention for background images). The normalised coordinates refer to the
displayed image (EXIF orientation applied), as in Ultralytics.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence, Union

import torch
import yaml

from . import records as R
from .records import DetectionDataset, DetectionRecord, LoadReport, logger
from .image_io import IMAGE_SUFFIXES
from .validation import check_mode, clean_boxes, inspect_images, resolve_image_size



def load_class_names(source: Union[Sequence[str], str, Path]) -> list[str]:
    """Class names from a list, a names file (one per line) or a YOLO ``data.yaml`` whose
    ``names`` is a list or a ``{index: name}`` mapping.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: the yaml has no usable ``names`` (names the file and the field).
    """
    if not isinstance(source, (str, Path)):
        return [str(name) for name in source]
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"class names file not found: {path}")
    if path.suffix.lower() not in (".yaml", ".yml"):
        return [line.strip() for line in _read_text(path).splitlines() if line.strip()]
    try:
        data = yaml.safe_load(_read_text(path))
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: cannot parse yaml ({err})") from err
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, dict):
        if sorted(names) != list(range(len(names))):
            raise ValueError(f"{path}: names: expected keys 0..{len(names) - 1}, got {sorted(names)}")
        return [str(names[i]) for i in range(len(names))]
    if isinstance(names, list) and names:
        return [str(name) for name in names]
    raise ValueError(f"{path}: names: missing, expected a list of class names or an {{index: name}} mapping")


def _read_text(path: Path) -> str:
    """A text file as UTF-8 (a BOM is accepted); anything else is an error naming the file."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a UTF-8 text file (byte 0x{err.object[err.start]:02x} at offset "
                         f"{err.start}): YOLO label and names files must be plain text") from None


def _parse_labels(path: Path) -> list[tuple[int, int, list[float]]]:
    """A label file -> [(line number, class, [cx, cy, w, h])]."""
    rows = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 5:
            raise ValueError(f"{path}:{number}: expected 5 numbers 'class cx cy w h', got {line.strip()!r}"
                             + (" (segment polygons are not supported)" if len(fields) > 5 else ""))
        try:
            values = [float(v) for v in fields]
        except ValueError:
            raise ValueError(f"{path}:{number}: expected numbers, got {line.strip()!r}") from None
        if not (math.isfinite(values[0]) and values[0] == int(values[0])):
            raise ValueError(f"{path}:{number}: class: expected an integer, got {fields[0]!r}")
        rows.append((number, int(values[0]), values[1:]))
    return rows


def read_yolo(images_dir: str | Path, labels_dir: str | Path, class_names: Union[Sequence[str], str, Path],
              check_images: str = "header") -> DetectionDataset:
    """Reads a YOLO-format dataset.

    Args:
        images_dir: folder of images (searched recursively).
        labels_dir: folder of ``.txt`` label files mirroring ``images_dir``.
        class_names: list, names file or ``data.yaml`` (see :func:`load_class_names`).
        check_images: "header" or "full" as for :func:`read_coco`; "none" is treated as "header"
            because the normalised boxes need each image's size.

    Returns:
        a :class:`DetectionDataset` with image ids 1..N in sorted path order and category ids 1..C.

    Raises:
        FileNotFoundError: a folder or the names file is missing.
        ValueError: a label line that is not 5 numbers (names the file and line).
    """
    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"YOLO folder not found: {folder}")
    mode = check_mode(check_images, str(images_dir))
    mode = "header" if mode == "none" else mode
    names = load_class_names(class_names)
    report = LoadReport(source=str(labels_dir))

    paths = sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    label_paths = [labels_dir / p.relative_to(images_dir).with_suffix(".txt") for p in paths]
    infos = inspect_images(paths, mode, desc=f"checking {images_dir} images")
    records = []
    for number, (path, label_path, info) in enumerate(zip(paths, label_paths, infos), start=1):
        size = resolve_image_size(path, None, info, report, f"{path}")
        if size is None:
            continue
        height, width = size
        rows = []
        if label_path.is_file():
            rows = _parse_labels(label_path)
        else:
            report.add(R.NO_LABEL_FILE, f"{path}: no {label_path}")
        kept = []
        for line, cls, box in rows:
            if not 0 <= cls < len(names):
                report.add(R.UNKNOWN_CATEGORY, f"{label_path}:{line}: class {cls} is not in 0..{len(names) - 1}")
                continue
            cx, cy, w, h = box
            kept.append((line, [(cx - w / 2) * width, (cy - h / 2) * height,
                                (cx + w / 2) * width, (cy + h / 2) * height], cls))
        boxes = torch.tensor([k[1] for k in kept], dtype=torch.float32).reshape(-1, 4)
        boxes, keep = clean_boxes(boxes, height, width, report, lambda j: f"{label_path}:{kept[j][0]}")
        labels = torch.tensor([k[2] for k in kept], dtype=torch.int64)
        record = DetectionRecord(path, number, height, width, boxes[keep], labels[keep])
        if not len(record.labels):
            report.add(R.EMPTY_IMAGE, f"{path}")
        records.append(record)

    used = set(label_paths)
    for orphan in sorted(p for p in labels_dir.rglob("*.txt") if p not in used):
        report.add(R.ORPHAN_LABEL, f"{orphan}: no image of that name under {images_dir}")

    dataset = DetectionDataset(records, names, list(range(1, len(names) + 1)), source=f"yolo {labels_dir}",
                               report=report)
    logger.info("read %d images, %d boxes, %d classes from %s", len(records),
                sum(len(r.labels) for r in records), dataset.num_classes, labels_dir)
    if report.counts:
        logger.info("%s", report.summary())
    return dataset
