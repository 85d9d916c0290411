"""Reading Pascal VOC xml annotations into a DetectionDataset.

Works for the devkit layout (``JPEGImages/``, ``Annotations/``, ``ImageSets/Main/train.txt``) and
for flat layouts like ``images/`` + ``annotations/`` + ``train.txt``: the reader takes the two
folders and an optional list file. VOC boxes are 1-based inclusive pixel indices; they are turned
into 0-based xyxy pixel edges by ``(xmin - 1, ymin - 1, xmax, ymax)``, as detectron2 does.
"""
from __future__ import annotations

import math

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import records as R
from .records import DetectionDataset, DetectionRecord, LoadReport, logger
from .validation import check_mode, clean_boxes, inspect_images, resolve_image_size

MISSING_ANNOTATION = "image skipped: missing annotation file"
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".JPG", ".JPEG", ".PNG")


def read_split(path: Path) -> list[str]:
    """Image ids of an ImageSets-style list: the first word of each non-empty line (so the
    per-class lists ``aeroplane_train.txt``, "id  1", work too); ``#`` starts a comment."""
    if not path.is_file():
        raise FileNotFoundError(f"VOC split list not found: {path}")
    ids = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            ids.append(line.split()[0])
    return ids


def _text(node: ET.Element, tag: str, where: str, required: bool = True) -> Optional[str]:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        if required:
            raise ValueError(f"{where}.{tag}: missing")
        return None
    return child.text.strip()


def _number(node: ET.Element, tag: str, where: str) -> float:
    text = _text(node, tag, where)
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{where}.{tag}: expected a number, got {text!r}") from None
    if not math.isfinite(value):  # "inf"/"nan" parse as floats but are no size or coordinate
        raise ValueError(f"{where}.{tag}: expected a finite number, got {text!r}")
    return value


