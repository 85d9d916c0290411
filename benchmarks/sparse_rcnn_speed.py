#!/usr/bin/env python
"""Speed benchmark: Sparse R-CNN R50-FPN (sparsedet) vs torchvision Faster R-CNN R50-FPN.

Two measurements, in one run, on the same inputs:

1. Inference latency (eval mode, ``torch.inference_mode()``) of
   ``sparsedet.build_model("sparse_rcnn/r50_fpn_100pro_3x")`` (100 proposals) against
   ``torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)``
   at short side 800 and 512 (default sizes ``800x1216`` and ``512x768``, H x W). Warm-up runs,
   then the median of ``--runs`` runs, the two models interleaved run by run. Target: ours/FRCNN
   <= 1.00. Also a breakdown of our model (preprocess+backbone+FPN / 6-stage head / postprocess)
   taken with forward hooks (the hooks only read the clock; they do not change the model).

   Fairness:
   * Both models see the image at exactly the same resolution. Our model takes images at network
     resolution (no resize inside). Faster R-CNN's ``GeneralizedRCNNTransform`` always resizes;
     we build it with ``min_size = H`` and ``max_size = W`` (short, long side of the benchmark
     image), so its scale factor is min(H/H, W/W) = 1.0 and the image goes through unchanged in
     size. (torchvision still runs a bilinear ``interpolate`` at scale 1.0; its cost is inside
     the "transform" figure of the Faster R-CNN breakdown, a few ms.)
   * Pixel ranges as each model expects: ours gets RGB 0-255 floats, Faster R-CNN the same image
     divided by 255 (0-1 floats; converted once, outside the timed region). Both normalise with
     the ImageNet mean/std and zero-pad to a multiple of 32 internally.
   * Random init (costs do not depend on the weights, with one caveat: Faster R-CNN's
     box-score threshold/NMS work depends on its scores; with random weights few boxes pass
     ``box_score_thresh=0.05``, so its postprocess is, if anything, cheaper than with trained
     weights). ``weights_backbone=None`` makes torchvision use plain BatchNorm2d (eval mode: one
     fused op) while ours uses FrozenBatchNorm2d (two elementwise ops), which slightly favours
     Faster R-CNN; ``--frcnn-frozen-bn`` builds it with FrozenBatchNorm2d as the pre-trained
     torchvision model has.
   * Batch 1 by default (latency); ``--batch`` for more.

2. Share of a training step (forward + backward + full-model grad clip 1.0 + AdamW step) spent in
   Hungarian matching, at 300 proposals (``model.num_proposals=300``), batch 2, 80 classes, 7 and
   20 random valid target boxes per image, at short side 512 (``--train-sizes 512,800`` adds 800).
   ``HungarianMatcher.forward`` is wrapped in this script to accumulate its wall time (6 calls
   per step: deep supervision); the part spent in ``scipy.optimize.linear_sum_assignment`` is
   reported too. Target: matching < 10 % of the step.

Usage::

    .venv/bin/python benchmarks/sparse_rcnn_speed.py            # full run (CPU, 2 threads)
    .venv/bin/python benchmarks/sparse_rcnn_speed.py --quick    # smoke run: 1 warm-up, 2 runs
    .venv/bin/python benchmarks/sparse_rcnn_speed.py --threads 8 --runs 10 --train-sizes 512,800
    .venv/bin/python benchmarks/sparse_rcnn_speed.py --device cuda

Exit status: 0 when every measured target passes, 1 otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import platform
import statistics
import sys
import time
import types
from typing import Optional

# OpenMP reads its environment when torch (libgomp) is loaded, so this must precede `import torch`.
if "--omp-passive" in sys.argv:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import torch  # noqa: E402
import torchvision  # noqa: E402


# --------------------------------------------------------------------------------------------
# helpers


def import_build_model():
    """``sparsedet.build_model``; tolerates a package ``__init__`` that is mid-edit (imports a module
    that does not exist yet) by loading ``sparsedet.models`` without the top-level ``__init__``."""
    try:
        import sparsedet
        return sparsedet.build_model
    except ImportError as exc:
        sys.modules.pop("sparsedet", None)
        spec = importlib.util.find_spec("sparsedet")
        if spec is None or not spec.submodule_search_locations:
            raise
        print(f"note: `import sparsedet` failed ({exc}); importing sparsedet.models directly", file=sys.stderr)
        pkg = types.ModuleType("sparsedet")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["sparsedet"] = pkg
        return importlib.import_module("sparsedet.models").build_model


def load_average() -> str:
    """1/5/15-minute load averages from /proc/loadavg, or '' when unavailable."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return ""


