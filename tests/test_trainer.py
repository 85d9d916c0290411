"""The trainer: exact resume, NaN guard, clean stop, distributed = single process, CLI end to end.

All runs use a tiny Sparse R-CNN (ResNet-18, d=64, 8 proposals, 2 stages) on a small generated
COCO folder (12 images of 96x128), so each training run takes a few seconds.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sparsedet.cli import main
from sparsedet.config import load_config
from sparsedet.data.synthetic import write_synthetic_coco
from sparsedet.engine.trainer import Trainer
from sparsedet.models.sparse_rcnn import SparseRCNN

from conftest import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_synthetic_coco(tmp_path_factory.mktemp("data"), num_train=8, num_val=4, seed=0, height=96, width=128)


def tiny_overrides(data, **solver) -> list[str]:
    values = {"images_per_batch": 4, "max_iter": 6, "steps": [4], "warmup_iters": 2, "base_lr": 1e-3,
              "eval_period": 0, "checkpoint_period": 0, "log_period": 1, "seed": 3, **solver}
    return TINY_OVERRIDES + [
        f"data.train.annotations={data['train']['annotations']}", f"data.train.images={data['train']['images']}",
        f"data.val.annotations={data['val']['annotations']}", f"data.val.images={data['val']['images']}",
        "data.num_workers=0", "input.min_size_train=[64, 80, 96]", "input.max_size_train=128",
        "input.min_size_test=96", "input.max_size_test=128",
    ] + [f"solver.{k}={json.dumps(v)}" for k, v in values.items()]


def tiny_config(data, **solver) -> dict:
    return load_config("sparse_rcnn/r50_fpn_100pro_3x", tiny_overrides(data, **solver))


def train_losses(output: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r["total_loss"] for r in lines if r["type"] == "train"}


def test_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_data, single_thread):
    Trainer(tiny_config(tiny_data), tmp_path / "straight", progress=False).train()
    Trainer(tiny_config(tiny_data, max_iter=3), tmp_path / "resumed", progress=False).train()
    first_part = torch.load(tmp_path / "resumed" / "last.pth", weights_only=True)
    assert first_part["iteration"] == 3
    Trainer(tiny_config(tiny_data), tmp_path / "resumed", resume=True, progress=False).train()

    straight, resumed = train_losses(tmp_path / "straight"), train_losses(tmp_path / "resumed")
    assert sorted(resumed) == sorted(straight) == [1, 2, 3, 4, 5, 6]
    for iteration in (4, 5, 6):  # the steps after the resume: bit-identical
        assert resumed[iteration] == straight[iteration], (iteration, resumed, straight)
    a = torch.load(tmp_path / "straight" / "last.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / "last.pth", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_record_classes_and_load_for_inference(tmp_path, tiny_data, single_thread):
    import sparsedet

    result = Trainer(tiny_config(tiny_data, max_iter=2), tmp_path, progress=False).train()
    assert set(result.stats) >= {"AP", "AP50", "APs", "AR100"}
    saved = torch.load(tmp_path / "last.pth", weights_only=True)
    names = saved["config"]["data"]["class_names"]
    assert saved["config"]["model"]["num_classes"] == len(names) > 1
    assert (tmp_path / "best.pth").is_file() and (tmp_path / "config.yaml").is_file()
    model = sparsedet.load(tmp_path / "last.pth")
    assert model.num_classes == len(names) and not model.training


def _nan_after(monkeypatch, bad_calls: set[int]):
    """Makes SparseRCNN's training forward return NaN losses on the given (0-based) calls."""
    original = SparseRCNN.forward
    calls = {"n": 0}

    def forward(self, images, targets=None, original_sizes=None):
        out = original(self, images, targets, original_sizes)
        if self.training:
            if calls["n"] in bad_calls:
                out = {k: v * float("nan") for k, v in out.items()}
            calls["n"] += 1
        return out

    monkeypatch.setattr(SparseRCNN, "forward", forward)


def test_nan_loss_step_is_skipped_and_training_goes_on(tmp_path, tiny_data, monkeypatch, single_thread, caplog):
    _nan_after(monkeypatch, {1})
    trainer = Trainer(tiny_config(tiny_data, max_iter=3), tmp_path, progress=False)
    before_skip = {}

    original_step = trainer._step

    def step(batches, accumulate):
        if trainer.iteration == 1:
            before_skip.update({k: v.clone() for k, v in trainer.model.state_dict().items()})
        losses, finite = original_step(batches, accumulate)
        if trainer.iteration == 1:
            assert not finite
            after = trainer.model.state_dict()
            assert all(torch.equal(before_skip[k], after[k]) for k in after), "a skipped step changed weights"
        return losses, finite

    trainer._step = step
    with caplog.at_level("WARNING", logger="sparsedet"):
        trainer.train()
    assert any("non-finite loss" in r.message and "skipped" in r.message for r in caplog.records)
    assert sorted(train_losses(tmp_path)) == [1, 3]  # iteration 2 skipped, not logged
    assert torch.load(tmp_path / "last.pth", weights_only=True)["iteration"] == 3


def test_repeated_nan_loss_stops_with_a_clear_message(tmp_path, tiny_data, monkeypatch, single_thread):
    _nan_after(monkeypatch, set(range(100)))
    trainer = Trainer(tiny_config(tiny_data, max_iter=10, max_nonfinite_steps=3), tmp_path, progress=False)
    with pytest.raises(FloatingPointError, match=r"3 consecutive iterations.*solver.base_lr"):
        trainer.train()


