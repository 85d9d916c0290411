"""What a new user meets in the first hour (issue 10, and issue 9's bad image in ``predict``).

Fast start-up (no torch for ``--help``/``configs``), configs described, a run folder whose
``config.yaml`` works from anywhere, logs that hold the losses and evaluations, exit 130 on Ctrl-C,
``predict`` that reports, does not overwrite and survives a bad image, the CSQ figure's legend.
The demo's Ctrl-C and resume run as subprocesses in ``test_demo_interrupt.py``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from sparsedet.cli import main
from sparsedet.config import bundled_configs, load_config
from sparsedet.data.sources import with_absolute_paths
from sparsedet.data.synthetic import write_synthetic_coco
from sparsedet.engine.trainer import Trainer, default_num_workers
from sparsedet.models import build_model
from sparsedet.models.backbones.build import backbone_keys_in_use

from conftest import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_synthetic_coco(tmp_path_factory.mktemp("data"), num_train=8, num_val=4, seed=0, height=96, width=128)


def tiny_overrides(data, **solver) -> list[str]:
    values = {"images_per_batch": 4, "max_iter": 3, "steps": [2], "warmup_iters": 0, "base_lr": 1e-3,
              "eval_period": 0, "checkpoint_period": 0, "log_period": 1, "seed": 3, **solver}
    return TINY_OVERRIDES + [
        f"data.train.annotations={data['train']['annotations']}", f"data.train.images={data['train']['images']}",
        f"data.val.annotations={data['val']['annotations']}", f"data.val.images={data['val']['images']}",
        "data.num_workers=0", "input.min_size_train=[64, 80, 96]", "input.max_size_train=128",
        "input.min_size_test=96", "input.max_size_test=128",
    ] + [f"solver.{k}={json.dumps(v)}" for k, v in values.items()]


def write_tiny_config(path: Path, data, **solver) -> Path:
    path.write_text(yaml.safe_dump(load_config("sparse_rcnn/r50_fpn_100pro_3x", tiny_overrides(data, **solver))))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data):
    """A 1-step tiny Sparse R-CNN run folder (its last.pth predicts with random-ish scores)."""
    out = tmp_path_factory.mktemp("run")
    torch.set_num_threads(1)
    Trainer(load_config("sparse_rcnn/r50_fpn_100pro_3x", tiny_overrides(tiny_data, max_iter=1)), out,
            progress=False).train()
    return out


# ---------------------------------------------------------------- start-up and configs
def test_cli_help_version_and_configs_do_not_import_torch():
    code = ("import sys, contextlib, io\n"
            "import sparsedet.cli as cli\n"
            "assert 'torch' not in sys.modules, 'import sparsedet.cli'\n"
            "for argv in (['--help'], ['--version'], ['train', '--help'], ['predict', '--help']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        try:\n"
            "            cli.main(argv)\n"
            "        except SystemExit:\n"
            "            pass\n"
            "    assert 'torch' not in sys.modules, argv\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    assert cli.main(['configs']) == 0\n"
            "assert 'torch' not in sys.modules, 'configs'\n"
            "import sparsedet\n"
            "assert 'torch' not in sys.modules, 'import sparsedet'\n"
            "assert callable(sparsedet.load_config) and 'torch' not in sys.modules\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_convert_help_still_lists_the_converters(capsys):
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    assert "sparse_rcnn" in capsys.readouterr().out


def test_configs_prints_one_described_line_per_config_and_readme_lists_all(capsys):
    assert main(["configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = bundled_configs()
    assert len(lines) == len(names)
    for name, line in zip(names, lines):
        described = line[len(name):].strip()
        assert line.startswith(name) and len(described) > 10, line
        # taken from the file's first comment line
        first = (REPO / "src" / "sparsedet" / "configs" / f"{name}.yaml").read_text().splitlines()[0]
        assert described == first.lstrip("#").strip()
    readme = (REPO / "README.md").read_text()
    missing = [name for name in names if f"`{name}`" not in readme]
    assert not missing, f"README's config table misses {missing}: regenerate it with `sparsedet configs --markdown`"


# ---------------------------------------------------------------- the run folder
def test_saved_config_paths_are_absolute_and_work_from_another_folder(tmp_path, tiny_data, monkeypatch):
    monkeypatch.chdir(Path(tiny_data["train"]["images"]).parent)  # the data folder
    data = {"root": None, "num_workers": 0,
            "train": {"format": "coco", "annotations": "annotations/instances_train.json", "images": "train"},
            "val": {"format": "coco", "annotations": "annotations/instances_val.json", "images": "val"}}
    absolute = with_absolute_paths(data)
    assert absolute["train"]["images"] == os.path.abspath("train") and absolute["root"] is None
    assert with_absolute_paths({**data, "root": "."})["root"] == os.getcwd()
    config = load_config("sparse_rcnn/r50_fpn_100pro_3x", tiny_overrides(tiny_data, max_iter=1))
    config["data"].update({k: data[k] for k in ("train", "val")})
    out = tmp_path / "run"
    Trainer(config, out, progress=False).train()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    for split in ("train", "val"):
        assert Path(saved["data"][split]["annotations"]).is_absolute()
    # The printed continue command, from a folder where the relative paths meant nothing.
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(out / "config.yaml"), "--output", str(out), "--resume", "solver.max_iter=2",
                 "--no-progress"]) == 0
    assert torch.load(out / "last.pth", weights_only=True)["iteration"] == 2


def test_mobilenet_config_keeps_only_the_backbone_keys_it_reads():
    inherited = {"name": "mobilenet_v2", "depth": 50, "layout": "caffe", "frozen_bn": True, "freeze_at": 2,
                 "weights": None}
    assert backbone_keys_in_use(inherited) == {"name": "mobilenet_v2", "frozen_bn": True, "freeze_at": 2,
                                               "weights": None}
    resnet = dict(inherited, name="resnet")
    assert backbone_keys_in_use(resnet) == resnet
    assert backbone_keys_in_use(dict(inherited, dept=3))["dept"] == 3  # a typo is kept, to be reported
    # Same model either way (caffe layout would change the pixel normalisation of a ResNet only).
    config = load_config("querydet/mobilenetv2_fpn_cpu", ["model.backbone.weights=null", "model.num_classes=3"])
    assert config["model"]["backbone"].get("depth") == 50  # inherited from the R-50 base
    pruned = load_config(config, [])
    pruned["model"]["backbone"] = backbone_keys_in_use(pruned["model"]["backbone"])
    torch.manual_seed(0)
    full_model = build_model(config)
    torch.manual_seed(0)
    pruned_model = build_model(pruned)
    image = torch.rand(3, 64, 64) * 255
    with torch.no_grad():
        full_out, pruned_out = full_model.eval()([image])[0], pruned_model.eval()([image])[0]
    assert torch.equal(full_out["scores"], pruned_out["scores"])


def test_num_workers_default_is_bounded_by_the_cores(tmp_path, tiny_data):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert default_num_workers() == min(4, cores)
    assert load_config("sparse_rcnn/mobilenetv2_fpn_cpu")["data"]["num_workers"] is None
    config = load_config("sparse_rcnn/r50_fpn_100pro_3x", tiny_overrides(tiny_data))
    del config["data"]["num_workers"]
    assert Trainer(config, tmp_path, progress=False)._train_loader().num_workers == min(4, cores)
    config["data"]["num_workers"] = 1
    assert Trainer(config, tmp_path, progress=False)._train_loader().num_workers == 1


# ---------------------------------------------------------------- logs and interrupts
def test_train_log_holds_losses_lr_and_evaluations_and_warns_in_warmup(tmp_path, tiny_data, capsys, single_thread):
    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_data, max_iter=2, warmup_iters=5, eval_period=1)
    out = tmp_path / "run"
    assert main(["train", str(config), "--output", str(out), "--no-progress"]) == 0
    text = (out / "train.log").read_text()
    assert "iteration 1/2: total_loss" in text and "iteration 2/2: total_loss" in text and " lr " in text
    assert "loss_ce" in text
    assert "iteration 1: evaluation on data.val" in text and "AP50" in text
    assert "evaluating during the learning-rate warm-up" in text
    err = capsys.readouterr().err
    assert "iteration 2/2: total_loss" in err  # --no-progress: the console gets them too


def test_loss_lines_stay_off_the_console_under_a_progress_bar(tmp_path, tiny_data, capsys, single_thread):
    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_data, max_iter=1)
    assert main(["train", str(config), "--output", str(tmp_path / "run")]) == 0
    assert "total_loss" not in capsys.readouterr().err
    assert "iteration 1/1: total_loss" in (tmp_path / "run" / "train.log").read_text()


def test_interrupted_train_exits_130(tmp_path, tiny_data, monkeypatch, single_thread):
    original_step = Trainer._step

    def step(self, batches, accumulate):
        out = original_step(self, batches, accumulate)
        self._request_stop(None, None)  # as if Ctrl-C arrived during the first step
        return out

    monkeypatch.setattr(Trainer, "_step", step)
    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_data)
    assert main(["train", str(config), "--output", str(tmp_path / "run"), "--no-progress"]) == 130
    assert torch.load(tmp_path / "run" / "last.pth", weights_only=True)["iteration"] == 1


# ---------------------------------------------------------------- predict
def test_predict_reports_counts_never_overwrites_and_names_images(trained, tiny_data, tmp_path, monkeypatch, capsys,
                                                                   single_thread):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (128, 96), (120, 80, 40)).save(folder / name)
    weights = str(trained / "last.pth")
    assert main(["predict", weights, str(folder), "--score-threshold", "0.0"]) == 0
    printed = capsys.readouterr()
    assert (tmp_path / "outputs" / "predict" / "results.json").is_file()
    results = json.loads((tmp_path / "outputs" / "predict" / "results.json").read_text())
    assert {r["image_id"] for r in results} == {"a.png", "b.png"}
    assert f"{folder / 'a.png'}: " in printed.out + printed.err and "detection" in printed.out + printed.err
    # A second run goes to predict2; nothing above the threshold is said so.
    assert main(["predict", weights, str(folder / "a.png"), "--score-threshold", "1.01"]) == 0
    printed = capsys.readouterr()
    assert "no detections above 1.01" in printed.out + printed.err
    assert json.loads((tmp_path / "outputs" / "predict2" / "results.json").read_text()) == []
    assert len(json.loads((tmp_path / "outputs" / "predict" / "results.json").read_text())) == len(results)
    # Images of the model's own COCO val set get their COCO ids.
    val_images = sorted(Path(tiny_data["val"]["images"]).glob("*.png"))[:2]
    assert main(["predict", weights, *map(str, val_images), "--score-threshold", "0.0"]) == 0
    coco = json.loads(Path(tiny_data["val"]["annotations"]).read_text())
    expected = {img["id"] for img in coco["images"] if img["file_name"] in {p.name for p in val_images}}
    ids = {r["image_id"] for r in json.loads((tmp_path / "outputs" / "predict3" / "results.json").read_text())}
    assert ids == expected and len(expected) == 2


def test_predict_skips_a_bad_image_and_keeps_the_others(trained, tmp_path, capsys, single_thread):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (128, 96), (200, 200, 200)).save(folder / "good.png")
    Image.new("RGB", (60000, 10), (0, 0, 0)).save(folder / "strip.png")   # extreme aspect ratio
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "pred"
    assert main(["predict", str(trained / "last.pth"), str(folder), "--output", str(out),
                 "--score-threshold", "0.0"]) == 0
    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert f"skipped {folder / 'broken.jpg'}" in text and f"skipped {folder / 'strip.png'}" in text
    assert "Traceback" not in text
    results = json.loads((out / "results.json").read_text())
    assert results and {r["image_id"] for r in results} == {"good.png"}
    assert "1 images" in printed.out and "2 skipped" in printed.out


# ---------------------------------------------------------------- the CSQ figure
def test_explain_figure_has_a_legend_and_labelled_colour_bars(single_thread):
    from sparsedet.explain import explain_figure

    tiny = {"name": "querydet", "num_classes": 3, "backbone": {"depth": 18, "weights": None},
            "fpn": {"channels": 32}, "head": {"num_convs": 2}, "query": {"num_convs": 2}}
    model = build_model({"model": tiny, "input": {"min_size_test": 96, "max_size_test": 128}}).eval()
    figure = explain_figure(model, torch.rand(3, 96, 128) * 255)
    legends = [ax.get_legend() for ax in figure.axes if ax.get_legend() is not None]
    assert len(legends) == 2  # the two site panels
    labels = [t.get_text() for t in legends[0].get_texts()]
    assert any(label.startswith("queried") for label in labels) and any("context" in label for label in labels)
    assert any("skipped" in label for label in labels)
    colour_bars = [ax for ax in figure.axes if "query probability" in ax.get_ylabel()]
    assert len(colour_bars) == 2


def test_predict_explain_without_a_query_head_is_one_error(trained, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (128, 96)).save(folder / name)
    assert main(["predict", str(trained / "last.pth"), str(folder), "--explain", "--output", str(tmp_path / "p")]) == 1
    err = capsys.readouterr().err
    assert "query head" in err and len(err.strip().splitlines()) == 1