def busy_fraction(seconds: float = 1.0) -> Optional[float]:
    """Share of all CPUs' time spent non-idle over ``seconds`` (from /proc/stat), or None."""
    def read():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return sum(values), idle
    try:
        total0, idle0 = read()
        time.sleep(seconds)
        total1, idle1 = read()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def warn_if_busy() -> None:
    """Prints the load and warns when other processes already keep the CPUs busy."""
    load = load_average()
    busy = busy_fraction()
    if load:
        print(f"load average (1/5/15 min): {load}")
    if busy is None:
        return
    print(f"CPU busy before start (1 s sample, all CPUs): {100 * busy:.0f} %")
    if busy > 0.25:
        hint = ("" if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE" else
                "; rerun with --omp-passive (spinning OpenMP threads make every small op wait)")
        print("WARNING: other processes keep the machine busy: wall times are inflated and noisy; "
              f"compare the min/min and CPU-time ratios too{hint}")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


class Clock:
    """Wall clock that synchronises CUDA before reading the time."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def parse_size(text: str) -> tuple[int, int]:
    h, w = text.lower().split("x")
    return int(h), int(w)


def random_image(size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """(3, H, W) RGB float image in 0-255 (integer values, like a decoded JPEG)."""
    h, w = size
    return torch.randint(0, 256, (3, h, w), generator=generator).float()


def random_targets(size: tuple[int, int], num: int, num_classes: int, generator: torch.Generator) -> dict:
    """``num`` random valid xyxy boxes (side >= 8 px, inside the image) and labels in [0, C)."""
    h, w = size
    wh = torch.tensor([w, h, w, h], dtype=torch.float32)
    a = torch.rand(num, 2, generator=generator)
    b = torch.rand(num, 2, generator=generator)
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    boxes = torch.cat([lo, hi], dim=1) * wh
    boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 8.0)
    boxes = torch.minimum(boxes, wh)
    boxes[:, :2] = torch.minimum(boxes[:, :2], boxes[:, 2:] - 8.0)
    labels = torch.randint(0, num_classes, (num,), generator=generator)
    return {"boxes": boxes, "labels": labels}


class SegmentTimer:
    """Forward hooks that stamp the clock when given modules start / finish; read-only."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.stamps: dict[str, float] = {}
        self.totals: dict[str, float] = {}
        self.handles = []

    def stamp_on(self, module: torch.nn.Module, name: str, accumulate: bool = False) -> None:
        def pre(_m, _inp):
            self.stamps[name + ".start"] = self.clock()

        def post(_m, _inp, _out):
            now = self.clock()
            self.stamps[name + ".end"] = now
            if accumulate:
                self.totals[name] = self.totals.get(name, 0.0) + now - self.stamps[name + ".start"]

        self.handles.append(module.register_forward_pre_hook(pre))
        self.handles.append(module.register_forward_hook(post))

    def reset(self) -> None:
        self.stamps.clear()
        self.totals.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:9.1f}"


# --------------------------------------------------------------------------------------------
# 1. inference


def build_frcnn(size: tuple[int, int], frozen_bn: bool, device: torch.device, state: Optional[dict] = None):
    from torchvision.models.detection import FasterRCNN, fasterrcnn_resnet50_fpn
    h, w = size
    # min_size = short side, max_size = long side => GeneralizedRCNNTransform scale factor 1.0.
    kwargs = dict(min_size=min(h, w), max_size=max(h, w))
    if frozen_bn:
        from torchvision.models import resnet50
        from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
        from torchvision.ops import FrozenBatchNorm2d
        backbone = _resnet_fpn_extractor(resnet50(weights=None, norm_layer=FrozenBatchNorm2d), 3)
        model = FasterRCNN(backbone, num_classes=91, **kwargs)
    else:
        model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, **kwargs)
    if state is not None:  # same weights for every size
        model.load_state_dict(state)
    return model.eval().to(device)


