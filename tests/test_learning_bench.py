"""benchmarks/learning.py: a two-step row of a sparsedet config and of a torchvision detector on two
raccoon images produces a well-formed result json, and the table shows it (and the rows not run)."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "learning.py"


@pytest.fixture(scope="module")
def learning():
    spec = importlib.util.spec_from_file_location("learning_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["learning_bench"] = module
    spec.loader.exec_module(module)
    return module


# Tiny sizes: the rows' recipes are kept, only the images are made small.
TINY = ["solver.max_iter=2", "solver.eval_period=1", "input.min_size_train=[128]", "input.max_size_train=192",
        "input.min_size_test=128", "input.max_size_test=192"]


@pytest.mark.parametrize("row, extra", [
    ("retinanet/mobilenetv2_fpn_small_data", ["model.fpn.channels=16"]),
    ("tv:fcos", ["model.fpn_channels=32"]),
])
def test_row_json_and_table(learning, shared_data, tmp_path, single_thread, row, extra):
    split = tmp_path / "two.txt"
    split.write_text("raccoon-1\nraccoon-2\n")
    results = tmp_path / "results"
    overrides = TINY + extra + [f"data.train.split={split}", f"data.val.split={split}"]
    assert learning.main(["--only", row, "--results-dir", str(results), "--work-dir", str(tmp_path / "work"),
                          "--data-root", str(shared_data), "--no-progress", *overrides]) == 0

    record = json.loads((results / learning.row_file_name(row)).read_text())
    assert record["row"] == row and record["steps"] == 2
    assert record["kind"] == ("torchvision" if row.startswith("tv:") else "sparsedet")
    assert [e["step"] for e in record["evaluations"]] == [1, 2]
    for evaluation in record["evaluations"]:
        assert 0.0 <= evaluation["AP"] <= evaluation["AP50"] <= 100.0
    assert record["s_per_step"] > 0 and record["wall_s"] >= record["train_s"] > 0
    assert isinstance(record["final_train_loss"], float) and record["final_train_loss"] > 0
    assert record["solver"]["images_per_batch"] == 4 and record["solver"]["max_iter"] == 2
    assert record["input"]["max_size_train"] == 192 and record["overrides"] == overrides
    assert record["budget"]["input"] == learning.INPUT
    assert len(record["load_before"]) == 3 and "learning.py" in record["command"]
    if row.startswith("tv:"):
        # torchvision's recipe at batch 4: reference lr 0.01 x 4/16, lr steps at epochs 16, 22 of 26.
        assert record["solver"]["optimizer"] == "sgd" and record["solver"]["base_lr"] == pytest.approx(0.0025)
        assert record["solver"]["steps"] == [246, 338]
    else:
        assert record["solver"]["steps"] == [320, 380]  # the config's own, already for 400 steps

    table = learning.format_table(results)
    line = next(l for l in table.splitlines() if f"`{row}`" in l)
    assert "@1:" in line and "@2:" in line and "not run yet" not in line
    others = [l for l in table.splitlines() if "`" in l and f"`{row}`" not in l]
    assert len(others) == len(learning.ROWS) - 1 and all("not run yet" in l for l in others)


def test_budget_overrides_scale_the_schedule(learning, tmp_path):
    overrides = learning.budget_overrides({"max_iter": 3000, "steps": [2400, 2800]}, tmp_path)
    assert overrides["solver.max_iter"] == 400 and overrides["solver.steps"] == [320, 373]
    assert overrides["solver.images_per_batch"] == 4 and overrides["solver.eval_period"] == 100
    assert overrides["data.train"]["split"] == "raccoon/train.txt" and overrides["data.val"]["format"] == "voc"
    assert overrides["input.min_size_train"] == [288, 320, 352] and overrides["input.max_size_test"] == 512


def test_verdict_against_the_target_and_the_family(learning, tmp_path):
    def write(row, ap50s, diverged=None):
        record = {"row": row, "steps": 400, "diverged": diverged, "solver": {"max_iter": 400},
                  "evaluations": [{"step": 100 * (i + 1), "AP": a / 2, "AP50": a} for i, a in enumerate(ap50s)],
                  "wall_s": 60.0, "s_per_step": 1.0, "device": "cpu", "threads": 1, "load_before": [1, 1, 1],
                  "load_after": [1, 1, 1], "final_train_loss": 1.0}
        (tmp_path / learning.row_file_name(row)).write_text(json.dumps(record))

    write("tv:fcos", [70, 80, 85, 86.4])
    write("tsp_fcos/mobilenetv2_fpn_cpu", [60, 70, 80, 86.4])       # ties the family: passes
    write("fcos/mobilenetv2_fpn_small_data", [60, 90, 90, 86.3])     # the last evaluation counts
    write("querydet/mobilenetv2_fpn_cpu", [10, 20, 30, 90.0])        # tv:retinanet not run
    write("retinanet/mobilenetv2_fpn_small_data", [0, 0, 0, 0], diverged="NaN")
    records = {row: json.loads((tmp_path / learning.row_file_name(row)).read_text())
               for row in learning.ROWS if (tmp_path / learning.row_file_name(row)).is_file()}
    assert learning.verdict("tsp_fcos/mobilenetv2_fpn_cpu", records) == "**yes**: ≥ 70, ≥ tv:fcos (86.4)"
    assert learning.verdict("fcos/mobilenetv2_fpn_small_data", records) == "no: ≥ 70, < tv:fcos (86.4)"
    assert learning.verdict("querydet/mobilenetv2_fpn_cpu", records) == "no: ≥ 70, tv:retinanet not run"
    assert learning.verdict("retinanet/mobilenetv2_fpn_small_data", records) == "no AP50 @400"
    assert learning.verdict("tv:fcos", records) == "–"
    table = learning.format_table(tmp_path)
    assert "| **yes**: ≥ 70, ≥ tv:fcos (86.4) |" in table


def test_table_marks_a_stopped_run(learning, tmp_path):
    record = {"row": "tv:retinanet", "steps": 150, "stopped_early": True, "solver": {"max_iter": 400},
              "evaluations": [{"step": 100, "AP": 41.25, "AP50": 80.5}], "wall_s": 600.0, "s_per_step": 3.5,
              "device": "cpu", "threads": 1, "load_before": [3.0, 2, 1], "load_after": [4.0, 3, 2],
              "final_train_loss": 0.5}
    (tmp_path / learning.row_file_name("tv:retinanet")).write_text(json.dumps(record))
    line = next(l for l in learning.format_table(tmp_path).splitlines() if "tv:retinanet" in l)
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[:5] == ["`tv:retinanet` (stopped at step 150 of 400)", "41.2 / 80.5", "not reached", "not reached",
                         "not reached"]
    assert cells[5:] == ["–", "10.0 min", "3.50", "cpu, 1", "3.0 / 4.0", "0.500"]


def test_table_marks_a_diverged_run(learning, tmp_path):
    record = {"row": "fcos/mobilenetv2_fpn_cpu", "steps": 54, "stopped_early": False,
              "diverged": "the loss was NaN/inf in 5 consecutive iterations (last at 54): training diverged. ",
              "solver": {"max_iter": 400}, "evaluations": [], "wall_s": 420.0, "s_per_step": 7.0, "device": "cpu",
              "threads": 1, "load_before": [2.0, 2, 2], "load_after": [2.0, 2, 2], "final_train_loss": 7.4}
    (tmp_path / learning.row_file_name("fcos/mobilenetv2_fpn_cpu")).write_text(json.dumps(record))
    line = next(l for l in learning.format_table(tmp_path).splitlines() if "fcos/mobilenetv2_fpn_cpu" in l
                and "tsp" not in l)
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[0] == "`fcos/mobilenetv2_fpn_cpu` (diverged: NaN/inf loss at step 54 of 400)"
    assert cells[1:5] == ["diverged"] * 4
