#!/usr/bin/env python
"""Speed benchmark: TSP-FCOS and TSP-RCNN (R50-FPN) against FCOS and Faster R-CNN, and the matching's
share of a training step (issue 11).

1. Inference latency, batch 1, at 800x1216 and 512x768 (H x W), random weights, 2 threads, all five
   models interleaved run by run on the same pixels (``sparsedet.benchmark``: warm-up, interleaving,
   per-part breakdown, peak memory):
   * ``tsp_fcos/r50_fpn_3x`` vs the project's ``fcos/r50_fpn_1x_coco``     target <= 1.10x
     (and vs torchvision ``fcos_resnet50_fpn(weights=None)``, for information);
   * ``tsp_rcnn/r50_fpn_3x`` vs torchvision ``fasterrcnn_resnet50_fpn(weights=None)``  target <= 1.50x.
   torchvision models get the image / 255 and a transform sized to the image (scale 1.0), see
   ``sparsedet.benchmark.model_candidate``. Every timed run is one round A, B, C, D, E; the summary
   gives the ratio of each round (``per run``) as well as of the medians, so ``--runs 2`` reports
   each comparison twice; ``--repeat`` repeats the whole interleaved measurement.
2. Training step (train mode, batch 2, random boxes, the config's own optimizers and clipping:
   SGD + AdamW for the transformer): the wall time of one step (zero_grad, forward, backward,
   per-group clip, step) and of the matching inside it, by wrapping the functions
   (``sparsedet.benchmark.timed_functions``):
   * TSP-FCOS: the restricted matching (``fcos_losses.restricted_match``; its cost is a few
     element-wise ops on the eligible FoIs, inside the loss); for information the FCOS ground-truth
     assignment of every location (``TSPFCOS._assign``), which is not a matching between predictions
     and GTs.
   * TSP-RCNN: the argmax-IoU matching (``label_proposals``: IoU of every proposal with every GT,
     argmax; ``matching_cost`` and ``restricted_matching``: the per-GT argmin of spec §3.7); for
     information the RPN anchor labelling (the IoU matcher Faster R-CNN has too).
   Target: matching <= 2 % of the step.

Usage::

    PYTHONPATH=src .venv/bin/python benchmarks/tsp_speed.py                # full run (~45 min at load 20)
    PYTHONPATH=src .venv/bin/python benchmarks/tsp_speed.py --quick        # smoke run: 512x768, 1 run, 1 training step
    PYTHONPATH=src .venv/bin/python benchmarks/tsp_speed.py --skip-training --sizes 800x1216
    PYTHONPATH=src .venv/bin/python benchmarks/tsp_speed.py --skip-inference --skip-training --flops   # GFLOPs only

Exit status: 0 when every measured target passes, 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

# OpenMP reads its environment when torch (libgomp) is loaded, so this must precede `import torch`.
if "--omp-passive" in sys.argv:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import torch  # noqa: E402

from sparsedet.benchmark import (Clock, add_timing_arguments, benchmark, format_results, load_average,  # noqa: E402
                                 load_detector, machine_header, model_candidate, parse_size, random_image,
                                 script_device, timed_functions, training_step_times, warn_if_busy)
from sparsedet.config import load_config  # noqa: E402
from sparsedet.engine.optim import build_optimizer  # noqa: E402
from sparsedet.models import build_model  # noqa: E402

TSP_FCOS, FCOS, TV_FCOS = "tsp_fcos/r50_fpn_3x", "fcos/r50_fpn_1x_coco", "tv:fcos_resnet50_fpn"
TSP_RCNN, TV_FRCNN = "tsp_rcnn/r50_fpn_3x", "tv:fasterrcnn_resnet50_fpn"
# (numerator, denominator, target ratio or None = for information)
RATIOS = [(TSP_FCOS, FCOS, 1.10), (TSP_FCOS, TV_FCOS, None), (TSP_RCNN, TV_FRCNN, 1.50)]


def verdict(ok) -> str:
    return "-" if ok is None else ("PASS" if ok else "FAIL")


def random_targets(size: tuple[int, int], num: int, num_classes: int, generator: torch.Generator) -> dict:
    """``num`` random valid xyxy boxes (sides 16 px to the whole image) and labels in [0, C)."""
    h, w = size
    wh = torch.tensor([w, h, w, h], dtype=torch.float32)
    a, b = torch.rand(num, 2, generator=generator), torch.rand(num, 2, generator=generator)
    boxes = torch.cat([torch.minimum(a, b), torch.maximum(a, b)], dim=1) * wh
    boxes[:, 2:] = torch.minimum(torch.maximum(boxes[:, 2:], boxes[:, :2] + 16.0), wh[:2])
    boxes[:, :2] = torch.minimum(boxes[:, :2], boxes[:, 2:] - 16.0)
    return {"boxes": boxes, "labels": torch.randint(0, num_classes, (num,), generator=generator)}


# --------------------------------------------------------------------------------------------
# 1. inference


def bench_inference(args, device) -> tuple[bool, list]:
    torch.manual_seed(args.seed)
    models = {spec: load_detector(spec, device=device) for spec in (TSP_FCOS, FCOS, TV_FCOS, TSP_RCNN, TV_FRCNN)}
    for spec, model in models.items():
        print(f"{spec}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")
    rows, all_ok = [], True
    for size in args.sizes:
        batches = [[random_image(size, args.seed).to(device)]]
        for repeat in range(args.repeat):
            print(f"\n=== inference {size[0]}x{size[1]} (HxW), batch 1, repetition {repeat + 1}/{args.repeat}: "
                  f"{args.warmup} warm-up + {args.runs} interleaved runs; load average {load_average()} ===")
            results = benchmark([model_candidate(m, batches, spec) for spec, m in models.items()],
                                args.warmup, args.runs, device)
            by_name = {r.name: r for r in results}
            print(format_results(results))
            for num, den, target in RATIOS:
                a, b = by_name[num], by_name[den]
                ratio = a.median / b.median
                cpu = statistics.median(a.cpu_times) / statistics.median(b.cpu_times)
                ok = None if target is None else ratio <= target
                all_ok &= ok is not False
                per_run = [x / y for x, y in zip(a.times, b.times)]
                rows.append((f"{size[0]}x{size[1]}", repeat + 1, num, den, a.median, b.median, ratio,
                             a.min / b.min, cpu, target, ok, per_run))
    return all_ok, rows


def print_inference_summary(rows) -> None:
    print("\nsummary of the inference targets (ratio = median / median; per run = ratio within each "
          "interleaved round; min/min and median CPU-time ratios are less sensitive to other load)")
    header = (f"{'size':>9} | rep | {'model':<20} | {'vs':<26} | {'ms':>8} | {'vs ms':>8} | ratio | "
              f"{'per run':<11} | min/min | CPU | target | result")
    print(header)
    print("-" * len(header))
    for size, rep, num, den, a, b, ratio, min_ratio, cpu, target, ok, per_run in rows:
        runs = " ".join(f"{r:.2f}" for r in per_run)
        print(f"{size:>9} | {rep:>3} | {num:<20} | {den:<26} | {1000 * a:8.1f} | {1000 * b:8.1f} | {ratio:5.2f} | "
              f"{runs:<11} | "
              f"{min_ratio:7.2f} | {cpu:4.2f} | {'<= %.2f' % target if target else '-':>6} | {verdict(ok)}")


# --------------------------------------------------------------------------------------------
# 1b. FLOPs (independent of the machine's load)


def count_flops(model, image: torch.Tensor) -> dict[str, float]:
    """GFLOPs of one inference (``torch.utils.flop_counter``: matmuls and convolutions) in total and
    per direct child module (e.g. ``backbone``, ``fcos_head``, ``transformer_encoder``)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model([image])
    root = type(model).__name__
    out = {"total": counter.get_total_flops() / 1e9}
    for name, counts in counter.get_flop_counts().items():
        if name.startswith(root + ".") and name.count(".") == 1:
            out[name.split(".", 1)[1]] = sum(counts.values()) / 1e9
    return out