def _parse_xml(path: Path) -> dict:
    """One annotation file -> {"filename", "size" (h, w) or None, "objects": [(name, xyxy, difficult)]}."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as err:
        raise ValueError(f"{path}: cannot parse VOC xml ({err})") from err
    where = f"{path}: annotation"
    size = None
    size_node = root.find("size")
    if size_node is not None:
        height = _number(size_node, "height", f"{where}.size")
        width = _number(size_node, "width", f"{where}.size")
        # Some exporters write 0 when they do not know the size: then the image header decides.
        if height > 0 and width > 0:
            size = (int(height), int(width))
    objects = []
    for k, obj in enumerate(root.findall("object")):
        obj_where = f"{path}: object[{k}]"
        name = _text(obj, "name", obj_where)
        difficult_text = _text(obj, "difficult", obj_where, required=False) or "0"
        try:
            difficult = bool(int(float(difficult_text)))
        except ValueError:
            raise ValueError(f"{obj_where}.difficult: expected 0 or 1, got {difficult_text!r}") from None
        box_node = obj.find("bndbox")
        if box_node is None:
            raise ValueError(f"{obj_where}.bndbox: missing")
        x1, y1, x2, y2 = (_number(box_node, tag, f"{obj_where}.bndbox") for tag in ("xmin", "ymin", "xmax", "ymax"))
        objects.append((name, [x1 - 1.0, y1 - 1.0, x2, y2], difficult))
    return {"filename": _text(root, "filename", where, required=False), "size": size, "objects": objects}


def _image_path(images_dir: Path, image_id: str, filename: Optional[str]) -> Path:
    """The xml's ``filename`` when that file exists, else ``<id>.jpg`` (or .png, ...) as the
    devkit names them; the first candidate when none exists (reported missing later)."""
    candidates = ([images_dir / filename] if filename else []) + [images_dir / (image_id + s) for s in _IMAGE_SUFFIXES]
    return next((c for c in candidates if c.is_file()), candidates[0])


def read_voc(images_dir: str | Path, annotations_dir: str | Path, split: str | Path | None = None,
             class_names: Optional[Sequence[str]] = None, keep_difficult: bool = False,
             check_images: str = "header") -> DetectionDataset:
    """Reads Pascal VOC xml files.

    Args:
        images_dir: the images (devkit: ``JPEGImages``).
        annotations_dir: one ``<id>.xml`` per image (devkit: ``Annotations``).
        split: list file of image ids (devkit: ``ImageSets/Main/train.txt``); None = every xml.
        class_names: the classes, in label order; objects of other classes are dropped (counted).
            None = every name found in the xml files, sorted.
        keep_difficult: train on ``difficult`` objects too. When False (the VOC protocol) they are
            not training targets but stay in the evaluation ground truth as ignore regions.
        check_images: "none", "header" or "full", as for :func:`read_coco`.

    Returns:
        a :class:`DetectionDataset`; image ids are 1..N in split (or sorted file) order and
        category ids 1..C.

    Raises:
        FileNotFoundError: a folder or the split file is missing.
        ValueError: malformed xml or a missing/non-numeric field (names the file and the field).
    """
    images_dir, annotations_dir = Path(images_dir), Path(annotations_dir)
    for folder in (images_dir, annotations_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"VOC folder not found: {folder}")
    check_mode(check_images, str(annotations_dir))
    report = LoadReport(source=str(annotations_dir))
    ids = read_split(Path(split)) if split is not None else sorted(p.stem for p in annotations_dir.glob("*.xml"))

    parsed = []
    for image_id in ids:
        xml_path = annotations_dir / f"{image_id}.xml"
        if not xml_path.is_file():
            report.add(MISSING_ANNOTATION, f"{split}: id {image_id!r}: {xml_path} does not exist")
            continue
        parsed.append((image_id, xml_path, _parse_xml(xml_path)))

    if class_names is None:
        class_names = sorted({obj[0] for _, _, ann in parsed for obj in ann["objects"]})
    class_names = list(class_names)
    label_of = {name: i for i, name in enumerate(class_names)}

    paths = [_image_path(images_dir, image_id, ann["filename"]) for image_id, _, ann in parsed]
    infos = inspect_images(paths, check_images, desc=f"checking {images_dir} images")
    records = []
    for number, ((image_id, xml_path, ann), path, info) in enumerate(zip(parsed, paths, infos), start=1):
        if ann["size"] is None and info is None:
            raise ValueError(f"{xml_path}: annotation.size: missing (needed when check_images='none')")
        size = resolve_image_size(path, ann["size"], info, report, f"{xml_path}: annotation.size")
        if size is None:
            continue
        height, width = size
        objects = []
        for k, (name, box, difficult) in enumerate(ann["objects"]):
            if name not in label_of:
                report.add(R.UNKNOWN_CATEGORY, f"{xml_path}: object[{k}].name: {name!r} is not in the class list")
                continue
            objects.append((k, box, label_of[name], difficult))
        boxes = torch.tensor([o[1] for o in objects], dtype=torch.float32).reshape(-1, 4)
        boxes, keep = clean_boxes(boxes, height, width, report, lambda j: f"{xml_path}: object[{objects[j][0]}].bndbox")
        labels = torch.tensor([o[2] for o in objects], dtype=torch.int64)
        ignore = torch.tensor([o[3] and not keep_difficult for o in objects], dtype=torch.bool)
        for j in torch.nonzero(keep & ignore).flatten().tolist():
            report.add(R.DIFFICULT, f"{xml_path}: object[{objects[j][0]}]")
        record = DetectionRecord(path, number, height, width, boxes[keep & ~ignore], labels[keep & ~ignore],
                                 boxes[keep & ignore], labels[keep & ignore])
        if not len(record.labels):
            report.add(R.EMPTY_IMAGE, f"{xml_path}: no boxes")
        records.append(record)

    dataset = DetectionDataset(records, class_names, list(range(1, len(class_names) + 1)),
                               source=f"voc {annotations_dir}", report=report)
    logger.info("read %d images, %d boxes, %d classes from %s", len(records),
                sum(len(r.labels) for r in records), dataset.num_classes, annotations_dir)
    if report.counts:
        logger.info("%s", report.summary())
    return dataset
