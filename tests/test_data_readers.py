"""Dataset readers (COCO, VOC, YOLO, config sections) on real files and on every kind of bad input.

Bad inputs are generated here in tmp_path (truncated JPEG, CMYK, 16-bit, RGBA, palette, EXIF-rotated
images, broken json/xml/txt), never committed as binaries.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sparsedet.data import (DetectionDataset, LoadReport, read_coco, read_dataset, read_image, read_image_info,
                            read_voc, read_yolo)
from sparsedet.data import records as R

pytestmark = pytest.mark.usefixtures("single_thread")


def _coco_counts(json_path: Path) -> tuple[int, int, int]:
    data = json.loads(json_path.read_text())
    crowd = sum(a["iscrowd"] for a in data["annotations"])
    return len(data["images"]), len(data["annotations"]) - crowd, crowd


# ----------------------------------------------------------------------------------- real data
@pytest.mark.parametrize("split, num_boxes", [("train", 470), ("val", 382)])
def test_read_coco_tiny_coco(shared_data, split, num_boxes):
    root = shared_data / "tiny_coco"
    json_path = root / f"annotations/instances_{split}2017.json"
    dataset = read_coco(json_path, root / f"{split}2017")
    num_images, non_crowd, crowd = _coco_counts(json_path)
    assert non_crowd + crowd == num_boxes  # the data README's counts, crowd included
    assert len(dataset.records) == num_images == 50
    assert dataset.num_classes == 80 and len(dataset.category_ids) == 80
    assert dataset.category_ids == sorted(dataset.category_ids) and dataset.category_ids[0] == 1
    assert sum(len(r.labels) for r in dataset.records) == non_crowd
    assert sum(len(r.ignore_labels) for r in dataset.records) == crowd
    assert dataset.report[R.CROWD] == crowd
    assert dataset.report[R.EMPTY_IMAGE] == sum(1 for r in dataset.records if len(r.labels) == 0) >= 1
    for record in dataset.records[:5]:
        assert record.boxes.dtype == torch.float32 and record.labels.dtype == torch.int64
        assert tuple(read_image(record.image_path).shape[1:]) == (record.height, record.width)
        assert (record.boxes[:, 2:] > record.boxes[:, :2]).all()
    assert dataset.json_path == json_path  # kept for the existing evaluation helper

    gt = dataset.coco_ground_truth()
    assert len(gt["images"]) == 50 and len(gt["categories"]) == 80
    assert len(gt["annotations"]) == num_boxes
    assert sum(a["iscrowd"] for a in gt["annotations"]) == crowd
    assert all("segmentation" not in a and a["area"] > 0 for a in gt["annotations"])
    # Same boxes as the records (xywh <-> xyxy), and COCO's own index accepts the dict.
    from pycocotools.coco import COCO
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    record = next(r for r in dataset.records if len(r.labels))
    anns = [a for a in coco.imgToAnns[record.image_id] if not a["iscrowd"]]
    xyxy = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
    assert torch.allclose(xyxy, record.boxes, atol=1e-3)


@pytest.mark.parametrize("split, num_images", [("train", 160), ("val", 40)])
def test_read_voc_raccoon(shared_data, split, num_images):
    root = shared_data / "raccoon"
    dataset = read_voc(root / "images", root / "annotations", split=root / f"{split}.txt")
    assert len(dataset.records) == num_images
    assert dataset.class_names == ["raccoon"] and dataset.category_ids == [1]
    for record in dataset.records:
        assert record.image_path.is_file()
        assert (record.boxes >= 0).all() and (record.boxes[:, 2] <= record.width).all()


def test_read_voc_raccoon_all_files_and_box_convention(shared_data):
    root = shared_data / "raccoon"
    dataset = read_voc(root / "images", root / "annotations")
    assert len(dataset.records) == 200
    assert sum(len(r.labels) for r in dataset.records) == 217
    first = next(r for r in dataset.records if r.image_path.name == "raccoon-1.jpg")
    # raccoon-1.xml: xmin 81, ymin 88, xmax 522, ymax 408 (1-based inclusive) -> 0-based edges.
    assert first.boxes.tolist() == [[80.0, 87.0, 522.0, 408.0]]
    assert (first.height, first.width) == (417, 650)


def test_read_dataset_sections(shared_data, tmp_path):
    coco = read_dataset({"format": "coco", "annotations": "annotations/instances_val2017.json", "images": "val2017",
                         "check_images": "none"}, shared_data / "tiny_coco", "data.val")
    assert len(coco.records) == 50
    voc = read_dataset({"format": "voc", "images": "images", "annotations": "annotations", "split": "val.txt",
                        "classes": ["raccoon"], "keep_difficult": False}, str(shared_data / "raccoon"), "data.val")
    assert len(voc.records) == 40

    with pytest.raises(FileNotFoundError, match=r"data\.train\.annotations: file not found: .*nope\.json"):
        read_dataset({"format": "coco", "annotations": "nope.json", "images": "val2017"},
                     shared_data / "tiny_coco", "data.train")
    with pytest.raises(FileNotFoundError, match=r"data\.train\.images: dir not found"):
        read_dataset({"format": "yolo", "images": "imgs", "labels": ".", "classes": ["a"]}, tmp_path, "data.train")
    with pytest.raises(ValueError, match=r"data\.train\.format: expected one of coco, voc, yolo"):
        read_dataset({"format": "kitti"}, None, "data.train")
    with pytest.raises(ValueError, match=r"data\.val\.labels: unknown key for format coco"):
        read_dataset({"format": "coco", "annotations": "a", "images": "b", "labels": "c"}, None, "data.val")
    with pytest.raises(ValueError, match=r"data\.val\.images: missing"):
        read_dataset({"format": "coco", "annotations": "a"}, None, "data.val")
    with pytest.raises(ValueError, match=r"data\.val\.check_images"):
        read_dataset({"format": "coco", "annotations": "a", "images": "b", "check_images": "yes"}, None, "data.val")


def test_yolo_round_trip_of_raccoon(shared_data, tmp_path):
    """raccoon -> YOLO txt (normalised cx cy w h) -> read_yolo gives the same boxes."""
    root = shared_data / "raccoon"
    voc = read_voc(root / "images", root / "annotations", split=root / "val.txt")
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for record in voc.records:
        (images / record.image_path.name).symlink_to(record.image_path)  # read in place, no copy
        lines = []
        for (x1, y1, x2, y2), label in zip(record.boxes.tolist(), record.labels.tolist()):
            w, h = record.width, record.height
            lines.append(f"{label} {(x1 + x2) / 2 / w:.8f} {(y1 + y2) / 2 / h:.8f} {(x2 - x1) / w:.8f} {(y2 - y1) / h:.8f}")
        (labels / record.image_path.with_suffix(".txt").name).write_text("\n".join(lines) + "\n")
    (tmp_path / "data.yaml").write_text("names:\n  0: raccoon\n")
    yolo = read_yolo(images, labels, tmp_path / "data.yaml")
    assert yolo.class_names == ["raccoon"] and len(yolo.records) == len(voc.records) == 40
    by_name = {r.image_path.name: r for r in voc.records}
    for record in yolo.records:
        original = by_name[record.image_path.name]
        assert (record.height, record.width) == (original.height, original.width)
        assert torch.allclose(record.boxes, original.boxes, atol=1e-3)
        assert torch.equal(record.labels, original.labels)
    assert not yolo.report.counts


# --------------------------------------------------------------------------------- bad inputs
def _noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _write_rotated_jpeg(path: Path, stored_hw: tuple[int, int], orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(_noise(*stored_hw)).save(path, exif=exif.tobytes())


def _write_bad_images(folder: Path) -> dict[str, tuple[int, int]]:
    """Every kind of image file a dataset may hold; returns file name -> (height, width) as stored."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_noise(40, 60)).save(folder / "good.jpg", quality=95)
    Image.fromarray(_noise(40, 60)).save(folder / "empty.jpg")
    data = (folder / "good.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "not_an_image.jpg").write_text("hello")
    Image.fromarray(_noise(40, 60)).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray((np.arange(40 * 60, dtype=np.uint16).reshape(40, 60) * 27)).save(folder / "gray16.png")
    Image.fromarray(np.dstack([_noise(40, 60), np.full((40, 60, 1), 128, np.uint8)])).save(folder / "rgba.png")
    Image.fromarray(_noise(40, 60)[..., 0]).save(folder / "gray.png")
    Image.fromarray(_noise(40, 60)).convert("P").save(folder / "palette.png")
    _write_rotated_jpeg(folder / "exif_raw_size.jpg", (40, 60), 6)       # displayed 60 x 40
    _write_rotated_jpeg(folder / "exif_oriented_size.jpg", (40, 60), 8)  # displayed 60 x 40
    Image.fromarray(_noise(50, 60)).save(folder / "wrong_size.jpg")
    return {"good.jpg": (40, 60), "empty.jpg": (40, 60), "truncated.jpg": (40, 60), "not_an_image.jpg": (40, 60),
            "cmyk.jpg": (40, 60), "gray16.png": (40, 60), "rgba.png": (40, 60), "gray.png": (40, 60),
            "palette.png": (40, 60), "exif_raw_size.jpg": (40, 60), "exif_oriented_size.jpg": (60, 40),
            "wrong_size.jpg": (40, 60), "missing.jpg": (40, 60)}


def test_read_image_converts_every_mode_to_rgb(tmp_path):
    _write_bad_images(tmp_path)
    for name in ("good.jpg", "cmyk.jpg", "gray16.png", "rgba.png", "gray.png", "palette.png"):
        image = read_image(tmp_path / name)
        assert image.shape == (3, 40, 60) and image.dtype == torch.uint8, name
    # 16-bit: scaled by the 16-bit range (65535 -> 255), not clipped at 255 nor stretched per image.
    gray16 = read_image(tmp_path / "gray16.png")
    stored = np.asarray(Image.open(tmp_path / "gray16.png"), dtype=np.float64)
    assert torch.allclose(gray16[0].double(), torch.from_numpy(np.round(stored / 257)), atol=1)
    assert (gray16[0] == gray16[1]).all() and gray16.max() < 255  # max stored value 63153 -> 246
    rgba = read_image(tmp_path / "rgba.png")
    assert torch.equal(rgba, torch.from_numpy(_noise(40, 60)).permute(2, 0, 1))  # alpha dropped
    # EXIF orientation 6 / 8 rotate by 90 degrees: the displayed image is 60 x 40.
    assert read_image(tmp_path / "exif_raw_size.jpg").shape == (3, 60, 40)
    info = read_image_info(tmp_path / "exif_raw_size.jpg")
    assert (info.height, info.width, info.stored_height, info.stored_width, info.orientation) == (60, 40, 40, 60, 6)
    with pytest.raises(ValueError, match="truncated.jpg"):
        read_image(tmp_path / "truncated.jpg")
    with pytest.raises(ValueError, match="not_an_image.jpg"):
        read_image(tmp_path / "not_an_image.jpg")
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        read_image(tmp_path / "missing.jpg")
    read_image_info(tmp_path / "truncated.jpg")  # the header alone is intact
    with pytest.raises(ValueError, match="truncated.jpg"):
        read_image_info(tmp_path / "truncated.jpg", decode=True)


def _bad_coco(tmp_path: Path) -> Path:
    stored = _write_bad_images(tmp_path / "images")
    images = []
    for i, (name, (h, w)) in enumerate(stored.items(), start=1):
        images.append({"id": i, "file_name": name, "height": h, "width": w})
    images[-2]["width"] = 60  # wrong_size.jpg is 50 x 60 on disk, the json says 40 x 60
    ids = {img["file_name"]: img["id"] for img in images}
    good = ids["good.jpg"]
    nan = float("nan")
    boxes = [  # (image, bbox xywh, category, iscrowd, annotation id)
        (good, [10, 10, 20, 15], 1, 0, 1),             # fine
        (good, [50, 30, 20, 20], 3, 0, 2),             # partly outside -> clipped
        (good, [-5, -5, 10, 10], 1, 0, 3),             # negative coords -> clipped
        (good, [nan, 5, 10, 10], 1, 0, 4),             # NaN -> dropped
        (good, [5, 5, -10, 10], 1, 0, 5),              # negative width -> dropped
        (good, [5, 5, 0, 10], 1, 0, 6),                # zero width -> dropped
        (good, [100, 100, 10, 10], 1, 0, 7),           # entirely outside -> dropped
        (good, [5, 5, 10, 10], 99, 0, 8),              # unknown category -> dropped
        (good, [1, 1, 30, 30], 1, 1, 9),               # crowd -> ignore region
        (good, [2, 2, 5, 5], 3, 0, 1),                 # duplicate annotation id -> kept, renumbered in GT
        (12345, [2, 2, 5, 5], 3, 0, 10),               # unknown image id -> dropped
        (ids["exif_raw_size.jpg"], [5, 40, 20, 15], 1, 0, 11),  # within the displayed 60 x 40 (h x w)
        (ids["cmyk.jpg"], [1, 1, 5, 5], 1, 0, 12),
    ]
    annotations = [{"id": aid, "image_id": img, "category_id": cat, "bbox": bbox, "iscrowd": crowd,
                    "area": 1.0}
                   for img, bbox, cat, crowd, aid in boxes]
    categories = [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def test_read_coco_bad_inputs_are_counted_not_fatal(tmp_path, caplog):
    json_path = _bad_coco(tmp_path)
    with caplog.at_level(logging.WARNING, logger="sparsedet.data"):
        dataset = read_coco(json_path, tmp_path / "images")
    report = dataset.report
    names = {r.image_path.name: r for r in dataset.records}
    # Skipped images, each counted once.
    assert report[R.MISSING_FILE] == 1 and "missing.jpg" not in names
    # The truncated JPEG lacks its end marker: the header check decodes it and skips it (issue 9).
    assert report[R.UNDECODABLE] == 2 and "not_an_image.jpg" not in names and "truncated.jpg" not in names
    assert report[R.SIZE_MISMATCH] == 1 and "wrong_size.jpg" not in names
    # Converted modes and EXIF: kept; the raw-size json entry is corrected to the displayed size.
    assert {"cmyk.jpg", "gray16.png", "rgba.png", "gray.png", "palette.png", "exif_oriented_size.jpg"} <= set(names)
    assert report[R.EXIF_SIZE] == 1
    exif = names["exif_raw_size.jpg"]
    assert (exif.height, exif.width) == (60, 40)
    assert exif.boxes.tolist() == [[5.0, 40.0, 25.0, 55.0]]
    # Boxes.
    good = names["good.jpg"]
    assert good.boxes.tolist() == [[10, 10, 30, 25], [50, 30, 60, 40], [0, 0, 5, 5], [2, 2, 7, 7]]
    assert good.labels.tolist() == [0, 1, 0, 1]
    assert good.ignore_boxes.tolist() == [[1, 1, 31, 31]]
    assert report[R.BOX_CLIPPED] == 2 and report[R.BOX_NON_FINITE] == 1 and report[R.BOX_NEGATIVE] == 1
    assert report[R.BOX_DEGENERATE] == 1 and report[R.BOX_OUTSIDE] == 1
    assert report[R.UNKNOWN_CATEGORY] == 1 and report[R.UNKNOWN_IMAGE] == 1
    assert report[R.DUPLICATE_ANNOTATION_ID] == 1 and report[R.CROWD] == 1
    # 6: truncated.jpg (no boxes) is skipped up front since issue 9.
    assert report[R.EMPTY_IMAGE] == sum(1 for r in dataset.records if not len(r.labels)) == 6
    # Messages name the file and the field.
    assert "instances.json: annotations[3].bbox" in report.examples[R.BOX_NON_FINITE][0]
    assert "instances.json: annotations[7].category_id: 99" in report.examples[R.UNKNOWN_CATEGORY][0]
    assert "missing.jpg" in report.examples[R.MISSING_FILE][0]
    assert "images[" in report.examples[R.SIZE_MISMATCH][0]
    warned = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "missing.jpg" in warned and "annotations[3].bbox" in warned
    summary = report.summary()
    assert R.MISSING_FILE in summary and R.BOX_CLIPPED in summary
    # Ground truth: crowd kept as iscrowd=1, duplicate id renumbered, bad boxes fixed or dropped.
    gt = dataset.coco_ground_truth()
    good_anns = [a for a in gt["annotations"] if a["image_id"] == good.image_id]
    assert len(good_anns) == 5 and sum(a["iscrowd"] for a in good_anns) == 1
    assert len({a["id"] for a in gt["annotations"]}) == len(gt["annotations"])
    assert all(math.isfinite(v) for a in gt["annotations"] for v in a["bbox"])
    assert {i["file_name"] for i in gt["images"]} == set(names)

    full = read_coco(json_path, tmp_path / "images", check_images="full")
    assert full.report[R.UNDECODABLE] == 2 and "truncated.jpg" not in {r.image_path.name for r in full.records}
    assert any("truncated.jpg" in m for m in full.report.examples[R.UNDECODABLE])
    trusting = read_coco(json_path, tmp_path / "images", check_images="none")
    assert len(trusting.records) == len(json.loads(json_path.read_text())["images"])


def _minimal_coco(**changes) -> dict:
    data = {"images": [{"id": 1, "file_name": "a.jpg", "height": 10, "width": 10}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2], "iscrowd": 0}],
            "categories": [{"id": 1, "name": "a"}]}
    for key, value in changes.items():
        data[key] = value
    return data