def print_flops(args, device) -> None:
    print("\n=== GFLOPs of one inference (torch.utils.flop_counter: matmul and convolution FLOPs, "
          "2 per multiply-add; RoIAlign/NMS not counted) ===")
    torch.manual_seed(args.seed)
    models = {spec: load_detector(spec, device=device) for spec in (TSP_FCOS, FCOS)}
    for size in args.sizes:
        image = random_image(size, args.seed).to(device)
        flops = {spec: count_flops(model, image) for spec, model in models.items()}
        parts = ", ".join(f"{k} {v:.1f}" for k, v in flops[TSP_FCOS].items() if k != "total")
        print(f"{size[0]}x{size[1]}: {TSP_FCOS} {flops[TSP_FCOS]['total']:.1f} ({parts}); "
              f"{FCOS} {flops[FCOS]['total']:.1f}; ratio {flops[TSP_FCOS]['total'] / flops[FCOS]['total']:.2f}")


# --------------------------------------------------------------------------------------------
# 2. matching share of a training step


def matching_functions():
    """name -> (owner, attribute) pairs to time, per model; names starting with '(' are for information."""
    from sparsedet.models.tsp import fcos_detector, fcos_losses, rcnn_detector, rcnn_losses, rcnn_proposal_sampling

    return {
        TSP_FCOS: {"restricted matching": [(fcos_losses, "restricted_match")],
                   "(FCOS assignment of every location)": [(fcos_detector.TSPFCOS, "_assign")]},
        TSP_RCNN: {"argmax-IoU matching": [(rcnn_proposal_sampling, "label_proposals"),
                                           (rcnn_losses, "matching_cost"), (rcnn_losses, "restricted_matching")],
                   "(RPN anchor labelling)": [(rcnn_detector, "label_rpn_anchors")]},
    }


