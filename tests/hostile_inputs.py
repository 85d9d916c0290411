"""Hostile inputs, built at test time (no binary fixtures): broken images, annotation files,
checkpoints, configs, devices and output folders, each with the CLI command that meets it, the exit
code it must give and a fragment of its one-line message.

Used by ``test_hostile_inputs.py`` and by ``benchmarks/reliability_table.py`` (the closing table
of issue 9). Everything is written under ``root``; the commands write only under ``<sandbox>/run``.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

TINY_MODEL = ["model.backbone.depth=18", "model.backbone.weights=null", "model.hidden_dim=64",
              "model.fpn.channels=64", "model.num_proposals=8", "model.num_stages=2",
              "model.dim_feedforward=128", "model.dim_dynamic=16", "model.num_classes=5"]


@dataclass
class Case:
    """One bad input: ``argv`` for ``sparsedet`` (``{run}`` = the run folder), the exit code and a
    fragment the one-line message must contain."""

    kind: str
    what: str
    argv: list[str]
    exit_code: int
    expect: str
    marker: Path | None = None  # a file that must NOT exist afterwards (code from a pickle)


class _RunsCode:
    """Pickles to a call of ``os.system``: loading it unsafely would create ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _png(path: Path, size=(40, 32), color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _jpeg_bytes(size=(40, 32)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _coco(images: list[tuple[str, int, int]]) -> dict:
    return {"images": [{"id": i + 1, "file_name": name, "width": w, "height": h} for i, (name, w, h) in enumerate(images)],
            "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [2, 2, 20, 20], "area": 400,
                             "iscrowd": 0} for i in range(len(images))],
            "categories": [{"id": 1, "name": "thing"}]}


def _voc_xml(height: str, width: str = "40", box=("3", "3", "30", "25")) -> str:
    return (f"<annotation><filename>a.png</filename><size><width>{width}</width><height>{height}</height>"
            f"<depth>3</depth></size><object><name>thing</name><difficult>0</difficult><bndbox>"
            f"<xmin>{box[0]}</xmin><ymin>{box[1]}</ymin><xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox>"
            "</object></annotation>")


