"""Issue 9, one test per defect: a diverging model takes the non-finite-step path instead of
crashing in RoIAlign, last.pth never holds the weights of a non-finite streak, config typos and
wrong types are errors when the config is read, checkpoint errors are one true line, and the
smaller cases (stale temporaries, file modes, the data report, truncated images, format switch,
model.name message, best.pth listing)."""
from __future__ import annotations

import errno
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sparsedet
from sparsedet import checkpoint as ckpt
from sparsedet.cli import main
from sparsedet.config import ConfigError, load_config
from sparsedet.data import read_dataset
from sparsedet.data.synthetic import write_synthetic_coco
from sparsedet.engine.trainer import Trainer
from sparsedet.errors import InvalidInputError, UserError
from sparsedet.layers import MultiLevelRoIAlign
from sparsedet.layers.pooler import GuardedMultiScaleRoIAlign
from sparsedet.models.build import model_config
from sparsedet.models.sparse_rcnn import SparseRCNN

from conftest import TINY_OVERRIDES

BASE = "sparse_rcnn/r50_fpn_100pro_3x"
BAD_BOXES = [float("nan"), float("inf"), -float("inf"), 1e30]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_synthetic_coco(tmp_path_factory.mktemp("data"), num_train=8, num_val=4, seed=0, height=96, width=128)


def tiny_config(data, val=True, **solver) -> dict:
    values = {"images_per_batch": 4, "max_iter": 4, "warmup_iters": 0, "base_lr": 1e-3, "log_period": 1, "seed": 3,
              **solver}
    overrides = TINY_OVERRIDES + [
        "model.backbone.weights=null",
        f"data.train.annotations={data['train']['annotations']}", f"data.train.images={data['train']['images']}",
        "data.num_workers=0", "input.min_size_train=[64, 80]", "input.max_size_train=128",
        "input.min_size_test=96", "input.max_size_test=128",
    ] + [f"solver.{k}={json.dumps(v)}" for k, v in values.items()]
    overrides += ([f"data.val.annotations={data['val']['annotations']}", f"data.val.images={data['val']['images']}"]
                  if val else ["data.val=null"])
    return load_config(BASE, overrides)


# ---------------------------------------------------------------- 1. non-finite boxes never reach roi_align

@pytest.mark.parametrize("bad", BAD_BOXES)
def test_poolers_turn_diverged_boxes_into_floating_point_errors(bad):
    features = [torch.randn(1, 4, 16, 16), torch.randn(1, 4, 8, 8)]
    boxes = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, bad, 10.0]])]
    with pytest.raises(FloatingPointError, match="RoIAlign"):  # torchvision's kernel segfaults on NaN
        MultiLevelRoIAlign((2, 3), 7, 2)(features, boxes)
    pool = GuardedMultiScaleRoIAlign(["p2", "p3"], 7, 2)
    with pytest.raises(FloatingPointError, match="RoIAlign"):
        pool({"p2": features[0], "p3": features[1]}, boxes, [(64, 64)])


def test_poolers_refuse_non_finite_features_and_pass_finite_inputs():
    features = [torch.randn(1, 4, 16, 16), torch.randn(1, 4, 8, 8)]
    boxes = [torch.tensor([[0.0, 0.0, 10.0, 10.0]])]
    assert MultiLevelRoIAlign((2, 3), 7, 2)(features, boxes).shape == (1, 4, 7, 7)
    features[1][0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="features"):
        MultiLevelRoIAlign((2, 3), 7, 2)(features, boxes)  # training mode, as in the trainer
    assert MultiLevelRoIAlign((2, 3), 7, 2).eval()(features, boxes).shape == (1, 4, 7, 7)  # boxes only


def test_faster_rcnn_pools_through_the_guard():
    model = sparsedet.build_model("faster_rcnn/mobilenetv2_fpn_cpu", ["model.backbone.weights=null"])
    assert isinstance(model.roi_heads.box_roi_pool, GuardedMultiScaleRoIAlign)


