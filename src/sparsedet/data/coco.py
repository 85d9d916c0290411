"""Reading COCO-format instance annotations (``instances_*.json``) into a DetectionDataset.

Labels are the categories sorted by id, numbered 0..C-1 (``category_ids[label]`` maps back).
Crowd annotations are not training targets; they stay in :meth:`DetectionDataset.coco_ground_truth`
as ``iscrowd=1`` so evaluation ignores detections on them, as COCO defines.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from . import records as R
from .records import DetectionDataset, DetectionRecord, LoadReport, logger
from .validation import check_mode, clean_boxes, inspect_images, resolve_image_size


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _field(entry: Any, key: str, where: str, kind: str) -> Any:
    """``entry[key]`` checked to be of ``kind`` ("int", "positive int", "str", "list"); a
    ValueError naming ``where.key`` otherwise."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object, got {type(entry).__name__}")
    if key not in entry:
        raise ValueError(f"{where}.{key}: missing")
    value = entry[key]
    ok = {"int": _is_int(value), "positive int": _is_int(value) and value > 0,
          "str": isinstance(value, str), "list": isinstance(value, list)}[kind]
    if not ok:
        raise ValueError(f"{where}.{key}: expected {'a' if kind != 'int' else 'an'} {kind}, got {value!r}")
    return value


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read COCO json ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a json object with images/annotations/categories, "
                         f"got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"{path}: missing top-level field {key!r}")
        if not isinstance(data[key], list):
            raise ValueError(f"{path}: {key}: expected a list, got {type(data[key]).__name__}")
    return data