def build_cases(root: Path) -> list[Case]:
    """Writes every hostile input under ``root`` and returns the cases."""
    root.mkdir(parents=True, exist_ok=True)
    # A tiny Sparse R-CNN config (the bundled official one, made small) training on one good image.
    from sparsedet.config import CONFIG_ROOT, apply_override

    good = root / "good"
    _png(good / "a.png")
    (good / "train.json").write_text(json.dumps(_coco([("a.png", 40, 32)])))
    tiny: dict = {"_base_": str(CONFIG_ROOT / "sparse_rcnn" / "r50_fpn_100pro_3x.yaml"),
                  "data": {"train": {"format": "coco", "annotations": str(good / "train.json"), "images": str(good)},
                           "val": None, "num_workers": 0},
                  "solver": {"max_iter": 1, "images_per_batch": 1}}
    for item in TINY_MODEL:
        apply_override(tiny, item)
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny))
    train: list[str] = []

    def train_case(kind, what, overrides, code, expect, extra=()):
        return Case(kind, what, ["train", str(config), *train, *overrides, "--output", "{run}", "--no-progress",
                                 *extra], code, expect)

    cases: list[Case] = []

    # ---------------------------------------------------------------- configs
    (root / "bad.yaml").write_text("model: [unclosed\n")
    (root / "list.yaml").write_text("- a\n- b\n")
    (root / "no_model.yaml").write_text("solver: {base_lr: 0.1}\n")
    (root / "cycle_a.yaml").write_text("_base_: cycle_b.yaml\n")
    (root / "cycle_b.yaml").write_text("_base_: cycle_a.yaml\n")
    cases += [
        Case("config", "unknown config name", ["train", "sparse_rcnn/no_such_config", "--output", "{run}"], 1,
             "neither a file nor a bundled config"),
        train_case("config", "top-level typo slover.base_lr=0.5", ["slover.base_lr=0.5"], 1, "did you mean solver?"),
        train_case("config", "solver typo solver.base_lrr=0.5", ["solver.base_lrr=0.5"], 1,
                   "did you mean solver.base_lr"),
        train_case("config", "input typo input.min_size_trian=5", ["input.min_size_trian=5"], 1,
                   "did you mean input.min_size_train"),
        train_case("config", "test typo test.images_per_bach=2", ["test.images_per_bach=2"], 1,
                   "did you mean test.images_per_batch"),
        train_case("config", "data typo data.num_worker=2", ["data.num_worker=2"], 1, "did you mean data.num_workers"),
        train_case("config", "solver.max_iter=abc", ["solver.max_iter=abc"], 1,
                   "solver.max_iter: expected an integer, got 'abc'"),
        train_case("config", "solver.base_lr=abc", ["solver.base_lr=abc"], 1, "solver.base_lr: expected a finite number"),
        train_case("config", "solver.base_lr=-1", ["solver.base_lr=-1"], 1, "solver.base_lr: expected a finite number > 0"),
        train_case("config", "model.num_proposals=abc", ["model.num_proposals=abc"], 1,
                   "model.num_proposals: expected an integer, got 'abc'"),
        train_case("config", "model.num_proposals=-5", ["model.num_proposals=-5"], 1,
                   "model.num_proposals: expected an integer >= 1, got -5"),
        train_case("config", "solver.param_groups item without lr", ["solver.param_groups=[{match: backbone}]"], 1,
                   "solver.param_groups[0].lr: missing"),
        train_case("config", "data.train.format=pascal", ["data.train.format=pascal"], 1,
                   "data.train.format: expected one of coco, voc, yolo"),
        train_case("config", "format switched to yolo without its keys", ["data.train.format=yolo"], 1,
                   "data.train.images: missing (required for format yolo)"),
        Case("config", "invalid YAML file", ["train", str(root / "bad.yaml"), "--output", "{run}"], 1, "invalid YAML"),
        Case("config", "YAML top level is a list", ["train", str(root / "list.yaml"), "--output", "{run}"], 1,
             "the top level must be a mapping"),
        Case("config", "no model section in the config or its base", ["train", str(root / "no_model.yaml"),
                                                                     "--output", "{run}"], 1, "has no model.name"),
        Case("config", "_base_ cycle", ["train", str(root / "cycle_a.yaml"), "--output", "{run}"], 1, "_base_ cycle"),
        train_case("config", "missing annotation file", [f"data.train.annotations={root / 'none.json'}"], 1,
                   "data.train.annotations: file not found"),
    ]

    # ---------------------------------------------------------------- device, output folder
    (root / "a_file").write_text("not a folder")
    cases += [
        train_case("device", "--device cuda with no GPU visible", [], 2, "no CUDA device is visible",
                   extra=("--device", "cuda")),
        Case("output", "--output under a regular file", ["train", str(config), *train, "--output",
                                                          str(root / "a_file" / "run")], 1,
             "cannot write to the output folder"),
    ]

    # ---------------------------------------------------------------- images (all broken: nothing to train on)
    broken = root / "broken_images"
    broken.mkdir()
    jpeg = _jpeg_bytes()
    png = io.BytesIO()
    Image.new("RGB", (40, 32)).save(png, "PNG")
    files = {"truncated.jpg": jpeg[: len(jpeg) // 2], "truncated.png": png.getvalue()[:60], "empty.jpg": b"",
             "random.jpg": np.random.default_rng(1).bytes(500), "text.png": b"hello, I am not an image\n",
             "header_only.jpg": jpeg[:20]}
    for name, data in files.items():
        (broken / name).write_bytes(data)
    (broken / "train.json").write_text(json.dumps(_coco([(n, 40, 32) for n in files] + [("missing.jpg", 40, 32)])))
    cases.append(train_case("images", "every image broken (truncated JPEG/PNG, empty, random bytes, text, header "
                                      "only, missing)",
                            [f"data.train.annotations={broken / 'train.json'}", f"data.train.images={broken}"], 1,
                            "has no usable images"))
    # One good image and the same broken ones: the run trains on the good one (exit 0).
    for name in files:
        (good / name).write_bytes(files[name])
    (good / "mixed.json").write_text(json.dumps(_coco([("a.png", 40, 32)] + [(n, 40, 32) for n in files])))
    cases.append(train_case("images", "one good image among the broken ones: they are skipped and reported",
                            [f"data.train.annotations={good / 'mixed.json'}"], 0, "outputs in"))

    # ---------------------------------------------------------------- COCO json
    coco = root / "coco"
    coco.mkdir()
    _png(coco / "a.png")
    bad_jsons = {
        "not_json.json": ("{not json", "cannot"),
        "list.json": ("[1, 2]", "list.json"),
        "no_images.json": (json.dumps({"annotations": [], "categories": []}), "images"),
        "bbox_string.json": (json.dumps({**_coco([("a.png", 40, 32)]), "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": "oops", "iscrowd": 0}]}), "bbox"),
        "no_categories.json": (json.dumps({k: v for k, v in _coco([("a.png", 40, 32)]).items() if k != "categories"}),
                               "categories"),
    }
    for name, (text, expect) in bad_jsons.items():
        (coco / name).write_text(text)
        cases.append(train_case("coco", name.replace("_", " ").removesuffix(".json"),
                                [f"data.train.annotations={coco / name}", f"data.train.images={coco}"], 1, expect))

    # ---------------------------------------------------------------- VOC xml
    for name, xml, expect in (("inf_height", _voc_xml("inf"), "expected a finite number, got 'inf'"),
                              ("nan_box", _voc_xml("32", box=("nan", "3", "30", "25")), "expected a finite number"),
                              ("not_xml", "<annotation><size>", "cannot parse VOC xml")):
        voc = root / f"voc_{name}"
        _png(voc / "images" / "a.png")
        (voc / "annotations").mkdir()
        (voc / "annotations" / "a.xml").write_text(xml)
        cases.append(train_case("voc", name.replace("_", " "), [
            f"data.train={{format: voc, images: {voc / 'images'}, annotations: {voc / 'annotations'}}}"], 1, expect))

    # ---------------------------------------------------------------- YOLO txt
    for name, data, expect in (("latin1_labels", "0 0.5 0.5 0.2 0.2 # caf\xe9\n".encode("latin-1"), "not a UTF-8 text file"),
                               ("four_fields", b"0 0.5 0.5 0.2\n", "expected 5 numbers"),
                               ("float_class", b"0.5 0.5 0.5 0.2 0.2\n", "expected an integer")):
        yolo = root / f"yolo_{name}"
        _png(yolo / "images" / "a.png")
        (yolo / "labels").mkdir()
        (yolo / "labels" / "a.txt").write_bytes(data)
        cases.append(train_case("yolo", name.replace("_", " "), [
            f"data.train={{format: yolo, images: {yolo / 'images'}, labels: {yolo / 'labels'}, classes: [thing]}}"],
            1, f"a.txt"))
        cases[-1].expect = expect

    # ---------------------------------------------------------------- checkpoints
    ckpt = root / "checkpoints"
    ckpt.mkdir()
    (ckpt / "random.pth").write_bytes(np.random.default_rng(2).bytes(4096))
    (ckpt / "empty.pth").write_bytes(b"")
    marker = root / "CODE_WAS_RUN"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": _RunsCode(marker)}, ckpt / "runs_code.pth")
    with open(ckpt / "runs_code_legacy.pth", "wb") as f:
        pickle.dump({"model": _RunsCode(marker)}, f)
    with open(ckpt / "runs_code.pkl", "wb") as f:
        pickle.dump({"model": {"w": _RunsCode(marker)}}, f)
    torch.save([torch.zeros(2)], ckpt / "list.pth")
    with zipfile.ZipFile(ckpt / "zip_not_torch.pth", "w") as z:
        z.writestr("hello.txt", "hi")
    from sparsedet.config import load_config
    from sparsedet.models import build_model

    tiny = load_config(str(config))
    with torch.device("meta"):
        state = build_model(tiny).state_dict()
    torch.save({"model": {k: torch.zeros(v.shape) for k, v in state.items()}, "config": tiny}, ckpt / "five_classes.pth")
    evaluate = ["--output", "{run}", "--config", str(config)]
    for name, expect in (("random.pth", "not a weights file sparsedet can read safely"),
                         ("empty.pth", "not a weights file sparsedet can read safely"),
                         ("runs_code.pth", "system, which is not tensor data"),
                         ("runs_code_legacy.pth", "not a weights file sparsedet can read safely"),
                         ("runs_code.pkl", "refusing to load"),
                         ("list.pth", "expected a dict of weights, got list"),
                         ("zip_not_torch.pth", "not a weights file sparsedet can read safely"),
                         ("missing.pth", "weights file not found")):
        cases.append(Case("checkpoint", name, ["eval", str(ckpt / name), *evaluate], 1, expect, marker=marker))
    cases.append(Case("checkpoint", "right keys, wrong shapes (5 classes loaded as 3)",
                      ["eval", str(ckpt / "five_classes.pth"), "model.num_classes=3", "--output", "{run}"], 1,
                      "do not fit the model built from the config"))
    cases.append(train_case("checkpoint", "--resume from random bytes", [], 1,
                            "not a weights file sparsedet can read safely",
                            extra=("--resume", str(ckpt / "random.pth"))))
    return cases
