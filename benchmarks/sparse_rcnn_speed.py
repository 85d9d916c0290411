#!/usr/bin/env python
"""Speed benchmark: Sparse R-CNN R50-FPN (sparsedet) vs torchvision Faster R-CNN R50-FPN.

Two measurements, in one run, on the same inputs:

1. Inference latency (eval mode, ``torch.inference_mode()``) of
   ``sparsedet.build_model("sparse_rcnn/r50_fpn_100pro_3x")`` (100 proposals) against
   ``torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)``
   at short side 800 and 512 (default sizes ``800x1216`` and ``512x768``, H x W). Warm-up runs,
   then the median of ``--runs`` runs, the two models interleaved run by run. Target: ours/FRCNN
   <= 1.00. Also a breakdown of both models (preprocess / backbone+FPN / head / postprocess) taken
   with forward hooks (the hooks only read the clock; they do not change the model). Warm-up,
   interleaving and breakdown are ``sparsedet.benchmark``'s, the harness ``sparsedet bench`` uses.

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
import os
import platform
import statistics
import sys
import time

# OpenMP reads its environment when torch (libgomp) is loaded, so this must precede `import torch`.
if "--omp-passive" in sys.argv:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import torch  # noqa: E402
import torchvision  # noqa: E402

from sparsedet import build_model as sparsedet_build_model  # noqa: E402
from sparsedet.benchmark import (Candidate, Clock, Measure, Part, add_timing_arguments, benchmark,  # noqa: E402
                                 cpu_model, default_parts, format_results, load_average, parse_size,
                                 random_image, script_device, warn_if_busy)


# --------------------------------------------------------------------------------------------
# helpers (clock, machine report, random images and the timing harness come from sparsedet.benchmark)


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


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:9.1f}"


# --------------------------------------------------------------------------------------------
# 1. inference


def build_frcnn(size: tuple[int, int], frozen_bn: bool, device: torch.device, state=None):
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
    rows, reports = [], []
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
        images = [random_image(size, args.seed + i).to(device) for i in range(args.batch)]
        images01 = [img / 255.0 for img in images]  # torchvision detection models expect 0-1

        # The shared harness: warm-up, then the two models interleaved run by run, hooks that stamp
        # the end of each part (they only read the clock).
        ours_c = Candidate("Sparse R-CNN (ours)", lambda: ours(images), len(images), default_parts(ours),
                           [Measure("RoIAlign pooler", [ours.head.pooler]),
                            Measure("stage modules", list(ours.head.head_series))])
        frcnn_c = Candidate("Faster R-CNN", lambda: frcnn(images01), len(images),
                            [Part("transform (normalise, resize x1.0, pad)", [frcnn.transform]),
                             Part("backbone+FPN", [frcnn.backbone]), Part("RPN (head, decode, NMS)", [frcnn.rpn]),
                             Part("RoI heads (pool, MLP, NMS)", [frcnn.roi_heads])])
        ours_r, frcnn_r = benchmark([ours_c, frcnn_c], args.warmup, args.runs, device)
        del frcnn

        ratio = ours_r.median / frcnn_r.median
        cpu_ratio = statistics.median(ours_r.cpu_times) / statistics.median(frcnn_r.cpu_times)
        ok = ratio <= args.target_ratio
        all_pass &= ok
        rows.append((f"{size[0]}x{size[1]}", ours_r.median, frcnn_r.median, ratio, ok, cpu_ratio,
                     ours_r.min / frcnn_r.min))
        reports.append((f"{size[0]}x{size[1]}", format_results([ours_r, frcnn_r])))

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

    for name, report in reports:
        print(f"\nat {name} (sparsedet.benchmark: ratio to ours, peak memory, breakdown):")
        print(report)
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
            images = [random_image(size, args.seed + 10 + i).to(device) for i in range(args.train_batch)]
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
    add_timing_arguments(p, runs=5, warmup=2)
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

    device = script_device(args)
    if device is None:
        return 2
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
    build_model = sparsedet_build_model
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
