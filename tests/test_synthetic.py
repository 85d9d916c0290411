"""The embedded synthetic data set: determinism, valid COCO, box geometry, size range, reuse."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from sparsedet.data.synthetic import (CLASS_NAMES, MANIFEST_NAME, MIN_VISIBLE_FRACTION, make_shapes_image,
                                      make_synthetic_image, render_scene, write_synthetic_coco)
from sparsedet.evaluation import evaluate_detections

SMALL = dict(num_train=24, num_val=4, height=128, width=160)


def _pixels(folder):
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return root, write_synthetic_coco(root, seed=0, **SMALL)


@pytest.fixture(scope="module")
def scenes():
    return [render_scene((7, 0, i)) for i in range(40)]


def test_same_seed_same_bytes_and_pixels(written, tmp_path):
    root, paths = written
    again = write_synthetic_coco(tmp_path / "again", seed=0, **SMALL)
    other = write_synthetic_coco(tmp_path / "other", seed=1, **SMALL)
    for split in ("train", "val"):
        first = open(paths[split]["annotations"], "rb").read()
        assert open(again[split]["annotations"], "rb").read() == first
        assert open(other[split]["annotations"], "rb").read() != first
        a, b = _pixels(root / split), _pixels(tmp_path / "again" / split)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
        c = _pixels(tmp_path / "other" / split)
        assert not all(np.array_equal(a[k], c[k]) for k in a)
    image, boxes, labels = make_synthetic_image(5)
    image2, boxes2, labels2 = make_synthetic_image(5)
    assert torch.equal(image, image2) and torch.equal(boxes, boxes2) and torch.equal(labels, labels2)
    assert not torch.equal(image, make_synthetic_image(6)[0])


def test_coco_json_is_valid(written):
    root, paths = written
    assert paths == {s: {"format": "coco", "annotations": str(root / "annotations" / f"instances_{s}.json"),
                         "images": str(root / s)} for s in ("train", "val")}
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(paths["train"]["annotations"])
    assert [coco.cats[i]["name"] for i in sorted(coco.cats)] == list(CLASS_NAMES)
    assert sorted(coco.cats) == list(range(1, len(CLASS_NAMES) + 1))
    assert len(coco.imgs) == SMALL["num_train"]
    for image in coco.imgs.values():
        with Image.open(root / "train" / image["file_name"]) as file:
            assert file.size == (image["width"], image["height"]) == (SMALL["width"], SMALL["height"])
            assert file.mode == "RGB"
    used = set()
    for ann in coco.anns.values():
        x, y, w, h = ann["bbox"]
        image = coco.imgs[ann["image_id"]]
        assert w > 0 and h > 0 and x >= 0 and y >= 0
        assert x + w <= image["width"] and y + h <= image["height"]
        assert 0 < ann["area"] <= w * h and ann["iscrowd"] in (0, 1)
        used.add(ann["category_id"])
    assert used == set(coco.cats)
    assert len({a["id"] for a in coco.anns.values()}) == len(coco.anns)


def test_ground_truth_as_detections_scores_full_ap(written):
    """Ignore regions (iscrowd) are no false negatives: the non-crowd boxes alone score AP 1."""
    _, paths = written
    dataset = json.loads(open(paths["val"]["annotations"]).read())
    predictions = {img["id"]: {"boxes": [], "scores": [], "labels": []} for img in dataset["images"]}
    for ann in dataset["annotations"]:
        if not ann["iscrowd"]:
            x, y, w, h = ann["bbox"]
            predictions[ann["image_id"]]["boxes"].append([x, y, x + w, y + h])
            predictions[ann["image_id"]]["scores"].append(1.0)
            predictions[ann["image_id"]]["labels"].append(ann["category_id"] - 1)
    predictions = {i: {k: torch.tensor(v).reshape(-1, 4) if k == "boxes" else torch.tensor(v) for k, v in p.items()}
                   for i, p in predictions.items()}
    result = evaluate_detections(dataset, predictions, list(range(1, len(CLASS_NAMES) + 1)))
    assert result.stats["AP"] == pytest.approx(1.0)


def _mask_box(mask: np.ndarray) -> list[int]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


def test_boxes_hug_visible_pixels(scenes):
    occluded = crowd = 0
    for index, scene in enumerate(scenes):
        height, width = scene.instance_map.shape
        owner = scene.instance_map.numpy()
        for k, (box, shape) in enumerate(zip(scene.boxes.tolist(), scene.shapes)):
            visible = owner == k
            assert [int(v) for v in box] == _mask_box(visible)
            (y0, y1, x0, x1), mask = shape.mask(height, width)
            full = np.zeros((height, width), dtype=bool)
            full[y0:y1, x0:x1] = mask
            assert not (visible & ~full).any()  # an object only shows where its shape is
            assert scene.visible_fraction[k].item() == pytest.approx(visible.sum() / full.sum())
            fx1, fy1, fx2, fy2 = _mask_box(full)
            if visible.sum() == full.sum():  # unoccluded: the box is the whole shape's
                assert [int(v) for v in box] == [fx1, fy1, fx2, fy2]
            else:
                occluded += 1
                assert fx1 <= box[0] and fy1 <= box[1] and box[2] <= fx2 and box[3] <= fy2
            assert bool(scene.iscrowd[k]) == (scene.visible_fraction[k].item() < MIN_VISIBLE_FRACTION)
            crowd += int(scene.iscrowd[k])
        # make_synthetic_image gives the same scene without its ignore regions
        image, boxes, labels = make_synthetic_image((7, 0, index))
        assert torch.equal(image, scene.image) and torch.equal(boxes, scene.boxes[~scene.iscrowd])
    assert occluded > 10 and crowd > 0


def test_objects_stand_out_from_their_surroundings(scenes):
    """An object's visible pixels differ in colour from the background just outside its box."""
    contrasts = []
    for scene in scenes[:10]:
        image = scene.image.permute(1, 2, 0).numpy().astype(np.float32)
        owner = scene.instance_map.numpy()
        for k, box in enumerate(scene.boxes.tolist()):
            x1, y1, x2, y2 = (int(v) for v in box)
            y0, x0 = max(0, y1 - 3), max(0, x1 - 3)
            window, labels = image[y0:y2 + 3, x0:x2 + 3], owner[y0:y2 + 3, x0:x2 + 3]
            around = labels == -1
            around[y1 - y0:y2 - y0, x1 - x0:x2 - x0] = False
            inside = labels == k
            if inside.sum() >= 30 and around.sum() >= 10:
                contrasts.append(np.linalg.norm(window[inside].mean(0) - window[around].mean(0)))
    assert len(contrasts) > 20 and np.median(contrasts) > 40


