"""VisDrone-DET: the txt reader, the training quadrant split and the toolkit metrics on hand-made cases."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsedet.data import read_dataset, read_visdrone
from sparsedet.data.visdrone import CLASS_NAMES, parse_visdrone_txt, split_into_quadrants
from sparsedet.evaluation.visdrone import VisDroneImage, drop_in_ignored_regions, evaluate_visdrone, match_class

CAR, PEDESTRIAN = 4, 1


def _image(gt, det=(), size=(100, 100), name="img"):
    return VisDroneImage(name, size[0], size[1], np.array(gt, dtype=float).reshape(-1, 6),
                         np.array(det, dtype=float).reshape(-1, 6))


def _evaluate(images, **kw):
    return evaluate_visdrone(images, CLASS_NAMES, **kw)


def test_ignored_region_swallows_a_detection():
    car = [60, 60, 20, 20, 1, CAR]
    region = [1, 1, 50, 50, 0, 0]
    in_region = [10, 10, 20, 20, 0.95, CAR]        # ranked above the true positive
    hit = [60, 60, 20, 20, 0.9, CAR]
    assert _evaluate([_image([car, region], [in_region, hit])]).stats["AP"] == pytest.approx(1.0)
    # Without the region the same detection is a false positive ranked first: precision 1/2 at recall 1.
    assert _evaluate([_image([car], [in_region, hit])]).stats["AP"] == pytest.approx(0.5)
    gt, det = drop_in_ignored_regions(np.array([car, region], float), np.array([in_region, hit], float), 100, 100)
    assert gt.tolist() == [car] and det.tolist() == [hit]


def test_ignored_region_half_coverage_rule():
    region = np.array([[1, 1, 50, 100, 0, 0]], float)   # the left half of the map (columns 0..50)
    boxes = np.array([[30, 10, 40, 10, 0.5, CAR],        # integral window columns 30..69: 21/40 covered -> dropped
                      [40, 10, 40, 10, 0.5, CAR]], float)  # columns 40..79: 11/40 -> kept
    _, kept = drop_in_ignored_regions(region, boxes, 100, 100)
    assert kept.tolist() == [boxes[1].tolist()]


def test_iou_thresholds_ap50_ap75_by_hand():
    # IoU .72: a hit at .50 ... .70 (5 of 10 thresholds), a miss from .75 on.
    result = _evaluate([_image([[0, 0, 100, 100, 1, CAR]], [[0, 0, 100, 72, 0.9, CAR]], size=(200, 200))])
    assert result.stats["AP50"] == pytest.approx(1.0) and result.stats["AP75"] == 0.0
    assert result.stats["AP"] == pytest.approx(0.5) and result.stats["AR500"] == pytest.approx(0.5)
    assert result.per_class["car"] == pytest.approx(0.5) and np.isnan(result.per_class["bus"])


def test_class_11_is_not_evaluated():
    others = [10, 60, 20, 20, 1, 11]
    car = [60, 60, 20, 20, 1, CAR]
    dets = [[60, 60, 20, 20, 0.9, CAR]]
    with_others = _evaluate([_image([car, others], dets)])
    assert with_others.stats == _evaluate([_image([car], dets)]).stats
    # A car detection on the "others" box is a plain false positive for "car".
    on_others = _evaluate([_image([car, others], [[10, 60, 20, 20, 0.95, CAR]] + dets)])
    assert on_others.stats["AP"] == pytest.approx(0.5)


def test_500_detection_cap():
    car = [0, 0, 10, 10, 1, CAR]
    misses = [[20 + (i % 40) * 2, 20 + (i // 40) * 5, 1, 1, 0.99 - i * 1e-4, CAR] for i in range(499)]
    hit = [0, 0, 10, 10, 0.5, CAR]
    at_500 = _evaluate([_image([car], misses + [hit], size=(200, 200))])
    assert at_500.stats["AR500"] == pytest.approx(1.0) and at_500.stats["AR100"] == 0.0
    assert at_500.stats["AP"] == pytest.approx(1 / 500)          # precision 1/500 at recall 1
    extra_miss = [[150, 150, 1, 1, 0.98, CAR]]                    # pushes the hit to rank 501
    at_501 = _evaluate([_image([car], misses + extra_miss + [hit], size=(200, 200))])
    assert at_501.stats["AP"] == 0.0 and at_501.stats["AR500"] == 0.0
    assert _evaluate([_image([car], misses + extra_miss + [hit], size=(200, 200))], max_dets=501).stats["AP"] > 0


def test_image_frequency_weighting_on_and_off():
    cars = [_image([[0, 0, 10, 10, 1, CAR]], [[0, 0, 10, 10, 0.9, CAR]], name=f"c{i}") for i in range(3)]
    pedestrian = _image([[0, 0, 10, 10, 1, PEDESTRIAN]], name="p")   # missed: AP 0
    images = cars + [pedestrian]
    assert _evaluate(images).stats["AP"] == pytest.approx(0.75)       # (3 * 1 + 1 * 0) / 4
    assert _evaluate(images, class_weighting="uniform").stats["AP"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="class_weighting: expected one of image_frequency, uniform"):
        _evaluate(images, class_weighting="by_area")


def test_score_zero_ground_truth_absorbs_but_counts_in_recall():
    ignored_car = [0, 0, 10, 10, 0, CAR]
    gt_count, _, match = match_class(np.array([ignored_car], float), np.array([[0, 0, 10, 10, 0.9, CAR]], float), 0.5)
    assert gt_count == 1 and match.tolist() == [-1]


def test_results_files(tmp_path):
    _evaluate([_image([[0, 0, 10, 10, 1, CAR]], [[1, 2, 3, 4, 0.9, CAR]], name="0000001_0001")],
              results_dir=tmp_path / "res")
    assert (tmp_path / "res" / "0000001_0001.txt").read_text() == "1.00,2.00,3.00,4.00,0.900000,4,-1,-1\n"


def test_quadrant_split_on_hand_made_boxes():
    # 100 wide, 80 high: split lines x = 50, y = 40.
    boxes = torch.tensor([[10, 10, 30, 30],     # inside the top-left part
                          [40, 5, 70, 20],      # crosses the vertical line
                          [45, 35, 80, 60],     # crosses both lines
                          [60, 50, 90, 70],     # inside the bottom-right part
                          [20, 30, 40, 70],     # crosses the horizontal line
                          [55, 30, 70, 60]], dtype=torch.float32)   # top-right, crosses the horizontal line
    parts = split_into_quadrants(boxes, 80, 100)
    crops = [p[0] for p in parts]
    assert crops == [(0, 0, 50, 40), (50, 0, 100, 40), (0, 40, 50, 80), (50, 40, 100, 80)]
    top_left, top_right, bottom_left, bottom_right = ((p[1].tolist(), p[2].tolist()) for p in parts)
    assert top_left == ([[10, 10, 30, 30], [40, 5, 50, 20], [45, 35, 50, 40], [20, 30, 40, 40]], [0, 1, 2, 4])
    assert top_right == ([[5, 30, 20, 40]], [5])
    assert bottom_left == ([], [])
    assert bottom_right == ([[10, 10, 40, 30]], [3])


def _visdrone_folder(tmp_path, rows_by_image, size=(80, 100)):
    from PIL import Image

    (tmp_path / "images").mkdir()
    (tmp_path / "annotations").mkdir()
    for name, rows in rows_by_image.items():
        Image.new("RGB", (size[1], size[0])).save(tmp_path / "images" / f"{name}.jpg")
        (tmp_path / "annotations" / f"{name}.txt").write_text(rows)
    return tmp_path


def test_reader_every_row_kind_and_quadrants(tmp_path):
    rows = ("10,10,20,20,1,4,0,0\n"          # car
            "40,5,30,15,1,1,0,1,\n"          # pedestrian crossing the vertical split (trailing comma)
            "60,50,30,20,0,0,0,0\n"          # ignored region
            "5,50,10,10,1,11,0,0\n"          # others
            "70,10,10,10,0,4,0,0\n")         # score-0 car
    folder = _visdrone_folder(tmp_path, {"0001": rows})
    data = read_visdrone(folder / "images", folder / "annotations")
    assert data.protocol == "visdrone" and data.class_names == list(CLASS_NAMES) and data.category_ids[-1] == 10
    (record,) = data.records
    assert record.boxes.tolist() == [[10, 10, 30, 30], [40, 5, 70, 20]] and record.labels.tolist() == [3, 0]
    assert record.extra.shape == (5, 6) and record.extra[:, 5].tolist() == [4, 1, 0, 11, 4]
    assert data.report["ignored region (VisDrone class 0)"] == 1
    split = read_dataset({"format": "visdrone", "images": "images", "annotations": "annotations",
                          "split_quadrants": True}, folder, "data.train")
    assert len(split) == 4 and [r.crop for r in split.records][1] == (50, 0, 100, 40)
    assert split.records[0].boxes.tolist() == [[10, 10, 30, 30], [40, 5, 50, 20]]
    assert split.report["box truncated at a quadrant split line"] == 1
    # The quadrant loads as the crop of the file.
    from sparsedet.data import TransformedDataset

    image, target = TransformedDataset(split)[1]
    assert tuple(image.shape[-2:]) == (40, 50)


@pytest.mark.parametrize("row, message", [
    ("1,2,3,4,1,4,0\n", r"0001.txt:2: expected 8 comma-separated values"),
    ("1,2,3,x,1,4,0,0\n", r"0001.txt:2: field h: expected a number"),
    ("1,2,3,4,1,12,0,0\n", r"0001.txt:2: field category: expected 0..11"),
])
def test_malformed_lines_name_file_and_line(tmp_path, row, message):
    (tmp_path / "0001.txt").write_text("1,2,3,4,1,4,0,0\n" + row)
    with pytest.raises(ValueError, match=message):
        parse_visdrone_txt(tmp_path / "0001.txt")


def test_unknown_metric_name_is_a_clear_error(tmp_path):
    from sparsedet.engine.evaluate import resolve_metric

    folder = _visdrone_folder(tmp_path, {"0001": "10,10,20,20,1,4,0,0\n"})
    data = read_visdrone(folder / "images", folder / "annotations")
    assert resolve_metric("auto", data) == "visdrone" and resolve_metric("coco", data) == "coco"
    with pytest.raises(ValueError, match="test.metric: expected one of auto, coco, crowdhuman, visdrone, got 'mAP'"):
        resolve_metric("mAP", data)
    with pytest.raises(ValueError, match="test.metric: crowdhuman needs a data set in crowdhuman format"):
        resolve_metric("crowdhuman", data)


def test_others_as_background_boxes(tmp_path, single_thread):
    from sparsedet.models import build_model

    rows = "10,10,20,20,1,4,0,0\n50,40,30,30,1,11,0,0\n"
    folder = _visdrone_folder(tmp_path, {"0001": rows})
    assert read_visdrone(folder / "images", folder / "annotations").records[0].labels.tolist() == [3]
    kept = read_visdrone(folder / "images", folder / "annotations", others="background").records[0]
    assert kept.labels.tolist() == [3, 10] and kept.boxes[1].tolist() == [50, 40, 80, 70]
    with pytest.raises(ValueError, match="VisDrone others: expected one of drop, background"):
        read_visdrone(folder / "images", folder / "annotations", others="class")
    with pytest.raises(ValueError, match="data.train.others: expected one of drop, background, got 'class'"):
        read_dataset({"format": "visdrone", "images": "images", "annotations": "annotations", "others": "class"},
                     folder, "data.train")
    # A dense detector trains an "others" box as background: no anchor gets a class, no box loss.
    model = build_model({"model": {"name": "retinanet", "num_classes": 10, "backbone": {"depth": 18, "weights": None},
                                   "fpn": {"channels": 16}, "head": {"num_convs": 1}}})
    image = [torch.rand(3, 96, 128) * 255]
    only_others = [{"boxes": torch.tensor([[40.0, 30.0, 104.0, 94.0]]), "labels": torch.tensor([10])}]
    losses = model(image, only_others)
    assert losses["loss_box_reg"] == 0 and torch.isfinite(losses["loss_cls"])
    # Sparse R-CNN has no background boxes: a label 10 is refused, naming the field.
    sparse = build_model({"model": {"name": "sparse_rcnn", "num_classes": 10, "num_proposals": 4, "num_stages": 1,
                                    "hidden_dim": 32, "dim_feedforward": 32, "dim_dynamic": 8, "num_heads": 2,
                                    "backbone": {"depth": 18, "weights": None}, "fpn": {"channels": 32}}})
    with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\]\[0\] = 10 is outside \[0, 10\)"):
        sparse(image, only_others)
