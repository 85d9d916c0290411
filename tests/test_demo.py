"""``sparsedet demo`` end to end on a shrunken data set: every stage runs and the report is complete."""
from __future__ import annotations

import json

import pytest

from sparsedet.demo import run_demo


@pytest.mark.parametrize("model", ["querydet", "sparse_rcnn", "tsp_fcos"])
def test_demo_writes_a_complete_report(tmp_path, model, single_thread):
    stats = run_demo(tmp_path, iterations=2, model=model, num_train=6, num_val=3, image_size=96)
    assert 0.0 <= stats["AP"] <= 1.0
    report = (tmp_path / "report.md").read_text()
    assert "COCO metrics" in report and "loss_curve.png" in report and (tmp_path / "loss_curve.png").is_file()
    pictures = sorted(p.name for p in (tmp_path / "predictions").glob("*.png"))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert "dense" in metrics
    if model == "querydet":
        assert "Cascade Sparse Query" in report and "csq" in metrics
        assert any(name.endswith("_explain.png") for name in pictures)
    assert len([p for p in pictures if not p.endswith("_explain.png")]) == 3
    assert (tmp_path / "train" / "last.pth").is_file()