def test_diverging_sparse_rcnn_is_skipped_counted_and_stopped(tmp_path, tiny_data, single_thread):
    """The issue's case: a huge lr, no warm-up. Step 1 is finite and throws the weights far away; the
    next steps' boxes are absurd and must be the trainer's skip path, not a crash."""
    config = tiny_config(tiny_data, val=False, base_lr=1e6, max_iter=8, max_nonfinite_steps=2, checkpoint_period=1)
    trainer = Trainer(config, tmp_path, progress=False)
    with pytest.raises(FloatingPointError, match=r"2 consecutive iterations.*last.pth holds iteration (\d+)") as info:
        trainer.train()
    held = int(str(info.value).split("last.pth holds iteration ")[1].split(",")[0])
    assert torch.load(tmp_path / "last.pth", weights_only=True)["iteration"] == held == trainer.saved_iteration


# ---------------------------------------------------------------- 2. last.pth keeps the last finite state

def _nan_on_calls(monkeypatch, bad_calls):
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


def test_no_checkpoint_or_evaluation_during_a_nonfinite_streak(tmp_path, tiny_data, monkeypatch, single_thread):
    _nan_on_calls(monkeypatch, {2, 3})  # iterations 3 and 4 are non-finite, 5 recovers
    trainer = Trainer(tiny_config(tiny_data, val=False, max_iter=5, checkpoint_period=1), tmp_path, progress=False)
    saved = []
    original = trainer.save_checkpoint
    trainer.save_checkpoint = lambda name="last.pth": saved.append((name, trainer.iteration)) or original(name)
    trainer.train()
    assert saved == [("last.pth", 1), ("last.pth", 2), ("last.pth", 5)]


