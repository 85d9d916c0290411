#!/usr/bin/env python
"""Training-step benchmark: the fused focal loss vs torchvision's, on the dense CPU recipes.

For each config (default ``querydet/mobilenetv2_fpn_cpu`` and ``retinanet/mobilenetv2_fpn_cpu``),
two identical models (same seed, same ImageNet backbone) train side by side for ``--steps`` steps
(default 50) on the same batches, steps interleaved:

* **before**: the class losses call ``sparsedet.layers.focal_loss.reference_sigmoid_focal_loss``
  (drop ignored rows, int64 one-hot, ``torchvision.ops.sigmoid_focal_loss``: what the detectors
  did before), switched in by patching the loss modules' ``fused_sigmoid_focal_loss`` name;
* **after**: the library as it is (``fused_sigmoid_focal_loss``).

One step = forward (losses), ``backward``, the recipe's gradient clipping, optimizer and LR schedule
steps (as ``sparsedet.engine.fit``). Batches: ``images_per_batch`` images of the config's training set
(tiny_coco in ``../shared/data``) with the recipe's training transforms, seeded per batch; the same
``--batches`` batches cycle. Without the data set, random images at 352x512 with random boxes.

Printed per config: median step time of each (after ``--warmup`` steps, which still count for the
loss curve), the speed-up (ratio of the medians, target >= 1.5x; also the median of the per-step
before/after ratios, steadier on a machine whose load changes), and the largest relative difference between the two
50-step total-loss curves (target <= 1e-4).

Usage::

    PYTHONPATH=src .venv/bin/python benchmarks/focal_loss_step.py                    # both configs, 50 steps
    PYTHONPATH=src .venv/bin/python benchmarks/focal_loss_step.py --steps 10 --configs retinanet/mobilenetv2_fpn_cpu

Exit status 0 when every target passes, 1 otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sparse_rcnn_speed import cpu_model, load_average, random_image, random_targets  # noqa: E402

CONFIGS = ("querydet/mobilenetv2_fpn_cpu", "retinanet/mobilenetv2_fpn_cpu")
LOSS_MODULES = ("sparsedet.models.dense.losses", "sparsedet.models.fcos.losses")


@contextlib.contextmanager
def focal_implementation(name: str):
    """``before``: every dense loss module calls the torchvision-based reference; ``after``: as is."""
    import importlib

    from sparsedet.layers import focal_loss
    replacement = {"before": focal_loss.reference_sigmoid_focal_loss,
                   "after": focal_loss.fused_sigmoid_focal_loss}[name]
    modules = [importlib.import_module(m) for m in LOSS_MODULES]
    saved = [m.fused_sigmoid_focal_loss for m in modules]
    for m in modules:
        m.fused_sigmoid_focal_loss = replacement
    try:
        yield
    finally:
        for m, fn in zip(modules, saved):
            m.fused_sigmoid_focal_loss = fn


def make_batches(config: dict, count: int, seed: int) -> list[tuple[list[torch.Tensor], list[dict]]]:
    """``count`` training batches of the config's data set (seeded transforms), or random ones."""
    from sparsedet.data import TransformedDataset, build_transforms, read_dataset
    per_batch = int(config["solver"]["images_per_batch"])
    data_cfg = config.get("data") or {}
    try:
        dataset = read_dataset(data_cfg["train"], data_cfg.get("root"), "data.train")
        if (config.get("input") or {}).get("filter_empty_annotations"):
            dataset = dataset.without_empty()
    except Exception as err:  # no data set here: random images
        print(f"note: training data unavailable ({err}); random 352x512 images with 8 boxes each")
        g = torch.Generator().manual_seed(seed)
        num_classes = int(config["model"].get("num_classes") or 80)
        return [([random_image((352, 512), g) for _ in range(per_batch)],
                 [random_targets((352, 512), 8, num_classes, g) for _ in range(per_batch)]) for _ in range(count)]
    config["model"]["num_classes"] = dataset.num_classes
    data = TransformedDataset(dataset, build_transforms(config.get("input") or {}, train=True))
    batches = []
    for b in range(count):
        samples = [data[((b * per_batch + i) % len(data), seed + b * per_batch + i)] for i in range(per_batch)]
        batches.append(([img.float() for img, _ in samples],
                        [{"boxes": t["boxes"], "labels": t["labels"]} for _, t in samples]))
    return batches