def test_sizes_span_tiny_to_large(scenes):
    sides = torch.cat([(s.boxes[:, 2:] - s.boxes[:, :2])[~s.iscrowd].max(dim=1).values for s in scenes])
    assert sides.min() <= 10 and sides.max() >= 0.4 * 320
    labels = torch.cat([s.labels for s in scenes])
    assert set(labels.tolist()) == set(range(len(CLASS_NAMES)))
    assert 2 <= min(len(s.labels) for s in scenes) and max(len(s.labels) for s in scenes) <= 8


def test_reuse_and_regeneration(tmp_path):
    root = tmp_path / "set"
    params = dict(num_train=3, num_val=2, height=64, width=64)
    paths = write_synthetic_coco(root, **params)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files}  # a rename gives a new inode
    assert write_synthetic_coco(root, **params) == paths  # reused: nothing rewritten
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files} == stamps
    assert not list(root.rglob(".*.tmp"))

    # An interrupted run leaves no manifest: the set is regenerated, identical.
    (root / MANIFEST_NAME).unlink()
    before = open(paths["train"]["annotations"], "rb").read()
    write_synthetic_coco(root, **params)
    assert (root / MANIFEST_NAME).is_file() and open(paths["train"]["annotations"], "rb").read() == before

    # A missing image also forces regeneration.
    (root / "val" / "000002.png").unlink()
    write_synthetic_coco(root, **params)
    assert (root / "val" / "000002.png").is_file()

    # Other parameters: a new set, without the old one's extra images.
    write_synthetic_coco(root, **dict(params, num_train=2))
    assert sorted(p.name for p in (root / "train").glob("*.png")) == ["000001.png", "000002.png"]
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    assert manifest["params"]["num_train"] == 2
    assert len(json.loads(open(paths["train"]["annotations"]).read())["images"]) == 2


def test_demo_names_still_work():
    image, boxes, labels = make_shapes_image(0)
    assert image.shape == (3, 256, 320) and image.dtype == torch.uint8
    assert boxes.shape == (len(labels), 4) and 1 <= len(labels) <= 5
    assert labels.max() < len(CLASS_NAMES)