def bench_inference(args, build_model, device: torch.device, clock: Clock) -> bool:
    print("\n=== 1. Inference latency (eval, inference_mode), "
          f"batch {args.batch}, {args.warmup} warm-up + median of {args.runs} runs ===")
    torch.manual_seed(args.seed)
    ours = build_model("sparse_rcnn/r50_fpn_100pro_3x").eval().to(device)
    print(f"ours : sparse_rcnn/r50_fpn_100pro_3x, {ours.num_proposals} proposals, "
          f"{sum(p.numel() for p in ours.parameters()) / 1e6:.1f} M params")
    frcnn_state = None
    gen = torch.Generator().manual_seed(args.seed)
    rows, breakdowns = [], []
    all_pass = True
    for size in args.sizes:
        torch.manual_seed(args.seed + 1)
        frcnn = build_frcnn(size, args.frcnn_frozen_bn, device, frcnn_state)
        frcnn_state = frcnn.state_dict()
        if size == args.sizes[0]:
            name = ("torchvision FasterRCNN(ResNet-50 with FrozenBatchNorm2d + FPN, trainable_layers=3, "
                    "91 classes) = fasterrcnn_resnet50_fpn's pre-trained layout" if args.frcnn_frozen_bn else
                    "torchvision fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)")
            print(f"FRCNN: {name}, "
                  f"{sum(p.numel() for p in frcnn.parameters()) / 1e6:.1f} M params; transform "
                  "min_size/max_size = image short/long side (no resolution change)")
        images = [random_image(size, gen).to(device) for _ in range(args.batch)]
        images01 = [img / 255.0 for img in images]  # torchvision detection models expect 0-1

        ours_timer, frcnn_timer = SegmentTimer(clock), SegmentTimer(clock)
        ours_timer.stamp_on(ours.backbone, "backbone")
        ours_timer.stamp_on(ours.head, "head")
        ours_timer.stamp_on(ours.head.pooler, "pooler", accumulate=True)
        for k, stage in enumerate(ours.head.head_series):
            ours_timer.stamp_on(stage, f"stage{k}", accumulate=True)
        frcnn_timer.stamp_on(frcnn.transform, "transform")
        frcnn_timer.stamp_on(frcnn.backbone, "backbone")
        frcnn_timer.stamp_on(frcnn.rpn, "rpn")
        frcnn_timer.stamp_on(frcnn.roi_heads, "roi_heads")

        def run(model, inputs, timer):
            timer.reset()
            cpu_start = time.process_time()
            start = clock()
            model(inputs)
            end = clock()
            cpu = time.process_time() - cpu_start
            return end - start, dict(timer.stamps, start=start, end=end), dict(timer.totals), cpu

        ours_runs, frcnn_runs = [], []
        with torch.inference_mode():
            for _ in range(args.warmup):
                run(ours, images, ours_timer)
                run(frcnn, images01, frcnn_timer)
            for _ in range(args.runs):  # interleaved, so drift hits both models alike
                ours_runs.append(run(ours, images, ours_timer))
                frcnn_runs.append(run(frcnn, images01, frcnn_timer))
        ours_timer.remove()
        frcnn_timer.remove()

        ours_ms = statistics.median(r[0] for r in ours_runs)
        frcnn_ms = statistics.median(r[0] for r in frcnn_runs)
        ratio = ours_ms / frcnn_ms
        cpu_ratio = statistics.median(r[3] for r in ours_runs) / statistics.median(r[3] for r in frcnn_runs)
        ok = ratio <= args.target_ratio
        all_pass &= ok
        rows.append((f"{size[0]}x{size[1]}", ours_ms, frcnn_ms, ratio, ok, cpu_ratio,
                     min(r[0] for r in ours_runs) / min(r[0] for r in frcnn_runs)))

        def med(runs, fn):
            return statistics.median(fn(stamps, totals) for _, stamps, totals, _ in runs)

        breakdowns.append((f"{size[0]}x{size[1]}", {
            "ours": [
                ("preprocess+backbone+FPN", med(ours_runs, lambda s, t: s["backbone.end"] - s["start"])),
                ("proposal setup", med(ours_runs, lambda s, t: s["head.start"] - s["backbone.end"])),
                (f"head ({len(ours.head.head_series)} stages)", med(ours_runs, lambda s, t: s["head.end"] - s["head.start"])),
                ("  of which RoIAlign pooler", med(ours_runs, lambda s, t: t["pooler"])),
                ("  of which stage modules", med(ours_runs, lambda s, t: sum(v for k, v in t.items() if k.startswith("stage")))),
                ("postprocess (top-k, rescale)", med(ours_runs, lambda s, t: s["end"] - s["head.end"])),
                ("total", ours_ms),
            ],
            "frcnn": [
                ("transform (normalise, resize x1.0, pad)", med(frcnn_runs, lambda s, t: s["transform.end"] - s["start"])),
                ("backbone+FPN", med(frcnn_runs, lambda s, t: s["backbone.end"] - s["backbone.start"])),
                ("RPN (head, decode, NMS)", med(frcnn_runs, lambda s, t: s["rpn.end"] - s["rpn.start"])),
                ("RoI heads (pool, MLP, NMS)", med(frcnn_runs, lambda s, t: s["roi_heads.end"] - s["roi_heads.start"])),
                ("postprocess (rescale)", med(frcnn_runs, lambda s, t: s["end"] - s["roi_heads.end"])),
                ("total", frcnn_ms),
            ],
        }))
        del frcnn

    print()
    header = (f"{'size (HxW)':>11} | {'ours ms':>9} | {'FRCNN ms':>9} | {'ours/FRCNN':>10} | {'target':>7} | "
              f"result | {'min/min':>7} | {'CPU-time':>8}")
    print(header)
    print("-" * len(header))
    for name, o, f, r, ok, cpu_r, min_r in rows:
        print(f"{name:>11} | {fmt_ms(o)} | {fmt_ms(f)} | {r:10.2f} | {'<= %.2f' % args.target_ratio:>7} | "
              f"{'PASS' if ok else 'FAIL':>6} | {min_r:7.2f} | {cpu_r:8.2f}")
    print("(ms = median wall time; PASS/FAIL on the median ratio. 'min/min' = ratio of the fastest runs, "
          "'CPU-time' = ratio of median process CPU time; both are less sensitive to other load on the machine)")

    for name, parts in breakdowns:
        print(f"\nbreakdown at {name} (median ms; hooks on backbone / head / pooler / stages)")
        for label in ("ours", "frcnn"):
            total = parts[label][-1][1]
            print(f"  {'Sparse R-CNN (ours)' if label == 'ours' else 'Faster R-CNN'}:")
            for part, secs in parts[label]:
                print(f"    {part:<42} {fmt_ms(secs)}  {100 * secs / total:5.1f} %")
    return all_pass