def test_stop_request_saves_and_resume_continues(tmp_path, tiny_data, single_thread):
    trainer = Trainer(tiny_config(tiny_data), tmp_path, progress=False)
    original_step = trainer._step

    def step(batches, accumulate):
        out = original_step(batches, accumulate)
        if trainer.iteration == 1:  # about to become 2: as if Ctrl-C arrived during this step
            trainer._request_stop(None, None)
        return out

    trainer._step = step
    trainer.train()
    assert trainer.stopped_early and trainer.iteration == 2
    assert torch.load(tmp_path / "last.pth", weights_only=True)["iteration"] == 2
    Trainer(tiny_config(tiny_data), tmp_path, resume=True, progress=False).train()
    assert torch.load(tmp_path / "last.pth", weights_only=True)["iteration"] == 6
    assert sorted(train_losses(tmp_path)) == [1, 2, 3, 4, 5, 6]


def test_bad_configs_are_clear_errors(tmp_path, tiny_data):
    with pytest.raises(ValueError, match="images_per_batch.*divisible"):
        Trainer(tiny_config(tiny_data, images_per_batch=3, accumulate_steps=2), tmp_path)
    config = tiny_config(tiny_data)
    del config["data"]["train"]
    with pytest.raises(ValueError, match="data.train"):
        Trainer(config, tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(tiny_config(tiny_data), tmp_path / "empty", resume=True)
    config = tiny_config(tiny_data)
    config["model"]["num_proposal"] = 5
    config["data"]["train"]["annotations"] = str(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="model.num_proposal .*did you mean model.num_proposals"):
        Trainer(config, tmp_path)  # the model typo is reported before the data is read


def test_gradient_accumulation_matches_the_full_batch_first_step(tmp_path, tiny_data, single_thread):
    """Two micro-batches of 2 give the first-step loss of one batch of 4 (same images)."""
    full = Trainer(tiny_config(tiny_data, max_iter=1), tmp_path / "full", progress=False)
    full.train()
    accumulated = Trainer(tiny_config(tiny_data, max_iter=1, accumulate_steps=2), tmp_path / "acc", progress=False)
    accumulated.train()
    # Per-micro-batch box normalisation differs from the full batch's, so compare loosely.
    assert train_losses(tmp_path / "acc")[1] == pytest.approx(train_losses(tmp_path / "full")[1], rel=0.2)


def _write_config(path: Path, data, **solver) -> Path:
    config = tiny_config(data, **solver)
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo")
def test_torchrun_two_processes_equal_one_process(tmp_path, tiny_data, single_thread):
    """2 processes x 2 images (gloo) log the same averaged losses as 1 process x 4 images.

    One training scale, so that every batch is padded to the same size whatever its split (padding
    changes features at the border: the stem's max-pool pads with -inf, the batch with zeros). The
    one-process run is the same CLI command run in this process (no second interpreter start-up)."""
    config = _write_config(tmp_path / "tiny.yaml", tiny_data, max_iter=3)
    cfg = yaml.safe_load(config.read_text())
    cfg["input"]["min_size_train"] = [96]
    config.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    common = ["train", str(config), "--no-progress", "--device", "cpu"]
    assert main([*common, "--output", str(tmp_path / "one")]) == 0
    multi = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29533", "-m", "sparsedet",
                            *common, "--output", str(tmp_path / "two")],
                           env=env, capture_output=True, text=True, timeout=300)
    assert multi.returncode == 0, multi.stderr[-3000:]
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for iteration in one:
        assert two[iteration] == pytest.approx(one[iteration], rel=1e-4, abs=1e-5), (one, two)
    # Evaluation ran sharded over both processes and saw every val image.
    results = json.loads(next((tmp_path / "two" / "eval").glob("results_*.json")).read_text())
    assert {r["image_id"] for r in results} == {
        img["id"] for img in json.loads(Path(tiny_data["val"]["annotations"]).read_text())["images"]}


def test_cli_train_eval_predict_end_to_end(tmp_path, tiny_data, single_thread, capsys):
    config = _write_config(tmp_path / "tiny.yaml", tiny_data, max_iter=2)
    out = tmp_path / "run"
    assert main(["train", str(config), "--output", str(out), "--no-progress", "solver.max_iter=2"]) == 0
    assert (out / "last.pth").is_file() and (out / "metrics.jsonl").is_file() and (out / "train.log").is_file()
    # Overrides may follow options, `--resume KEY=VALUE` included: training continues to 3 steps.
    assert main(["train", str(config), "--output", str(out), "--resume", "solver.max_iter=3", "--no-progress"]) == 0
    assert torch.load(out / "last.pth", weights_only=True)["iteration"] == 3
    assert main(["eval", str(out / "last.pth"), "--output", str(tmp_path / "eval")]) == 0
    printed = capsys.readouterr().out
    assert "AP" in printed and (tmp_path / "eval" / "results.json").is_file()
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert 0.0 <= metrics["stats"]["AP"] <= 1.0
    images = Path(tiny_data["val"]["images"])
    assert main(["predict", str(out / "last.pth"), str(images), "--output", str(tmp_path / "pred"),
                 "--score-threshold", "0.0"]) == 0
    pngs = sorted((tmp_path / "pred").glob("*.png"))
    assert len(pngs) == len(list(images.glob("*.png")))
    results = json.loads((tmp_path / "pred" / "results.json").read_text())
    assert results and {"file_name", "bbox", "score", "category_name"} <= set(results[0])


def test_cli_errors_name_the_problem(tmp_path, capsys):
    assert main(["train", "sparse_rcnn/no_such_config"]) == 1
    assert "no_such_config" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "missing.pth"), str(tmp_path / "nothing*.jpg")]) == 1
    assert "missing.pth" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "sparse_rcnn/r50_fpn_100pro_3x", "not-an-override"])
    with pytest.raises(SystemExit):
        main(["configs", "model.num_classes=3"])
