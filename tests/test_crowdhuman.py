"""CrowdHuman: the .odgt reader and the official metrics (AP, mMR, recall, JI) on hand-computed cases."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from sparsedet.data import read_crowdhuman, read_dataset
from sparsedet.evaluation.crowdhuman import (CrowdHumanImage, average_precision_and_miss_rate, evaluate_crowdhuman,
                                             jaccard_index, match_image)


def _image(persons, ignores=(), dets=(), scores=(), size=(200, 200), name="img"):
    return CrowdHumanImage(name, size[0], size[1], np.array(persons, dtype=float).reshape(-1, 4),
                           np.array(ignores, dtype=float).reshape(-1, 4), np.array(dets, dtype=float).reshape(-1, 4),
                           np.array(scores, dtype=float))


# Two people, an ignore region (a crowd), four detections: an exact hit, one inside the crowd, a
# false positive and a close hit.
P1, P2, CROWD = [10, 10, 50, 90], [60, 10, 100, 90], [120, 10, 190, 90]
MIXED = _image([P1, P2], [CROWD], [P1, [125, 20, 185, 80], [0, 150, 30, 190], [62, 12, 100, 90]], [0.9, 0.8, 0.7, 0.6])


def test_matching_ignore_region_swallows_detection():
    # TP (0.9), swallowed (0.8) left out, FP (0.7), TP (0.6).
    assert match_image(MIXED) == [(0.9, 1), (0.7, 0), (0.6, 1)]


def test_ap_mmr_recall_by_hand():
    result = evaluate_crowdhuman([MIXED])
    # recall .5 .5 1, precision 1 .5 2/3; trapezoids from the first point: 0 + .5 * (.5 + 2/3) / 2
    assert result.stats["AP"] == pytest.approx(0.5 * (0.5 + 2 / 3) / 2)
    # FPPI 0, 1, 1 on one image: every reference 0.01..1 first reached at the second point, miss rate .5.
    assert result.stats["mMR"] == pytest.approx(0.5)
    assert result.stats["Recall"] == pytest.approx(1.0)
    # JI at score threshold 0: k = 2 matches, m = 2 people, n = 4 - 1 (in the crowd) = 3 -> 2 / 3;
    # higher thresholds give 1/3, 1/2, 1/2, 0.
    assert result.stats["JI"] == pytest.approx(2 / 3, abs=1e-5)
    assert jaccard_index([MIXED])[1] == 0.0
    assert result.per_class == {"person": result.stats["AP"]}
    assert "mMR" in result.table() and "CrowdHuman" in result.table()


def test_crowded_overlap_is_one_to_one():
    # Two overlapping people (IoU 1/3); the first detection sits between them (IoU .6 with both)
    # and takes the first; the second is exactly the first person, already taken: a false positive.
    image = _image([[0, 0, 40, 100], [20, 0, 60, 100]], [], [[10, 0, 50, 100], [0, 0, 40, 100]], [0.9, 0.8])
    assert match_image(image) == [(0.9, 1), (0.8, 0)]
    ap, mmr, recall = average_precision_and_miss_rate(match_image(image), num_persons=2, num_images=1)
    assert ap == 0.0            # recall does not grow after the first point: zero trapezoid area
    assert mmr == pytest.approx(0.5) and recall == pytest.approx(0.5)
    # JI: the bipartite matching finds both pairs with IoU > .5? only (det0, p0), (det0, p1), (det1, p0):
    # maximum matching det0-p1, det1-p0 -> k = 2, m = n = 2 -> JI 1.
    assert jaccard_index([image])[0] == pytest.approx(1.0, abs=1e-5)


def test_person_beats_ignore_region_and_region_takes_many():
    # A detection on a person that also lies in a crowd region is a TP; two others inside the
    # region are both swallowed; one overlapping a person at IoU .4 but inside the region too.
    person, region = [20, 20, 60, 100], [0, 0, 200, 200]
    image = _image([person], [region], [person, [100, 100, 150, 150], [120, 120, 160, 160], [20, 20, 60, 52]],
                   [0.9, 0.8, 0.7, 0.6])
    assert match_image(image) == [(0.9, 1)]


def test_no_detections_and_all_false_positives():
    empty = evaluate_crowdhuman([_image([P1, P2])])
    assert empty.stats == {"AP": 0.0, "mMR": 1.0, "Recall": 0.0, "JI": 0.0}
    wrong = evaluate_crowdhuman([_image([P1], [], [[150, 150, 190, 190], [100, 0, 140, 40]], [0.9, 0.5])])
    assert wrong.stats["AP"] == 0.0 and wrong.stats["Recall"] == 0.0 and wrong.stats["mMR"] == 1.0
    assert wrong.stats["JI"] == 0.0


def test_mmr_two_images_by_hand():
    # Image A: TP .9, FP .8; image B: FP .7, TP .6; 2 people, 2 images.
    a = _image([P1], [], [P1, [150, 150, 190, 190]], [0.9, 0.8])
    b = _image([P2], [], [[150, 150, 190, 190], P2], [0.7, 0.6])
    result = evaluate_crowdhuman([a, b])
    # ranked: TP, FP, FP, TP -> FPPI 0, .5, 1, 1 ; miss rate .5, .5, .5, 0
    # references < .5 and the .5623/1.0 ones: .01...3162 -> index 1 (.5); .5623 -> index 2 (.5); 1.0 -> index 2 (.5)
    assert result.stats["mMR"] == pytest.approx(0.5)
    # recall .5 .5 .5 1, precision 1 .5 1/3 .5: area = .5 * (1/3 + .5) / 2
    assert result.stats["AP"] == pytest.approx(0.5 * (1 / 3 + 0.5) / 2)


def test_detections_are_clipped_to_the_image():
    # A detection hanging out of the image matches after clipping (official clip_boundary).
    image = _image([[150, 150, 200, 200]], [], [[150, 150, 260, 260]], [0.9])
    assert match_image(image) == [(0.9, 1)]


def _write_odgt(path, lines):
    path.write_text("\n".join(json.dumps(line) if not isinstance(line, str) else line for line in lines) + "\n")


def test_odgt_reader_every_field_case(tmp_path):
    (tmp_path / "images").mkdir()
    entry = lambda tag, box, **kw: {"tag": tag, "fbox": box, "vbox": [b + 1 for b in box[:2]] + [5, 5],
                                    "hbox": box[:2] + [4, 4], **kw}
    _write_odgt(tmp_path / "a.odgt", [
        {"ID": "one", "width": 100, "height": 80, "gtboxes": [
            entry("person", [10, 10, 20, 30], extra={"ignore": 0}),             # person
            entry("mask", [50, 10, 30, 30], extra={"ignore": 1}),               # crowd: ignore
            entry("person", [40, 40, 10, 10], extra={"ignore": 1}),             # flagged: ignore
            entry("person", [-10, 50, 30, 50], extra={}, head_attr={"ignore": 1}),  # clipped, head outside
            entry("person", [60, 50, 20, 20], extra={"ignore": 0}, head_attr={"ignore": 1}),  # head ignored only
        ]},
        "",
        {"ID": "two", "width": 50, "height": 50, "gtboxes": []},
    ])
    data = read_crowdhuman(tmp_path / "a.odgt", tmp_path / "images", check_images="none")
    assert data.protocol == "crowdhuman" and data.class_names == ["person"] and data.category_ids == [1]
    one, two = data.records
    assert one.image_path.name == "one.jpg" and (one.height, one.width) == (80, 100)
    assert one.boxes.tolist() == [[10, 10, 30, 40], [0, 50, 20, 80], [60, 50, 80, 70]]
    assert one.labels.tolist() == [0, 0, 0]
    assert one.ignore_boxes.tolist() == [[50, 10, 80, 40], [40, 40, 50, 50]]
    assert len(two.boxes) == 0 and len(two.ignore_boxes) == 0
    assert data.report["box clipped"] == 1
    visible = read_crowdhuman(tmp_path / "a.odgt", tmp_path / "images", box_kind="visible", check_images="none")
    assert visible.records[0].boxes[0].tolist() == [11, 11, 16, 16]
    heads = read_crowdhuman(tmp_path / "a.odgt", tmp_path / "images", box_kind="hbox", check_images="none")
    assert heads.records[0].boxes.tolist() == [[10, 10, 14, 14]]
    # mask, flagged and head_attr-flagged heads are ignore regions; the fourth lies outside: dropped.
    assert heads.records[0].ignore_boxes.tolist()[-1] == [60, 50, 64, 54]
    assert len(heads.records[0].ignore_boxes) == 3 and heads.report["box dropped: outside the image"] == 1
    # Through the config dispatcher, with the same keys a config would give.
    section = {"format": "crowdhuman", "annotations": "a.odgt", "images": "images", "check_images": "none",
               "box_kind": "full"}
    assert len(read_dataset(section, tmp_path, "data.val")) == 2


@pytest.mark.parametrize("line, message", [
    ('{"ID": "x", "gtboxes": [', "a.odgt:2: not a JSON object"),
    ('{"gtboxes": []}', "a.odgt:2: field 'ID'"),
    ('{"ID": "x"}', "a.odgt:2: field 'gtboxes'"),
    ('{"ID": "x", "gtboxes": [{"tag": "person", "vbox": [1, 2, 3, 4]}]}', "a.odgt:2: gtboxes[0].fbox: missing"),
    ('{"ID": "x", "gtboxes": [{"tag": "person", "fbox": [1, 2, 3]}]}', "a.odgt:2: gtboxes[0].fbox: expected"),
])
def test_malformed_odgt_names_file_and_line(tmp_path, line, message):
    (tmp_path / "a.odgt").write_text('{"ID": "ok", "width": 10, "height": 10, "gtboxes": []}\n' + line + "\n")
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_crowdhuman(tmp_path / "a.odgt", tmp_path, check_images="none")


def test_unknown_box_kind_is_a_clear_error(tmp_path):
    (tmp_path / "a.odgt").write_text('{"ID": "ok", "width": 10, "height": 10, "gtboxes": []}\n')
    with pytest.raises(ValueError, match="box_kind: expected one of full, visible, head"):
        read_crowdhuman(tmp_path / "a.odgt", tmp_path, box_kind="body", check_images="none")
    with pytest.raises(ValueError, match="data.val.box_kind: expected one of full, visible, head"):
        read_dataset({"format": "crowdhuman", "annotations": "a.odgt", "images": ".", "box_kind": "body"},
                     tmp_path, "data.val")
    with pytest.raises(ValueError, match="data.val.colour: unknown key"):
        read_dataset({"format": "crowdhuman", "annotations": "a.odgt", "images": ".", "colour": 1}, tmp_path, "data.val")


def test_results_odgt_written(tmp_path):
    evaluate_crowdhuman([MIXED], results_path=tmp_path / "results.odgt")
    line = json.loads((tmp_path / "results.odgt").read_text().splitlines()[0])
    assert line["ID"] == "img" and len(line["dtboxes"]) == 4
    assert line["dtboxes"][0] == {"box": [10.0, 10.0, 40.0, 80.0], "score": 0.9, "tag": 1}


def test_records_and_predictions_glue():
    from sparsedet.data import DetectionRecord
    from sparsedet.evaluation.crowdhuman import crowdhuman_images

    record = DetectionRecord(__import__("pathlib").Path("x/a.jpg"), 7, 200, 200, torch.tensor([P1], dtype=torch.float32),
                             torch.zeros(1, dtype=torch.int64), torch.tensor([CROWD], dtype=torch.float32),
                             torch.zeros(1, dtype=torch.int64))
    images = crowdhuman_images([record], {7: {"boxes": torch.tensor([P1]), "scores": torch.tensor([0.5]),
                                              "labels": torch.tensor([0])}})
    assert images[0].name == "a" and match_image(images[0]) == [(0.5, 1)]
    assert not math.isnan(evaluate_crowdhuman(images).stats["mMR"])
