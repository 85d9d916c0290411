"""COCO evaluation (faster-coco-eval) against plain pycocotools on the real tiny_coco val json."""
from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from sparsedet.evaluation import STAT_NAMES, EvaluationResult, evaluate_detections, to_coco_results


@pytest.fixture(scope="module")
def val_json(shared_data):
    return shared_data / "tiny_coco" / "annotations" / "instances_val2017.json"


@pytest.fixture(scope="module")
def ground_truth(val_json):
    return json.loads(val_json.read_text())


@pytest.fixture(scope="module")
def category_ids(ground_truth):
    # A shuffled label -> category id map, so a mix-up of labels and category ids cannot pass.
    ids = [c["id"] for c in ground_truth["categories"]]
    return [ids[i] for i in np.random.default_rng(3).permutation(len(ids))]


@pytest.fixture(scope="module")
def predictions(ground_truth, category_ids):
    """Detections made from the ground truth: jittered true boxes (crowd ones too), random scores,
    wrong classes, false positives, one image with 150 detections over three classes and one
    with 130 detections of a single class (COCO keeps 100 per image per category)."""
    rng = np.random.default_rng(0)
    label_of = {c: i for i, c in enumerate(category_ids)}
    images = {img["id"]: img for img in ground_truth["images"]}
    per_image = {image_id: ([], []) for image_id in images}
    for ann in ground_truth["annotations"]:
        x, y, w, h = ann["bbox"]
        boxes, labels = per_image[ann["image_id"]]
        for _ in range(rng.integers(0, 3)):  # 0 (a miss), 1 or 2 (a duplicate) detections per object
            jitter = rng.normal(0, 0.08, 4) * [w, h, w, h]
            boxes.append([x + jitter[0], y + jitter[1], x + w + jitter[2], y + h + jitter[3]])
            wrong = rng.random() < 0.15
            labels.append(int(rng.integers(len(category_ids))) if wrong else label_of[ann["category_id"]])
    for image_id, (boxes, labels) in per_image.items():
        width, height = images[image_id]["width"], images[image_id]["height"]
        for _ in range(rng.integers(0, 6)):  # false positives anywhere
            x1, y1 = rng.uniform(0, width - 20), rng.uniform(0, height - 20)
            boxes.append([x1, y1, x1 + rng.uniform(5, width - x1), y1 + rng.uniform(5, height - y1)])
            labels.append(int(rng.integers(len(category_ids))))

    crowded, single_class = sorted(images)[:2]
    for image_id, classes, count in ((crowded, 3, 150), (single_class, 1, 130)):
        boxes, labels = per_image[image_id]
        present = [label_of[a["category_id"]] for a in ground_truth["annotations"] if a["image_id"] == image_id]
        chosen = (present + [0, 1, 2])[:classes]
        width, height = images[image_id]["width"], images[image_id]["height"]
        for k in range(count):
            x1, y1 = rng.uniform(0, width / 2), rng.uniform(0, height / 2)
            boxes.append([x1, y1, x1 + rng.uniform(10, width / 2), y1 + rng.uniform(10, height / 2)])
            labels.append(chosen[k % classes])

    result = {}
    for image_id, (boxes, labels) in per_image.items():
        result[image_id] = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                            "scores": torch.from_numpy(rng.random(len(labels))).float(),
                            "labels": torch.tensor(labels, dtype=torch.int64)}
    # An image the model found nothing in.
    result[sorted(images)[-1]] = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                                  "labels": torch.zeros(0, dtype=torch.int64)}
    assert max(len(p["labels"]) for p in result.values()) > 100
    return result


def _pycocotools(val_json, results, image_ids, cat_ids=None):
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(val_json))
        dt = gt.loadRes(results)
        evaluator = COCOeval(gt, dt, iouType="bbox")
        evaluator.params.imgIds = sorted(image_ids)
        if cat_ids is not None:
            evaluator.params.catIds = cat_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return dict(zip(STAT_NAMES, evaluator.stats.tolist()))