def test_stop_message_names_the_iteration_last_pth_holds(tmp_path, tiny_data, monkeypatch, single_thread):
    _nan_on_calls(monkeypatch, set(range(2, 100)))
    trainer = Trainer(tiny_config(tiny_data, val=False, max_iter=9, checkpoint_period=1, max_nonfinite_steps=3),
                      tmp_path, progress=False)
    with pytest.raises(FloatingPointError, match="last.pth holds iteration 2, the last finite state"):
        trainer.train()
    state = torch.load(tmp_path / "last.pth", weights_only=True)
    assert state["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


# ---------------------------------------------------------------- 4./5. configs checked when read

@pytest.mark.parametrize("override, message", [
    ("slover.base_lr=0.5", r"unknown config key slover \(did you mean solver\?\)"),
    ("solver.base_lrr=0.5", r"unknown config key solver.base_lrr \(did you mean solver.base_lr"),
    ("input.min_size_trian=5", r"unknown config key input.min_size_trian \(did you mean input.min_size_train"),
    ("test.image_per_batch=2", r"did you mean test.images_per_batch"),
    ("data.trian.format=coco", r"did you mean data.train\?"),
    ("data.val.annotation=x.json", r"data.val.annotation.*did you mean data.val.annotations"),
    ("input.crop.enable=true", r"did you mean input.crop.enabled"),
    ("solver.max_iter=abc", r"solver.max_iter: expected an integer, got 'abc'"),
    ("solver.base_lr=abc", r"solver.base_lr: expected a finite number, got 'abc'"),
    ("solver.base_lr=0", r"solver.base_lr: expected a finite number > 0, got 0"),
    ("solver.amp=maybe", r"solver.amp: expected true or false"),
    ("input.horizontal_flip=2", r"input.horizontal_flip: .* in \[0, 1\], got 2"),
    ("input.min_size_train=[320, -1]", r"input.min_size_train: .* positive"),
    ("solver.param_groups=[{match: x, lr: 1, optimizer: adam}]", r"param_groups\[0\].optimizer: expected one of adamw, sgd"),
])
def test_config_mistakes_outside_model_fail_when_read(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(BASE, [override])


@pytest.mark.parametrize("override, message", [
    ("model.num_proposals=abc", r"model.num_proposals: expected an integer, got 'abc'"),
    ("model.num_proposals=-5", r"model.num_proposals: expected an integer >= 1, got -5"),
    ("model.loss.use_focal=3", r"model.loss.use_focal: expected true or false"),
    ("model.box_weights=abc", r"model.box_weights: expected a list"),
])
def test_model_types_and_ranges_fail_before_any_data_or_weights(override, message):
    with pytest.raises(ConfigError, match=message):
        model_config(load_config(BASE, [override]))


def test_declared_keys_of_other_branches_and_unknown_models_are_accepted():
    config = load_config(BASE, ["solver.param_groups=[{match: backbone, optimizer: sgd, lr: 0.01, weight_decay: 0.0, "
                                "clip_grad_norm: 1.0}]", "solver.norm_weight_decay=0.0", "solver.norm_weight_decay=null"])
    assert config["solver"]["param_groups"][0]["lr"] == 0.01
    assert load_config({"model": {"name": "tsp_fcos", "anything": 1}})["model"]["anything"] == 1


def test_switching_a_data_set_format_by_override_drops_the_base_keys(tmp_path):
    overrides = ["data.train.images=imgs", "data.train.format=yolo", "data.train.labels=labels",
                 "data.train.classes=[a, b]"]
    config = load_config(BASE, overrides)
    assert config["data"]["train"] == {"format": "yolo", "images": "imgs", "labels": "labels", "classes": ["a", "b"]}
    same = load_config(BASE, ["data.train.format=coco", "data.train.images=x"])  # same format: keys stay
    assert same["data"]["train"]["annotations"].endswith("instances_train2017.json")


def test_config_without_model_name_names_the_config(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("solver: {base_lr: 0.1}\n")
    child = tmp_path / "child.yaml"
    child.write_text("_base_: base.yaml\ninput: {min_size_test: 100}\n")
    with pytest.raises(ConfigError, match=r"config .*child.yaml has no model.name \(no model section") as info:
        sparsedet.build_model(child)
    assert "<dict>" not in str(info.value)


# ---------------------------------------------------------------- 6./7. checkpoints

def test_wrong_shapes_are_one_line_naming_the_tensors(tmp_path):
    small = sparsedet.build_model(BASE, TINY_OVERRIDES + ["model.backbone.weights=null"])
    path = tmp_path / "five.pth"
    torch.save({"model": small.state_dict(), "config": small.config}, path)
    with pytest.raises(InvalidInputError, match=r"do not fit.*class_logits.weight \(5, 64\) in the file, \(3, 64\)") as info:
        sparsedet.load(path, overrides=["model.num_classes=3"])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("content", [b"", os.urandom(2048), b"PK\x03\x04garbage"])
def test_unreadable_weights_never_suggest_weights_only_false(tmp_path, content):
    path = tmp_path / "w.pth"
    path.write_bytes(content)
    with pytest.raises(InvalidInputError, match="not a weights file sparsedet can read safely") as info:
        ckpt.read_weights_file(path)
    assert "weights_only" not in str(info.value) and "\n" not in str(info.value)


class _FullDisk:
    """A file whose writes fail with ENOSPC after ``limit`` bytes, as on a full disk."""

    def __init__(self, file, limit=4096):
        self.file, self.limit, self.written = file, limit, 0

    def write(self, data):
        self.written += len(data)
        if self.written > self.limit:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    ckpt.save_atomic({"w": torch.ones(3)}, path)
    real_fdopen = os.fdopen
    monkeypatch.setattr(ckpt.os, "fdopen", lambda fd, mode: _FullDisk(real_fdopen(fd, mode)))
    with pytest.raises(UserError, match=rf"no space left on device writing {path}; the previous file is intact"):
        ckpt.save_atomic({"w": torch.zeros(100_000)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_respect_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        ckpt.save_atomic({"w": torch.ones(1)}, tmp_path / "a.pth")
        ckpt.atomic_write_text(tmp_path / "b.json", "{}")
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(previous)
    for name in ("a.pth", "b.json", "plain.txt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_stale_temporaries_of_this_run_are_removed_at_start(tmp_path, tiny_data):
    tmp_path.mkdir(exist_ok=True)
    stale = [tmp_path / ".last.pth.abc123.tmp", tmp_path / ".best.pth.x.tmp"]
    kept = [tmp_path / ".other.pth.abc.tmp", tmp_path / "notes.tmp"]
    for p in stale + kept:
        p.write_bytes(b"partial")
    Trainer(tiny_config(tiny_data, val=False), tmp_path, progress=False)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


def test_read_only_output_folder_fails_before_the_data_is_read(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert main(["train", BASE, "data.train.annotations=/nonexistent.json", "--output", str(folder / "run")]) == 1
    finally:
        folder.chmod(0o755)
    assert "cannot write to the output folder" in capsys.readouterr().err


# ---------------------------------------------------------------- 8. smaller

def test_run_without_val_does_not_list_best_pth(tmp_path, tiny_data, single_thread, capsys):
    import yaml

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tiny_data, val=False, max_iter=1)))
    assert main(["train", str(config), "--output", str(tmp_path / "run"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "last.pth" in out and "best.pth" not in out and not (tmp_path / "run" / "best.pth").exists()


def _truncated_jpeg(path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def test_truncated_images_are_found_up_front_and_left_out_of_evaluation(tmp_path, tiny_data):
    gt = json.loads(Path(tiny_data["val"]["annotations"]).read_text())
    images = tmp_path / "images"
    images.mkdir()
    for img in gt["images"]:
        (images / img["file_name"]).write_bytes((Path(tiny_data["val"]["images"]) / img["file_name"]).read_bytes())
    victim = gt["images"][0]
    _truncated_jpeg(images / victim["file_name"])
    dataset = read_dataset({"format": "coco", "annotations": tiny_data["val"]["annotations"], "images": str(images)},
                           None, "data.val")  # the default check_images: header
    assert victim["id"] not in [r.image_id for r in dataset.records]
    assert victim["id"] not in [i["id"] for i in dataset.coco_ground_truth()["images"]]
    assert victim["id"] not in {a["image_id"] for a in dataset.coco_ground_truth()["annotations"]}
    assert dataset.report["image skipped: cannot decode"] == 1


def test_the_data_report_is_logged_once_per_set(tmp_path, tiny_data, caplog):
    images = tmp_path / "images"
    images.mkdir()
    gt = json.loads(Path(tiny_data["train"]["annotations"]).read_text())
    for img in gt["images"]:
        (images / img["file_name"]).write_bytes((Path(tiny_data["train"]["images"]) / img["file_name"]).read_bytes())
    _truncated_jpeg(images / gt["images"][0]["file_name"])
    config = tiny_config(tiny_data, val=False)
    config["data"]["train"]["images"] = str(images)
    with caplog.at_level(logging.INFO, logger="sparsedet"):
        Trainer(config, tmp_path / "run", progress=False)
    summaries = [r for r in caplog.records if "image skipped: cannot decode: 1" in r.getMessage()]
    assert len(summaries) == 1, [r.getMessage() for r in caplog.records]


def test_a_folder_given_to_predict_lists_every_kind_of_image_a_single_file_may_be(tmp_path):
    """One rule for files and folders: a GIF that predicts alone is also found inside a folder."""
    from PIL import Image

    from sparsedet.cli import expand_image_inputs

    for name in ("a.gif", "b.png", "c.JPG"):
        Image.new("RGB", (8, 8)).save(tmp_path / name, format={"gif": "GIF", "png": "PNG", "JPG": "JPEG"}[name[2:]])
    (tmp_path / "notes.txt").write_text("not an image")
    assert [p.name for p in expand_image_inputs([str(tmp_path)])] == ["a.gif", "b.png", "c.JPG"]
    assert [p.name for p in expand_image_inputs([str(tmp_path / "*")])] == ["a.gif", "b.png", "c.JPG"]