@pytest.mark.parametrize("data, message", [
    ("{not json", r"instances\.json: cannot read COCO json"),
    ([1, 2], r"instances\.json: expected a json object"),
    ({"images": [], "categories": []}, r"instances\.json: missing top-level field 'annotations'"),
    (_minimal_coco(images=[{"id": 1, "height": 10, "width": 10}]), r"instances\.json: images\[0\]\.file_name: missing"),
    (_minimal_coco(images=[{"id": 1, "file_name": "a.jpg", "height": "10", "width": 10}]),
     r"images\[0\]\.height: expected a positive int"),
    (_minimal_coco(images=[{"id": 7, "file_name": "a.jpg", "height": 10, "width": 10},
                           {"id": 7, "file_name": "b.jpg", "height": 10, "width": 10}]),
     r"instances\.json: images\[1\]\.id: duplicate image id 7"),
    (_minimal_coco(categories=[{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]), r"duplicate category id 1"),
    (_minimal_coco(annotations=[{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3]}]),
     r"instances\.json: annotations\[0\]\.bbox: expected 4 numbers \[x, y, width, height\], got \[1, 2, 3\]"),
    (_minimal_coco(annotations=[{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, "4"]}]),
     r"annotations\[0\]\.bbox: expected 4 numbers"),
    (_minimal_coco(annotations=[{"id": 1, "image_id": 1, "bbox": [1, 2, 3, 4]}]),
     r"annotations\[0\]\.category_id: missing"),
    (_minimal_coco(annotations=[{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4], "iscrowd": 2}]),
     r"annotations\[0\]\.iscrowd: expected 0 or 1"),
])
def test_read_coco_structure_errors_name_file_and_field(tmp_path, data, message):
    path = tmp_path / "instances.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    with pytest.raises(ValueError, match=message):
        read_coco(path, tmp_path, check_images="none")