def test_stats_and_per_class_ap_match_pycocotools(val_json, ground_truth, predictions, category_ids, tmp_path):
    results_path = tmp_path / "out" / "results.json"
    result = evaluate_detections(val_json, predictions, category_ids, results_path=results_path)
    results = to_coco_results(predictions, category_ids)
    reference = _pycocotools(val_json, results, predictions)

    assert isinstance(result, EvaluationResult)
    assert list(result.stats) == list(STAT_NAMES)
    for name in STAT_NAMES:
        assert result.stats[name] == pytest.approx(reference[name], abs=1e-6), name
    assert 0.1 < result.stats["AP"] < 0.9  # a mixed result, not a trivial 0 or 1
    assert result.num_images == len(predictions)
    assert result.num_detections == sum(len(p["labels"]) for p in predictions.values()) == len(results)

    names = {c["id"]: c["name"] for c in ground_truth["categories"]}
    assert list(result.per_class) == [names[c] for c in category_ids]
    for category_id in category_ids:
        expected = _pycocotools(val_json, results, predictions, cat_ids=[category_id])["AP"]
        got = result.per_class[names[category_id]]
        if expected == -1:  # no ground truth of this class in these images
            assert math.isnan(got), names[category_id]
        else:
            assert got == pytest.approx(expected, abs=1e-6), names[category_id]
    assert sum(math.isnan(ap) for ap in result.per_class.values()) > 0

    # The written results json is the COCO results format: pycocotools reads it and scores the same.
    assert not list(results_path.parent.glob(".*tmp"))
    from_file = _pycocotools(val_json, str(results_path), predictions)
    for name in STAT_NAMES:
        assert from_file[name] == pytest.approx(result.stats[name], abs=1e-6), name


def test_hundred_detections_per_class_not_per_image(val_json, ground_truth, category_ids):
    """A perfect detection ranked 150th in its image, but the only one of its class, still counts."""
    label_of = {c: i for i, c in enumerate(category_ids)}
    image_id = next(img["id"] for img in ground_truth["images"]
                    if sum(a["image_id"] == img["id"] for a in ground_truth["annotations"]) == 1)
    ann = next(a for a in ground_truth["annotations"] if a["image_id"] == image_id)
    x, y, w, h = ann["bbox"]
    other = (label_of[ann["category_id"]] + 1) % len(category_ids)
    boxes = [[0.0, 0.0, 5.0, 5.0]] * 149 + [[x, y, x + w, y + h]]
    prediction = {image_id: {"boxes": torch.tensor(boxes), "scores": torch.linspace(1.0, 0.1, 150),
                             "labels": torch.tensor([other] * 149 + [label_of[ann["category_id"]]])}}
    result = evaluate_detections(ground_truth, prediction, category_ids)
    assert result.stats["AP"] == pytest.approx(1.0)


def test_empty_predictions_give_zero(val_json, category_ids, ground_truth):
    result = evaluate_detections(val_json, {}, category_ids)
    assert result.num_images == len(ground_truth["images"]) and result.num_detections == 0
    assert result.stats["AP"] == 0.0 and result.stats["AR100"] == 0.0
    some = [img["id"] for img in ground_truth["images"][:5]]
    empty = {i: {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
             for i in some}
    result = evaluate_detections(ground_truth, empty, category_ids)
    assert result.num_images == 5 and result.stats["AP"] == 0.0


def test_errors_name_the_problem(val_json, category_ids):
    bad = {123456789: {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0)}}
    with pytest.raises(ValueError, match="123456789") as err:
        evaluate_detections(val_json, bad, category_ids)
    assert "instances_val2017.json" in str(err.value)
    with pytest.raises(ValueError, match="labels must be in 0..79"):
        to_coco_results({1: {"boxes": torch.zeros(1, 4), "scores": torch.ones(1), "labels": torch.tensor([80])}},
                        category_ids)
    with pytest.raises(ValueError, match=r"\[999\]"):
        evaluate_detections(val_json, {}, [1, 999])


def test_ground_truth_dict_is_not_modified(ground_truth, predictions, category_ids):
    before = json.dumps(ground_truth, sort_keys=True)
    evaluate_detections(ground_truth, predictions, category_ids)
    assert json.dumps(ground_truth, sort_keys=True) == before


def test_table_and_dict(val_json, predictions, category_ids):
    result = evaluate_detections(val_json, predictions, category_ids, class_names=[f"c{i}" for i in range(80)])
    text = result.table()
    assert all(f"c{i} " in text for i in range(80))
    assert f"{100 * result.stats['AP50']:.1f}" in text and "AP50" in text and "ARl" in text
    assert "c0 " not in result.table(per_class=False)
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["stats"]["AP"] == result.stats["AP"]
    assert data["per_class"]["c0"] == (None if math.isnan(result.per_class["c0"]) else result.per_class["c0"])