class Run:
    """One model + optimizer + schedule, stepping with one focal-loss implementation."""

    def __init__(self, config: dict, implementation: str, seed: int):
        from sparsedet.engine.optim import ScheduleSet, build_optimizer
        from sparsedet.models import build_model
        torch.manual_seed(seed)
        self.model = build_model(config).train()
        self.solver = config["solver"]
        self.optimizer = build_optimizer(self.model, self.solver)
        self.schedule = ScheduleSet(self.optimizer, self.solver)
        self.implementation = implementation
        self.times: list[float] = []
        self.losses: list[float] = []

    def step(self, images, targets) -> None:
        start = time.perf_counter()
        with focal_implementation(self.implementation):
            losses = self.model(images, targets)
            total = sum(losses.values())
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
        self.optimizer.clip_grad_norms()  # per-group clips of solver.param_groups, as the trainer
        clip = self.solver.get("clip_grad_norm")
        if clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(clip))
        self.optimizer.step()
        self.schedule.step()
        self.times.append(time.perf_counter() - start)
        self.losses.append(float(total.detach()))


def bench(config_name: str, args) -> bool:
    from sparsedet.config import load_config
    config = load_config(config_name)
    batches = make_batches(config, args.batches, args.seed)
    shape = tuple(batches[0][0][0].shape[-2:])
    runs = {name: Run(config, name, args.seed) for name in ("before", "after")}
    print(f"\n== {config_name}: {len(batches[0][0])} images per step (first image {shape[0]}x{shape[1]}), "
          f"{args.steps} steps, {len(batches)} batches cycling")
    for step in range(args.steps):
        images, targets = batches[step % len(batches)]
        for run in runs.values():
            run.step(images, targets)
        if args.verbose:
            print(f"  step {step:3d}  before {runs['before'].losses[-1]:.6f} ({runs['before'].times[-1]:.2f}s)"
                  f"  after {runs['after'].losses[-1]:.6f} ({runs['after'].times[-1]:.2f}s)", flush=True)
    timed = {k: r.times[args.warmup:] or r.times for k, r in runs.items()}
    before, after = statistics.median(timed["before"]), statistics.median(timed["after"])
    speedup = before / after
    diffs = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(runs["after"].losses, runs["before"].losses)]
    worst = max(diffs)
    finite = all(math.isfinite(v) for r in runs.values() for v in r.losses)
    ok_speed, ok_curve = speedup >= args.target_speedup, finite and worst <= args.target_curve
    # Steps run in pairs (before, after) on the same batch: on a machine whose load swings, the
    # median of the per-pair ratios is steadier than the ratio of the two medians.
    paired = statistics.median(b / a for b, a in zip(timed["before"], timed["after"]))
    print(f"  median step  before (torchvision) {before * 1000:8.1f} ms | after (fused) {after * 1000:8.1f} ms"
          f" | speed-up {speedup:5.2f}x (target >= {args.target_speedup}) {'PASS' if ok_speed else 'FAIL'}"
          f" | median of per-step ratios {paired:5.2f}x")
    print(f"  loss curve   first {runs['before'].losses[0]:.5f} -> last {runs['before'].losses[-1]:.5f} (before) / "
          f"{runs['after'].losses[-1]:.5f} (after); max relative difference {worst:.2e} at step "
          f"{diffs.index(worst)} (target <= {args.target_curve:g}) {'PASS' if ok_curve else 'FAIL'}")
    return ok_speed and ok_curve


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated configs (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=50, help="training steps per implementation (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing (default: %(default)s)")
    parser.add_argument("--batches", type=int, default=4, help="distinct batches cycled (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target-speedup", type=float, default=1.5)
    parser.add_argument("--target-curve", type=float, default=1e-4)
    parser.add_argument("--verbose", action="store_true", help="print every step")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, CPU {cpu_model()}, load average {load_average()}")
    ok = True
    for name in args.configs.split(","):
        ok &= bench(name.strip(), args)
    print(f"\nload average at the end: {load_average()}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