# --------------------------------------------------------------------------------------------
# 2. training step / matching share


@contextlib.contextmanager
def matcher_timing(clock: Clock):
    """Wraps ``HungarianMatcher.forward`` (and the solver it calls) to accumulate wall time."""
    matcher_mod = sys.modules["sparsedet.models.matcher"]
    cls = matcher_mod.HungarianMatcher
    original_forward = cls.forward
    original_lsa = matcher_mod.linear_sum_assignment
    acc = {"match": 0.0, "lsa": 0.0, "calls": 0}

    def forward(self, *a, **k):
        start = clock()
        try:
            return original_forward(self, *a, **k)
        finally:
            acc["match"] += clock() - start
            acc["calls"] += 1

    def lsa(*a, **k):
        start = time.perf_counter()  # CPU-only (scipy)
        try:
            return original_lsa(*a, **k)
        finally:
            acc["lsa"] += time.perf_counter() - start

    cls.forward = forward
    matcher_mod.linear_sum_assignment = lsa
    try:
        yield acc
    finally:
        cls.forward = original_forward
        matcher_mod.linear_sum_assignment = original_lsa


def bench_training(args, build_model, device: torch.device, clock: Clock) -> bool:
    print(f"\n=== 2. Training step: share spent in Hungarian matching "
          f"(300 proposals, batch {args.train_batch}, 80 classes, AdamW, "
          f"{args.train_warmup} warm-up + median of {args.train_runs} steps) ===")
    torch.manual_seed(args.seed)
    model = build_model("sparse_rcnn/r50_fpn_100pro_3x", ["model.num_proposals=300"]).train().to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2.5e-5, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(args.seed + 2)
    rows = []
    all_pass = True
    with matcher_timing(clock) as acc:
        for short in args.train_sizes:
            long = int(round(short * 1.5 / 32) * 32)
            size = (short, long)
            images = [random_image(size, gen).to(device) for _ in range(args.train_batch)]
            for num_targets in args.targets:
                targets = [{k: v.to(device) for k, v in random_targets(size, num_targets, 80, gen).items()}
                           for _ in range(args.train_batch)]
                steps = []
                for i in range(args.train_warmup + args.train_runs):
                    acc.update(match=0.0, lsa=0.0, calls=0)
                    start = clock()
                    optimizer.zero_grad(set_to_none=True)
                    losses = model(images, targets)
                    loss = sum(losses.values())
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    optimizer.step()
                    total = clock() - start
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"non-finite loss {loss.item()}")
                    if i >= args.train_warmup:
                        steps.append((total, acc["match"], acc["lsa"], acc["calls"]))
                step = statistics.median(s[0] for s in steps)
                match = statistics.median(s[1] for s in steps)
                lsa = statistics.median(s[2] for s in steps)
                share = statistics.median(s[1] / s[0] for s in steps)
                ok = share < args.target_share
                all_pass &= ok
                rows.append((f"{short}x{long}", num_targets, step, match, lsa, steps[0][3], share, ok))

    print()
    header = (f"{'size (HxW)':>11} | {'targets/img':>11} | {'step ms':>9} | {'matching ms':>11} | "
              f"{'of which LSA':>12} | {'calls':>5} | {'share':>7} | {'target':>7} | result")
    print(header)
    print("-" * len(header))
    for name, m, step, match, lsa, calls, share, ok in rows:
        print(f"{name:>11} | {m:>11} | {fmt_ms(step)} | {match * 1000:11.2f} | {lsa * 1000:12.2f} | "
              f"{calls:>5} | {100 * share:6.2f}% | {'< %.0f%%' % (100 * args.target_share):>7} | "
              f"{'PASS' if ok else 'FAIL'}")
    return all_pass