def read_coco(annotations_json: str | Path, image_dir: str | Path, check_images: str = "header") -> DetectionDataset:
    """Reads a COCO instances json and validates it against the image files.

    Args:
        annotations_json: the json (``images``, ``annotations``, ``categories``).
        image_dir: folder the images' ``file_name`` are relative to.
        check_images: "none" (trust the json), "header" (open each image header: missing or
            unreadable files are skipped, the size is compared with the json, EXIF orientation
            read), "full" (also decode every image, to find truncated files; slow).

    Returns:
        a :class:`DetectionDataset` with records sorted by image id. Images without boxes are kept.

    Raises:
        FileNotFoundError: the json is missing.
        ValueError: malformed json, a missing or mistyped field, duplicate image or category ids
            (the message names the file and the field).
    """
    json_path, image_dir = Path(annotations_json), Path(image_dir)
    check_mode(check_images, str(json_path))
    data = _load_json(json_path)
    report = LoadReport(source=str(json_path))

    categories = []
    for i, cat in enumerate(data["categories"]):
        where = f"{json_path}: categories[{i}]"
        categories.append((_field(cat, "id", where, "int"), _field(cat, "name", where, "str"), cat))
    categories.sort(key=lambda c: c[0])
    label_of: dict[int, int] = {}
    for label, (cid, _, _) in enumerate(categories):
        if cid in label_of:
            raise ValueError(f"{json_path}: categories: duplicate category id {cid}")
        label_of[cid] = label

    images: dict[int, tuple[int, dict]] = {}
    for i, img in enumerate(data["images"]):
        where = f"{json_path}: images[{i}]"
        image_id = _field(img, "id", where, "int")
        _field(img, "file_name", where, "str")
        _field(img, "height", where, "positive int")
        _field(img, "width", where, "positive int")
        if image_id in images:
            raise ValueError(f"{json_path}: images[{i}].id: duplicate image id {image_id} "
                             f"(also images[{images[image_id][0]}])")
        images[image_id] = (i, img)

    # Check the files before the annotations so boxes are clipped to the size actually used.
    order = sorted(images)
    paths = [image_dir / images[image_id][1]["file_name"] for image_id in order]
    infos = inspect_images(paths, check_images, desc=f"checking {json_path.name} images")
    sizes: dict[int, tuple[int, int]] = {}
    for image_id, path, info in zip(order, paths, infos):
        index, img = images[image_id]
        size = resolve_image_size(path, (img["height"], img["width"]), info, report,
                                  f"{json_path}: images[{index}] (id {image_id})")
        if size is not None:
            sizes[image_id] = size

    # Per kept image: rows of (annotation index, xyxy box, label, iscrowd).
    rows: dict[int, list[tuple[int, list[float], int, int]]] = {image_id: [] for image_id in sizes}
    seen_ids: dict[Any, int] = {}
    for i, ann in enumerate(data["annotations"]):
        where = f"{json_path}: annotations[{i}]"
        ann_id = _field(ann, "id", where, "int")
        image_id = _field(ann, "image_id", where, "int")
        category_id = _field(ann, "category_id", where, "int")
        bbox = _field(ann, "bbox", where, "list")
        if len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            raise ValueError(f"{where}.bbox: expected 4 numbers [x, y, width, height], got {bbox!r}")
        crowd = ann.get("iscrowd", 0)
        if crowd not in (0, 1):
            raise ValueError(f"{where}.iscrowd: expected 0 or 1, got {crowd!r}")
        if ann_id in seen_ids:
            report.add(R.DUPLICATE_ANNOTATION_ID, f"{where}.id: {ann_id} already used by "
                                                  f"annotations[{seen_ids[ann_id]}]")
        else:
            seen_ids[ann_id] = i
        if image_id not in images:
            report.add(R.UNKNOWN_IMAGE, f"{where}.image_id: {image_id} is not in images")
            continue
        if category_id not in label_of:
            report.add(R.UNKNOWN_CATEGORY, f"{where}.category_id: {category_id} is not in categories")
            continue
        if image_id not in sizes:  # image skipped (already counted)
            continue
        x, y, w, h = (float(v) for v in bbox)
        rows[image_id].append((i, [x, y, x + w, y + h], label_of[category_id], int(crowd)))

    records, gt_images, gt_annotations = [], [], []
    next_id = max(seen_ids, default=0) + 1
    used_ids: set[int] = set()
    for image_id in order:
        if image_id not in sizes:
            continue
        index, img = images[image_id]
        height, width = sizes[image_id]
        entries = rows[image_id]
        boxes = torch.tensor([e[1] for e in entries], dtype=torch.float32).reshape(-1, 4)
        boxes, keep = clean_boxes(boxes, height, width, report,
                                  lambda k: f"{json_path}: annotations[{entries[k][0]}].bbox")
        labels = torch.tensor([e[2] for e in entries], dtype=torch.int64)
        crowd = torch.tensor([e[3] for e in entries], dtype=torch.bool)
        for k in torch.nonzero(keep & crowd).flatten().tolist():
            report.add(R.CROWD, f"{json_path}: annotations[{entries[k][0]}] (image {image_id})")
        train = keep & ~crowd
        record = DetectionRecord(image_dir / img["file_name"], image_id, height, width,
                                 boxes[train], labels[train], boxes[keep & crowd], labels[keep & crowd])
        if not len(record.labels):
            report.add(R.EMPTY_IMAGE, f"{json_path}: images[{index}] (id {image_id}, {img['file_name']})")
        records.append(record)

        gt_images.append(dict(img, height=height, width=width))
        for k in torch.nonzero(keep).flatten().tolist():
            ann = data["annotations"][entries[k][0]]
            x1, y1, x2, y2 = boxes[k].tolist()
            ann_id = ann["id"]
            if ann_id in used_ids:  # duplicates would collide in pycocotools' id index
                ann_id, next_id = next_id, next_id + 1
            used_ids.add(ann_id)
            area = ann.get("area")
            fixed = {key: value for key, value in ann.items() if key != "segmentation"}
            fixed.update(id=ann_id, bbox=[x1, y1, x2 - x1, y2 - y1], iscrowd=int(ann.get("iscrowd", 0)),
                         area=float(area) if _is_number(area) and math.isfinite(area) else (x2 - x1) * (y2 - y1))
            gt_annotations.append(fixed)

    ground_truth = {key: value for key, value in data.items() if key not in ("images", "annotations", "categories")}
    ground_truth.update(images=gt_images, annotations=gt_annotations, categories=[c[2] for c in categories])
    dataset = DetectionDataset(records, [c[1] for c in categories], [c[0] for c in categories],
                               source=f"coco {json_path}", report=report, json_path=json_path,
                               _coco_ground_truth=ground_truth)
    logger.info("read %d images, %d boxes, %d classes from %s", len(records),
                sum(len(r.labels) for r in records), dataset.num_classes, json_path)
    if report.counts:
        logger.info("%s", report.summary())
    return dataset
