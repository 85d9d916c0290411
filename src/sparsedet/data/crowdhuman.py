"""Reading CrowdHuman ``.odgt`` annotations into a DetectionDataset.

An ``.odgt`` file holds one JSON object per line, one per image::

    {"ID": "273271,c9db000d5146c15", "width": 800, "height": 600,      # width/height optional
     "gtboxes": [{"tag": "person", "fbox": [x, y, w, h], "vbox": [...], "hbox": [...],
                  "extra": {"ignore": 0, ...}, "head_attr": {"ignore": 0, ...}}, ...]}

The image is ``<images>/<ID>.jpg``. Boxes are ``[x, y, w, h]`` pixels; the box kind is selectable:
``full`` (``fbox``, the full body, possibly outside the image: what the papers train and score),
``visible`` (``vbox``) or ``head`` (``hbox``). A box is an ignore region, as in the official
evaluation (CrowdDet's ``load_gt_boxes``), when its ``tag`` is not ``person`` (``mask`` marks
crowds, reflections, statues) or its ``extra.ignore`` is non-zero (for heads: ``head_attr.ignore``).
Ignore regions are not training targets; the evaluator (``evaluation/crowdhuman.py``) does not
count detections that lie mostly inside them as false positives.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from . import records as R
from .records import DetectionDataset, DetectionRecord, LoadReport, logger
from .validation import check_mode, clean_boxes, inspect_images, resolve_image_size

# box kind -> the odgt key; the odgt key names are accepted as aliases.
BOX_KINDS = {"full": "fbox", "visible": "vbox", "head": "hbox"}


def box_key(box_kind: str) -> str:
    """``full``/``visible``/``head`` (or ``fbox``/``vbox``/``hbox``) -> the odgt key.

    Raises:
        ValueError: an unknown kind (lists the valid ones).
    """
    if box_kind in BOX_KINDS:
        return BOX_KINDS[box_kind]
    if box_kind in BOX_KINDS.values():
        return box_kind
    raise ValueError(f"CrowdHuman box_kind: expected one of {', '.join(BOX_KINDS)} "
                     f"(or {', '.join(BOX_KINDS.values())}), got {box_kind!r}")


def _is_ignored(entry: dict, key: str) -> bool:
    """The official rule: not a ``person``, or flagged ignore (heads use their own flag)."""
    if entry.get("tag") != "person":
        return True
    flags = entry.get("head_attr" if key == "hbox" else "extra")
    if key == "hbox" and entry.get("extra", {}).get("ignore", 0):
        return True
    return bool(isinstance(flags, dict) and flags.get("ignore", 0))


def parse_odgt(path: Path, box_kind: str = "full") -> list[dict]:
    """The lines of an ``.odgt`` file, checked.

    Returns:
        one dict per non-empty line: ``{"id": str, "size": (h, w) or None, "boxes": [[x1, y1, x2, y2]],
        "ignored": [bool], "line": int}``.

    Raises:
        ValueError: a line that is not JSON or misses ``ID``/``gtboxes``/the box key, or a box that
            is not 4 numbers; the message names the file, the line number and the field.
    """
    key = box_key(box_kind)
    images = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not a JSON object ({err.msg} at column {err.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            if not isinstance(record.get("ID"), str) or not record["ID"]:
                raise ValueError(f"{where}: field 'ID' (the image name without .jpg) is missing")
            entries = record.get("gtboxes")
            if not isinstance(entries, list):
                raise ValueError(f"{where}: field 'gtboxes' (a list) is missing")
            size = None
            if "height" in record and "width" in record:
                size = (int(record["height"]), int(record["width"]))
            boxes, ignored = [], []
            for k, entry in enumerate(entries):
                box = entry.get(key) if isinstance(entry, dict) else None
                if box is None:
                    raise ValueError(f"{where}: gtboxes[{k}].{key}: missing (box_kind {box_kind!r})")
                if not (isinstance(box, list) and len(box) == 4
                        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
                    raise ValueError(f"{where}: gtboxes[{k}].{key}: expected [x, y, w, h] numbers, got {box!r}")
                x, y, w, h = (float(v) for v in box)
                boxes.append([x, y, x + w, y + h])
                ignored.append(_is_ignored(entry, key))
            images.append({"id": record["ID"], "size": size, "boxes": boxes, "ignored": ignored, "line": number})
    return images


def read_crowdhuman(annotations: str | Path, images_dir: str | Path, box_kind: str = "full",
                    check_images: str = "header") -> DetectionDataset:
    """Reads a CrowdHuman ``.odgt`` file (format in the module docstring).

    Args:
        annotations: the ``.odgt`` file (``annotation_train.odgt`` / ``annotation_val.odgt``).
        images_dir: the folder of ``<ID>.jpg`` images.
        box_kind: ``full`` (default, as the papers), ``visible`` or ``head``.
        check_images: "none", "header" or "full", as for :func:`read_coco`. With "none" every line
            must give ``width`` and ``height``.

    Returns:
        a :class:`DetectionDataset` with one class, ``person`` (category id 1), image ids 1..N in
        file order, ignore regions in ``ignore_boxes``; its ``protocol`` is ``crowdhuman``.

    Raises:
        FileNotFoundError: the file or the folder is missing.
        ValueError: a malformed line (names the file and line), an unknown box kind.
    """
    annotations, images_dir = Path(annotations), Path(images_dir)
    if not annotations.is_file():
        raise FileNotFoundError(f"CrowdHuman annotation file not found: {annotations}")
    if not images_dir.is_dir():
        raise FileNotFoundError(f"CrowdHuman image folder not found: {images_dir}")
    check_mode(check_images, str(annotations))
    parsed = parse_odgt(annotations, box_kind)
    report = LoadReport(source=str(annotations))
    paths = [images_dir / f"{image['id']}.jpg" for image in parsed]
    infos = inspect_images(paths, check_images, desc=f"checking {images_dir} images")
    records = []
    for number, (image, path, info) in enumerate(zip(parsed, paths, infos), start=1):
        where = f"{annotations}:{image['line']}"
        if image["size"] is None and info is None:
            raise ValueError(f"{where}: width/height missing (needed when check_images='none')")
        size = resolve_image_size(path, image["size"], info, report, where)
        if size is None:
            continue
        height, width = size
        boxes = torch.tensor(image["boxes"], dtype=torch.float32).reshape(-1, 4)
        boxes, keep = clean_boxes(boxes, height, width, report, lambda j: f"{where}: gtboxes[{j}]")
        ignored = torch.tensor(image["ignored"], dtype=torch.bool).reshape(-1)
        for j in torch.nonzero(keep & ignored).flatten().tolist():
            report.add(R.CROWDHUMAN_IGNORE, f"{where}: gtboxes[{j}]")
        train, ignore = keep & ~ignored, keep & ignored
        record = DetectionRecord(path, number, height, width, boxes[train],
                                 torch.zeros(int(train.sum()), dtype=torch.int64), boxes[ignore],
                                 torch.zeros(int(ignore.sum()), dtype=torch.int64))
        if not len(record.labels):
            report.add(R.EMPTY_IMAGE, f"{where}: no person boxes")
        records.append(record)
    dataset = DetectionDataset(records, ["person"], [1], source=f"crowdhuman {annotations}", report=report,
                               protocol="crowdhuman")
    logger.info("read %d images, %d person boxes (%s), %d ignore regions from %s", len(records),
                sum(len(r.labels) for r in records), box_key(box_kind),
                sum(len(r.ignore_labels) for r in records), annotations)
    if report.counts:
        logger.info("%s", report.summary())
    return dataset