# --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--runs", type=int, default=5, help="timed inference runs per model and size (median)")
    p.add_argument("--warmup", type=int, default=2, help="inference warm-up runs per model and size")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 warm-up, 2 runs (inference and training)")
    p.add_argument("--sizes", default="800x1216,512x768",
                   help="inference image sizes HxW, comma separated (default 800x1216,512x768)")
    p.add_argument("--batch", type=int, default=1, help="images per inference call (default 1)")
    p.add_argument("--frcnn-frozen-bn", action="store_true",
                   help="build Faster R-CNN's ResNet with FrozenBatchNorm2d (as the pre-trained model)")
    p.add_argument("--target-ratio", type=float, default=1.00, help="inference target ours/FRCNN (default 1.00)")
    p.add_argument("--train-sizes", default="512",
                   help="short sides for the training-step measurement, comma separated (default 512; "
                        "long side = 1.5x rounded to /32); e.g. 512,800")
    p.add_argument("--targets", default="7,20", help="target boxes per image, comma separated (default 7,20)")
    p.add_argument("--train-batch", type=int, default=2, help="images per training step (default 2)")
    p.add_argument("--train-runs", type=int, default=3, help="timed training steps per setting (median)")
    p.add_argument("--train-warmup", type=int, default=1, help="warm-up training steps per setting")
    p.add_argument("--target-share", type=float, default=0.10, help="matching share target (default 0.10)")
    p.add_argument("--skip-inference", action="store_true")
    p.add_argument("--skip-training", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--omp-passive", action="store_true",
                   help="set OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep instead of spinning); use it "
                        "on a machine shared with other CPU jobs, where spinning threads slow every small op")
    args = p.parse_args(argv)

    if args.quick:
        args.warmup, args.runs = 1, 2
        args.train_warmup, args.train_runs = 1, 2
    args.sizes = [parse_size(s) for s in args.sizes.split(",") if s]
    args.train_sizes = [int(s) for s in args.train_sizes.split(",") if s]
    args.targets = [int(s) for s in args.targets.split(",") if s]

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda requested but CUDA is not available", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    clock = Clock(device)

    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, python {platform.python_version()}")
    print(f"threads: {torch.get_num_threads()} (torch.set_num_threads({args.threads})), "
          f"interop {torch.get_num_interop_threads()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs visible)")
    if device.type == "cuda":
        print(f"device: cuda ({torch.cuda.get_device_name(device)})")
    else:
        print("device: cpu")

    warn_if_busy()
    build_model = import_build_model()
    results = []
    if not args.skip_inference:
        results.append(("inference ours/FRCNN", bench_inference(args, build_model, device, clock)))
    if not args.skip_training:
        results.append(("matching share", bench_training(args, build_model, device, clock)))
    load = load_average()
    if load:
        print(f"\nload average at the end (1/5/15 min): {load}")
    print("\nsummary: " + ", ".join(f"{name} {'PASS' if ok else 'FAIL'}" for name, ok in results))
    return 0 if all(ok for _, ok in results) else 1


if __name__ == "__main__":
    sys.exit(main())