def bench_training(args, device, clock) -> tuple[bool, list]:
    rows, all_ok = [], True
    size = args.train_size
    images = [random_image(size, args.seed + 10 + i).to(device) for i in range(args.train_batch)]
    for spec, functions in matching_functions().items():
        torch.manual_seed(args.seed)
        config = load_config(spec)
        model = build_model(config).train().to(device)
        optimizer = build_optimizer(model, config.get("solver", {}))
        full_clip = (config.get("solver") or {}).get("clip_grad_norm")
        for num_targets in args.targets:
            gen = torch.Generator().manual_seed(args.seed + num_targets)
            targets = [{k: v.to(device) for k, v in random_targets(size, num_targets, 80, gen).items()}
                       for _ in range(args.train_batch)]

            def step():
                optimizer.zero_grad(set_to_none=True)
                losses = model(images, targets)
                loss = sum(losses.values())
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{spec}: non-finite loss {float(loss)}")
                loss.backward()
                optimizer.clip_grad_norms()
                if full_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), float(full_clip))
                optimizer.step()

            with timed_functions(functions, clock) as totals:
                steps = training_step_times(step, totals, args.train_warmup, args.train_runs, clock)
            step_s = statistics.median(s for s, _ in steps)
            for name in functions:
                seconds = statistics.median(t.get(name, 0.0) for _, t in steps)
                share = statistics.median(t.get(name, 0.0) / s for s, t in steps)
                info = name.startswith("(")
                ok = None if info else share <= args.target_share
                all_ok &= ok is not False
                rows.append((spec, num_targets, step_s, name, seconds, share, ok))
        del model, optimizer
    return all_ok, rows


def print_training_summary(args, rows) -> None:
    size = args.train_size
    print(f"\n=== training step ({size[0]}x{size[1]}, batch {args.train_batch}, 80 classes, random boxes; "
          f"{args.train_warmup} warm-up + median of {args.train_runs} steps; load average {load_average()}) ===")
    header = (f"{'model':<20} | {'GT/img':>6} | {'step ms':>8} | {'timed function(s)':<36} | {'ms':>8} | "
              f"{'share':>7} | {'target':>6} | result")
    print(header)
    print("-" * len(header))
    for spec, m, step, name, seconds, share, ok in rows:
        target = "-" if ok is None else f"<= {100 * args.target_share:.0f}%"
        print(f"{spec:<20} | {m:>6} | {1000 * step:8.1f} | {name:<36} | {1000 * seconds:8.2f} | "
              f"{100 * share:6.2f}% | {target:>6} | {verdict(ok)}")


# --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_timing_arguments(p, runs=2, warmup=1)
    p.add_argument("--sizes", default="800x1216,512x768", help="inference sizes HxW (default 800x1216,512x768)")
    p.add_argument("--repeat", type=int, default=1, help="repetitions of the whole interleaved measurement (default 1)")
    p.add_argument("--train-size", default="512x768", help="training-step image size HxW (default 512x768)")
    p.add_argument("--train-batch", type=int, default=2, help="images per training step (default 2)")
    p.add_argument("--targets", default="20", help="random GT boxes per image, comma separated (default 20)")
    p.add_argument("--train-runs", type=int, default=2, help="timed training steps per setting (default 2)")
    p.add_argument("--train-warmup", type=int, default=1, help="warm-up training steps per setting (default 1)")
    p.add_argument("--target-share", type=float, default=0.02, help="matching share target (default 0.02)")
    p.add_argument("--skip-inference", action="store_true")
    p.add_argument("--skip-training", action="store_true")
    p.add_argument("--flops", action="store_true", help="also count the GFLOPs of TSP-FCOS and FCOS at --sizes")
    p.add_argument("--quick", action="store_true", help="smoke run: 512x768, 1 run, 1 training step, 7 boxes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--omp-passive", action="store_true", help="set OMP_WAIT_POLICY=PASSIVE (shared machines)")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.repeat, args.runs, args.train_runs, args.targets = "512x768", 1, 1, 1, "7"
    args.sizes = [parse_size(s) for s in args.sizes.split(",") if s]
    args.train_size = parse_size(args.train_size)
    args.targets = [int(s) for s in args.targets.split(",") if s]

    device = script_device(args)
    if device is None:
        return 2
    clock = Clock(device)
    print(machine_header(device))
    warn_if_busy()
    results = []
    if not args.skip_inference:
        ok, inference_rows = bench_inference(args, device)
        results.append(("inference ratios", ok))
    if args.flops:
        print_flops(args, device)
    if not args.skip_training:
        ok, training_rows = bench_training(args, device, clock)
        results.append(("matching share", ok))
    if not args.skip_inference:
        print_inference_summary(inference_rows)
    if not args.skip_training:
        print_training_summary(args, training_rows)
    print(f"\nload average at the end (1/5/15 min): {load_average()}")
    print("summary: " + ", ".join(f"{name} {'PASS' if ok else 'FAIL'}" for name, ok in results))
    return 0 if all(ok for _, ok in results) else 1


if __name__ == "__main__":
    sys.exit(main())
