"""Writing a COCO instances json as a CrowdHuman ``.odgt`` file or as VisDrone-DET txt files.

Used to make small sets in those formats from any COCO data (the tests and the benchmarks build
them from ``../shared/data/tiny_coco``), so both pipelines can be exercised end to end on real
images without the original data sets. The images stay where they are: the ``.odgt`` ``ID`` is
the image file's stem (the CrowdHuman reader looks for ``<images>/<ID>.jpg``) and the VisDrone
txt files are named after the images.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Mapping


def _load(coco_json: str | Path) -> tuple[dict, dict[int, list[dict]], dict[int, str]]:
    data = json.loads(Path(coco_json).read_text())
    by_image: dict[int, list[dict]] = defaultdict(list)
    for ann in data["annotations"]:
        by_image[ann["image_id"]].append(ann)
    names = {c["id"]: c["name"] for c in data["categories"]}
    return data, by_image, names


def coco_to_odgt(coco_json: str | Path, out_path: str | Path, person: str = "person") -> int:
    """Writes the ``person`` boxes of a COCO json as CrowdHuman lines; crowd boxes become ``mask``
    (ignore) entries. Every box serves as ``fbox``, ``vbox`` and ``hbox``. Returns the line count."""
    data, by_image, names = _load(coco_json)
    lines = []
    for image in data["images"]:
        gtboxes = []
        for ann in by_image[image["id"]]:
            if names[ann["category_id"]] != person:
                continue
            crowd = bool(ann.get("iscrowd", 0))
            box = [float(v) for v in ann["bbox"]]
            gtboxes.append({"tag": "mask" if crowd else "person", "fbox": box, "vbox": box, "hbox": box,
                            "extra": {"ignore": int(crowd)}, "head_attr": {"ignore": int(crowd)}})
        lines.append(json.dumps({"ID": Path(image["file_name"]).stem, "width": image["width"],
                                 "height": image["height"], "gtboxes": gtboxes}))
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text("\n".join(lines) + "\n")
    return len(lines)


def coco_to_visdrone(coco_json: str | Path, out_dir: str | Path, category_map: Mapping[str, int]) -> int:
    """Writes one VisDrone txt per image: categories named in ``category_map`` (COCO name ->
    VisDrone category 1..10) keep their box, other categories become 11 "others", crowd boxes
    become 0 "ignored regions". Returns the number of files written."""
    data, by_image, names = _load(coco_json)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for image in data["images"]:
        rows = []
        for ann in by_image[image["id"]]:
            x, y, w, h = (round(float(v)) for v in ann["bbox"])
            if ann.get("iscrowd", 0):
                rows.append(f"{x},{y},{w},{h},0,0,0,0")
            else:
                rows.append(f"{x},{y},{w},{h},1,{category_map.get(names[ann['category_id']], 11)},0,0")
        (out_dir / f"{Path(image['file_name']).stem}.txt").write_text("\n".join(rows) + ("\n" if rows else ""))
    return len(data["images"])


# COCO names -> VisDrone categories (1 pedestrian, 3 bicycle, 4 car, 6 truck, 9 bus, 10 motor).
COCO_TO_VISDRONE = {"person": 1, "bicycle": 3, "car": 4, "truck": 6, "bus": 9, "motorcycle": 10}