def test_read_coco_missing_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        read_coco(tmp_path / "nothere.json", tmp_path)


def _voc_xml(filename: str, size: tuple[int, int] | None, objects: list[tuple[str, list, int]]) -> str:
    parts = [f"<annotation><filename>{filename}</filename>"]
    if size:
        parts.append(f"<size><width>{size[1]}</width><height>{size[0]}</height><depth>3</depth></size>")
    for name, (x1, y1, x2, y2), difficult in objects:
        parts.append(f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{x1}</xmin>"
                     f"<ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")
    return "".join(parts) + "</annotation>"


def test_read_voc_devkit_layout_difficult_and_bad_items(tmp_path, caplog):
    root = tmp_path / "VOC2007"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations").mkdir()
    (root / "ImageSets/Main").mkdir(parents=True)
    for name in ("000001", "000002", "000003"):
        Image.fromarray(_noise(40, 60)).save(root / "JPEGImages" / f"{name}.jpg")
    (root / "Annotations/000001.xml").write_text(_voc_xml("000001.jpg", (40, 60), [
        ("dog", [1, 1, 10, 10], 0), ("cat", [5, 5, 30, 20], 1), ("person", [20, 20, 70, 30], 0)]))
    # No <size>: taken from the image header. A wrong <filename>: the devkit's <id>.jpg is found.
    (root / "Annotations/000002.xml").write_text(_voc_xml("elsewhere.jpg", None, [("zebra", [2, 2, 8, 8], 0)]))
    (root / "Annotations/000003.xml").write_text(_voc_xml("000003.jpg", (40, 60), []))
    (root / "ImageSets/Main/trainval.txt").write_text("000001\n000002\n000003\n000004\n\n")

    with caplog.at_level(logging.WARNING, logger="sparsedet.data"):
        dataset = read_voc(root / "JPEGImages", root / "Annotations", split=root / "ImageSets/Main/trainval.txt",
                           class_names=["cat", "dog", "person"])
    first, second, third = dataset.records
    assert [r.image_id for r in dataset.records] == [1, 2, 3]
    assert first.boxes.tolist() == [[0, 0, 10, 10], [19, 19, 60, 30]]  # person clipped at width 60
    assert first.labels.tolist() == [1, 2]
    assert first.ignore_boxes.tolist() == [[4, 4, 30, 20]] and first.ignore_labels.tolist() == [0]
    assert (second.height, second.width) == (40, 60) and second.image_path.name == "000002.jpg"
    report = dataset.report
    assert report[R.DIFFICULT] == 1 and report[R.BOX_CLIPPED] == 1 and report[R.UNKNOWN_CATEGORY] == 1
    assert report["image skipped: missing annotation file"] == 1
    assert report[R.EMPTY_IMAGE] == 2
    assert "000002.xml: object[0].name: 'zebra'" in report.examples[R.UNKNOWN_CATEGORY][0]
    assert "000004" in caplog.text
    gt = dataset.coco_ground_truth()
    assert [c["id"] for c in gt["categories"]] == [1, 2, 3]
    assert sorted((a["category_id"], a["iscrowd"]) for a in gt["annotations"]) == [(1, 1), (2, 0), (3, 0)]

    kept = read_voc(root / "JPEGImages", root / "Annotations", split=root / "ImageSets/Main/trainval.txt",
                    keep_difficult=True)
    assert kept.class_names == ["cat", "dog", "person", "zebra"]  # sorted names found in the xml files
    assert len(kept.records[0].labels) == 3 and len(kept.records[0].ignore_labels) == 0


