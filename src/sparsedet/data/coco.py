"""COCO-format annotation reading into plain per-image records."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class DetectionRecord:
    """One image and its boxes. ``boxes`` are (M, 4) xyxy pixels of the original file; ``labels``
    are contiguous 0-based class indices."""

    image_path: Path
    image_id: int
    height: int
    width: int
    boxes: torch.Tensor = field(default_factory=lambda: torch.zeros((0, 4)))
    labels: torch.Tensor = field(default_factory=lambda: torch.zeros((0,), dtype=torch.int64))


@dataclass
class CocoDataset:
    """A COCO json's images and non-crowd boxes, with the category id <-> label mapping."""

    records: list[DetectionRecord]
    category_ids: list[int]
    category_names: list[str]
    json_path: Path

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)


def read_coco(json_path: str | Path, image_dir: str | Path) -> CocoDataset:
    """Reads a COCO instances json. Crowd boxes are dropped; images without boxes are kept.

    Raises:
        ValueError: malformed json, naming the file and the field.
    """
    json_path, image_dir = Path(json_path), Path(image_dir)
    try:
        data = json.loads(json_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{json_path}: cannot read COCO json ({err})") from err
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"{json_path}: missing top-level field {key!r}")
    categories = sorted(data["categories"], key=lambda c: c["id"])
    label_of = {c["id"]: i for i, c in enumerate(categories)}
    boxes: dict[int, list] = {}
    for ann in data["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        if ann["category_id"] not in label_of:
            raise ValueError(f"{json_path}: annotation {ann.get('id')} has unknown category_id {ann['category_id']}")
        x, y, w, h = ann["bbox"]
        if w > 0 and h > 0:
            boxes.setdefault(ann["image_id"], []).append((x, y, x + w, y + h, label_of[ann["category_id"]]))
    records = []
    for img in sorted(data["images"], key=lambda i: i["id"]):
        rows = torch.tensor(boxes.get(img["id"], []), dtype=torch.float32).reshape(-1, 5)
        records.append(DetectionRecord(image_dir / img["file_name"], img["id"], img["height"], img["width"],
                                       rows[:, :4], rows[:, 4].to(torch.int64)))
    return CocoDataset(records, [c["id"] for c in categories], [c["name"] for c in categories], json_path)
