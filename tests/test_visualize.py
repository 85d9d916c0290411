"""Detections drawn on images, and training curves from a metrics log, as PNG files."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from sparsedet.visualize import (CURVE_WIDTH_PX, PANEL_HEIGHT_PX, class_colour, draw_detections,
                                 plot_training_curves, read_metrics)

NAMES = ("square", "disc", "triangle")


def _grey(height=120, width=200, value=128):
    return torch.full((3, height, width), value, dtype=torch.uint8)


def test_boxes_in_class_colours_on_every_input_kind(tmp_path):
    detections = {"boxes": torch.tensor([[20.0, 30.0, 100.0, 90.0], [120.0, 40.0, 180.0, 110.0],
                                         [5.0, 5.0, 15.0, 15.0]]),
                  "labels": torch.tensor([1, 2, 0]), "scores": torch.tensor([0.9, 0.5, 0.1])}
    image = _grey()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / "grey.png")
    for source in (image, Image.open(tmp_path / "grey.png"), tmp_path / "grey.png", str(tmp_path / "grey.png")):
        drawn = draw_detections(source, detections, NAMES)
        assert drawn.size == (200, 120) and drawn.mode == "RGB"
        pixels = np.asarray(drawn)
        # Left and bottom edges of each kept box carry its class colour (the top holds the tag).
        assert tuple(pixels[60, 20]) == class_colour(1) and tuple(pixels[89, 60]) == class_colour(1)
        assert tuple(pixels[80, 120]) == class_colour(2) and tuple(pixels[109, 150]) == class_colour(2)
        assert tuple(pixels[60, 19]) == (0, 0, 0)  # the dark line outside the band
        assert tuple(pixels[10, 5]) == (128, 128, 128)  # score 0.1 < 0.3: not drawn
        assert tuple(pixels[60, 60]) == (128, 128, 128)  # box interiors untouched
        # The name tag: class-coloured pixels and text pixels above the first box.
        tag = pixels[10:29, 19:80].reshape(-1, 3)
        assert (tag == class_colour(1)).all(axis=1).sum() > 50
        assert (~(tag == class_colour(1)).all(axis=1) & ~(tag == 128).all(axis=1)).sum() > 20
    assert np.asarray(image).max() == 128  # the input is not drawn on


def test_ground_truth_without_scores_and_errors():
    drawn = draw_detections(_grey(), {"boxes": torch.tensor([[2.0, 2.0, 50.0, 50.0]]), "labels": torch.tensor([2])},
                            NAMES)
    assert tuple(np.asarray(drawn)[30, 2]) == class_colour(2)
    assert len({class_colour(i) for i in range(80)}) == 80
    with pytest.raises(ValueError, match="labels must be in 0..2"):
        draw_detections(_grey(), {"boxes": torch.zeros(1, 4), "labels": torch.tensor([3])}, NAMES)
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        draw_detections(torch.zeros(120, 200, 3, dtype=torch.uint8), {"boxes": [], "labels": []}, NAMES)


def _write_log(path, with_eval: bool, malformed: bool = False):
    lines = []
    for it in range(0, 400, 2):
        loss = 40.0 * math.exp(-it / 60) + 0.5 + 0.2 * math.sin(it)
        lines.append(json.dumps({"type": "train", "iteration": it, "lr": 1e-4, "total_loss": loss,
                                 "loss_ce": loss / 3, "loss_bbox": loss / 3}))
        if with_eval and it % 100 == 98:
            lines.append(json.dumps({"type": "eval", "iteration": it, "AP": it / 1000, "AP50": it / 600, "APs": -1.0}))
    if malformed:
        lines[3:3] = ["{not json", json.dumps([1, 2]), json.dumps({"type": "train", "iteration": 5}), ""]
    path.write_text("\n".join(lines) + "\n")


def test_training_curves_with_and_without_eval(tmp_path):
    _write_log(tmp_path / "train_only.jsonl", with_eval=False)
    out = plot_training_curves(tmp_path / "train_only.jsonl", tmp_path / "plots" / "train_only.png")
    assert out == tmp_path / "plots" / "train_only.png"
    with Image.open(out) as png:
        assert png.size == (CURVE_WIDTH_PX, PANEL_HEIGHT_PX)

    _write_log(tmp_path / "metrics.jsonl", with_eval=True, malformed=True)
    with pytest.warns(UserWarning, match=r"metrics.jsonl: ignored 3 malformed line\(s\): 4, 5, 6"):
        out = plot_training_curves(tmp_path / "metrics.jsonl", tmp_path / "both.png")
    with Image.open(out) as png:
        assert png.size == (CURVE_WIDTH_PX, 2 * PANEL_HEIGHT_PX)
        assert len(np.unique(np.asarray(png.convert("RGB")).reshape(-1, 3), axis=0)) > 20  # not blank

    with pytest.warns(UserWarning):
        train, evaluation = read_metrics(tmp_path / "metrics.jsonl")
    assert len(train) == 200 and [r["iteration"] for r in evaluation] == [98, 198, 298, 398]


def test_empty_log_is_an_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl: no train or eval lines"):
        plot_training_curves(tmp_path / "empty.jsonl", tmp_path / "x.png")