@pytest.mark.parametrize("xml, message", [
    ("<annotation><object>", r"bad\.xml: cannot parse VOC xml"),
    ("<annotation><object><name>a</name></object></annotation>", r"bad\.xml: object\[0\]\.bndbox: missing"),
    ("<annotation><object><name>a</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>x</xmax><ymax>3</ymax>"
     "</bndbox></object></annotation>", r"bad\.xml: object\[0\]\.bndbox\.xmax: expected a number, got 'x'"),
    ("<annotation><object><bndbox/></object></annotation>", r"bad\.xml: object\[0\]\.name: missing"),
])
def test_read_voc_structure_errors(tmp_path, xml, message):
    (tmp_path / "ann").mkdir()
    (tmp_path / "img").mkdir()
    (tmp_path / "ann/bad.xml").write_text(xml)
    with pytest.raises(ValueError, match=message):
        read_voc(tmp_path / "img", tmp_path / "ann")


def test_read_yolo_fixture_and_bad_items(tmp_path):
    images, labels = tmp_path / "images" / "train", tmp_path / "labels" / "train"
    (images / "sub").mkdir(parents=True)
    (labels / "sub").mkdir(parents=True)
    Image.fromarray(_noise(40, 60)).save(images / "a.jpg")
    Image.fromarray(_noise(40, 60)).save(images / "sub" / "b.png")
    Image.fromarray(_noise(40, 60)).save(images / "c.jpg")  # no label file: background image
    _write_rotated_jpeg(images / "d.jpg", (40, 60), 6)      # displayed 60 x 40: normalised to that
    (labels / "a.txt").write_text("0 0.5 0.5 0.5 0.5\n1 0.95 0.5 0.2 0.2\n7 0.5 0.5 0.1 0.1\n\n2 0.5 0.5 0 0.1\n")
    (labels / "sub" / "b.txt").write_text("2 0.25 0.25 0.5 0.5\n")
    (labels / "d.txt").write_text("0 0.5 0.5 1.0 1.0\n")
    (labels / "orphan.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    (tmp_path / "names.txt").write_text("cat\ndog\nbird\n")

    dataset = read_yolo(images, labels, tmp_path / "names.txt")
    assert dataset.class_names == ["cat", "dog", "bird"] and dataset.category_ids == [1, 2, 3]
    names = {r.image_path.name: r for r in dataset.records}
    assert set(names) == {"a.jpg", "b.png", "c.jpg", "d.jpg"}
    assert torch.allclose(names["a.jpg"].boxes, torch.tensor([[15.0, 10, 45, 30], [51, 16, 60, 24]]))
    assert names["a.jpg"].labels.tolist() == [0, 1]
    assert names["b.png"].boxes.tolist() == [[0, 0, 30, 20]] and names["b.png"].labels.tolist() == [2]
    assert (names["d.jpg"].height, names["d.jpg"].width) == (60, 40)
    assert names["d.jpg"].boxes.tolist() == [[0, 0, 40, 60]]
    report = dataset.report
    assert report[R.UNKNOWN_CATEGORY] == 1 and "a.txt:3" in report.examples[R.UNKNOWN_CATEGORY][0]
    assert report[R.BOX_CLIPPED] == 1 and report[R.BOX_DEGENERATE] == 1
    assert report[R.NO_LABEL_FILE] == 1 and report[R.EMPTY_IMAGE] == 1
    assert report[R.ORPHAN_LABEL] == 1 and "orphan.txt" in report.examples[R.ORPHAN_LABEL][0]

    (tmp_path / "data.yaml").write_text("path: .\nnames: [cat, dog, bird]\n")
    assert read_yolo(images, labels, tmp_path / "data.yaml").class_names == ["cat", "dog", "bird"]
    (tmp_path / "bad.yaml").write_text("nc: 3\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: names: missing"):
        read_yolo(images, labels, tmp_path / "bad.yaml")
    (labels / "c.txt").write_text("0 0.5 0.5 0.1\n")
    with pytest.raises(ValueError, match=r"c\.txt:1: expected 5 numbers"):
        read_yolo(images, labels, ["cat", "dog", "bird"])


def test_load_report_logs_a_few_examples_per_reason(caplog):
    report = LoadReport(source="x.json", max_examples=2)
    with caplog.at_level(logging.INFO, logger="sparsedet.data"):
        for i in range(5):
            report.add(R.MISSING_FILE, f"x.json: images[{i}]: gone")
        report.add(R.CROWD, "x.json: annotations[0]")
    assert report[R.MISSING_FILE] == 5 and report["never happened"] == 0
    assert report.examples[R.MISSING_FILE] == ["x.json: images[0]: gone", "x.json: images[1]: gone"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "images[0]" in warnings[0].getMessage()
    assert [r.levelno for r in caplog.records if "annotations[0]" in r.getMessage()] == [logging.INFO]
    assert "image skipped: missing file: 5" in report.summary()


def test_without_empty_and_aspect_ratios(tmp_path):
    json_path = _bad_coco(tmp_path)
    dataset: DetectionDataset = read_coco(json_path, tmp_path / "images")
    filtered = dataset.without_empty()
    assert len(filtered.records) == sum(1 for r in dataset.records if len(r.labels)) == 3
    assert {i["id"] for i in filtered.coco_ground_truth()["images"]} == {r.image_id for r in filtered.records}
    assert dataset.aspect_ratios() == [r.width / r.height for r in dataset.records]
