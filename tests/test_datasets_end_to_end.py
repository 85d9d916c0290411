"""CrowdHuman- and VisDrone-format sets made from the tiny_coco images: a few training steps and
`sparsedet eval` through the CLI report the data sets' own metrics and write their results files."""
from __future__ import annotations

import json

import pytest

from sparsedet.cli import main
from sparsedet.data.export import COCO_TO_VISDRONE, coco_to_odgt, coco_to_visdrone

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL_INPUT = ["input.min_size_train=[128]", "input.max_size_train=192", "input.min_size_test=128",
               "input.max_size_test=192", "data.num_workers=0"]
FEW_STEPS = ["solver.images_per_batch=2", "solver.max_iter=2", "solver.steps=[1]", "solver.warmup_iters=1",
             "solver.eval_period=2", "solver.checkpoint_period=0", "solver.log_period=1"]


def test_crowdhuman_train_and_eval(tmp_path, shared_data, capsys):
    coco = shared_data / "tiny_coco"
    coco_to_odgt(coco / "annotations/instances_train2017.json", tmp_path / "train.odgt")
    coco_to_odgt(coco / "annotations/instances_val2017.json", tmp_path / "val.odgt")
    overrides = [f"data.train.annotations={tmp_path / 'train.odgt'}", f"data.train.images={coco / 'train2017'}",
                 f"data.val.annotations={tmp_path / 'val.odgt'}", f"data.val.images={coco / 'val2017'}",
                 "data.train.format=crowdhuman", "data.val.format=crowdhuman", "data.root=null",
                 "model.num_proposals=20", "model.num_stages=2", *SMALL_INPUT, *FEW_STEPS]
    out = tmp_path / "run"
    assert main(["train", "sparse_rcnn/mobilenetv2_fpn_cpu", "--output", str(out), "--no-progress", *overrides]) == 0
    # The trainer's periodic evaluation used the CrowdHuman metrics and wrote the .odgt results.
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert evals and {"AP", "mMR", "Recall", "JI"} <= set(evals[-1])
    assert (out / "eval" / "results_0000002.odgt").is_file()
    capsys.readouterr()
    assert main(["eval", str(out / "last.pth"), "--output", str(tmp_path / "eval")]) == 0
    printed = capsys.readouterr().out
    assert "CrowdHuman metrics" in printed and "mMR" in printed and "person" in printed
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["protocol"] == "crowdhuman" and 0 <= metrics["stats"]["mMR"] <= 1
    lines = (tmp_path / "eval" / "results.odgt").read_text().splitlines()
    assert len(lines) == 50 and "dtboxes" in json.loads(lines[0])


def test_visdrone_quadrants_train_and_eval(tmp_path, shared_data, capsys):
    coco = shared_data / "tiny_coco"
    coco_to_visdrone(coco / "annotations/instances_train2017.json", tmp_path / "train_ann", COCO_TO_VISDRONE)
    coco_to_visdrone(coco / "annotations/instances_val2017.json", tmp_path / "val_ann", COCO_TO_VISDRONE)
    overrides = [f"data.train.annotations={tmp_path / 'train_ann'}", f"data.train.images={coco / 'train2017'}",
                 f"data.val.annotations={tmp_path / 'val_ann'}", f"data.val.images={coco / 'val2017'}",
                 "data.train.split_quadrants=true", "data.root=null", *SMALL_INPUT, *FEW_STEPS]
    out = tmp_path / "run"
    assert main(["train", "retinanet/r50_fpn_visdrone", "--output", str(out), "--no-progress",
                 "model.backbone.name=mobilenet_v2", "model.backbone.weights=imagenet", "model.backbone.freeze_at=5",
                 "model.fpn.channels=32", "model.head.num_convs=1", "solver.amp=false", *overrides]) == 0
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert evals and {"AP", "AP50", "AP75", "AR1", "AR500"} <= set(evals[-1])
    assert len(list((out / "eval" / "results_0000002").glob("*.txt"))) == 50
    capsys.readouterr()
    assert main(["eval", str(out / "last.pth"), "--output", str(tmp_path / "eval"),
                 "test.visdrone_class_weighting=uniform"]) == 0
    printed = capsys.readouterr().out
    assert "VisDrone-DET toolkit metrics" in printed and "AR500" in printed and "pedestrian" in printed
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["protocol"] == "visdrone" and set(metrics["per_class"]) >= {"pedestrian", "car", "motor"}
    assert len(list((tmp_path / "eval" / "results").glob("*.txt"))) == 50
    assert main(["eval", str(out / "last.pth"), "--output", str(tmp_path / "eval2"), "test.metric=mAP"]) == 1
    assert "test.metric: expected one of auto, coco, crowdhuman, visdrone, got 'mAP'" in capsys.readouterr().err
