#!/usr/bin/env python
"""Speed benchmark: QueryDet Cascade Sparse Query (CSQ) vs dense high-resolution inference.

One run, same inputs, eval mode, ``torch.inference_mode()``, batch ``--batch`` (default 1),
``--threads`` (default 2):

1. Whole-model latency at long side 1333 (``800x1333``) and 2000 (``1200x2000``), for the ResNet-50
   and MobileNetV2 backbones (``querydet/r50_fpn_1x_coco`` and ``retinanet/r50_fpn_1x_coco`` recipes,
   random init, 256-channel 4-conv heads; MobileNetV2 swaps the backbone only):
   * QueryDet dense-P2 (``model.csq.enabled=false``; the paper's "QueryDet without CSQ");
   * QueryDet CSQ (same model and weights, ``model.csq.enabled=true``, default sigma/context);
   * our RetinaNet without P2 (P3..P7);
   * torchvision ``retinanet_resnet50_fpn(weights=None, weights_backbone=None)`` (ResNet-50 only), built
     with ``min_size``/``max_size`` = the image's sides so that it does not resize (scale 1.0).
   Warm-up runs, then the median of ``--runs`` runs, the models interleaved run by run.
2. Head + post-processing alone (backbone + FPN computed once, outside the timer): QueryDet
   dense-P2 (det head on P2..P7, top-k, NMS) vs CSQ (dense query head on P4, det head on P4..P7,
   cascade on P3/P2, top-k, NMS).
3. Speed-up as a function of the share of P2 + P3 positions evaluated (``--sweep``, default 1, 5,
   10, 25 %), head + post-processing, ResNet-50 at the first size.

Controlling the active share. A random-weight query head fires everywhere or nowhere, which makes
CSQ timings meaningless. Before timing CSQ, the script sets the bias of the query predictor by
bisection so that the cascade evaluates the target share (``--share``, default 5 %) of the P2 + P3
positions (active sites / positions, as ``model.last_csq.stats()["share"]``); the measured share is
printed with every CSQ figure. On random images the queries are scattered rather than clustered
around objects, so their context windows overlap less than on real images: a pessimistic case for
CSQ at a given share. COCO images typically need ~1-5 %, VisDrone more.

Targets (printed with PASS/FAIL): CSQ >= 3x faster than dense-P2 on head + post-processing,
>= 2x on the whole model, and the whole CSQ model no slower than RetinaNet without P2.

``--checkpoint PATH`` measures a trained QueryDet (``sparsedet.load``) with its own query head
(no bias calibration): on the images of ``--images DIR`` (resized to the config's test scale;
mean of per-image latency, dense vs CSQ, and the mean share), or on random images otherwise.

Usage::

    .venv/bin/python benchmarks/querydet_speed.py --quick     # smoke run: small image, 1 warm-up, 2 runs
    .venv/bin/python benchmarks/querydet_speed.py             # full run (long: dense P2 at 2000 px)
    .venv/bin/python benchmarks/querydet_speed.py --sizes 800x1333 --backbones resnet50 --runs 5
    .venv/bin/python benchmarks/querydet_speed.py --device cuda
    .venv/bin/python benchmarks/querydet_speed.py --device cuda --batch 8   # GPUs are launch-bound at batch 1
    .venv/bin/python benchmarks/querydet_speed.py --checkpoint querydet.pth --images val2017/ --max-images 50

Exit status: 0 when every measured target passes, 1 otherwise.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Callable

# OpenMP reads its environment when torch (libgomp) is loaded, so this must precede `import torch`.
if "--omp-passive" in sys.argv:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import torch  # noqa: E402
import torchvision  # noqa: E402

from sparsedet import build_model as sparsedet_build_model  # noqa: E402
from sparsedet.benchmark import (Clock, add_timing_arguments, cpu_model, load_average, parse_size,  # noqa: E402
                                 random_image, script_device, warn_if_busy)
from sparsedet.benchmark import median_times as harness_median_times  # noqa: E402

BACKBONES = {"resnet50": [], "mobilenet_v2": ["model.backbone.name=mobilenet_v2"]}
COMMON = ["model.backbone.weights=null"]


# --------------------------------------------------------------------------------------------
# helpers


def median_times(fns: dict[str, Callable[[], object]], warmup: int, runs: int, clock: Clock) -> dict[str, list[float]]:
    """Runs every function ``warmup`` times, then ``runs`` times interleaved; seconds per run
    (``sparsedet.benchmark``'s harness, on the clock's device)."""
    return harness_median_times(fns, warmup, runs, "cuda" if clock.cuda else "cpu")


def med(values: list[float]) -> float:
    return statistics.median(values)


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:10.1f}"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


class QueryDetPair:
    """One QueryDet (random init) run dense or with CSQ; the CSQ share is set via the query bias."""

    def __init__(self, build_model, backbone: str, device: torch.device, seed: int):
        torch.manual_seed(seed)
        self.model = build_model("querydet/r50_fpn_1x_coco", COMMON + BACKBONES[backbone]).eval().to(device)
        self.bias = self.model.query_head.predictors[0].bias

    @torch.inference_mode()
    def run(self, images, csq: bool):
        self.model.cfg.csq.enabled = csq
        return self.model(images)

    @torch.inference_mode()
    def features(self, images):
        batch, sizes = self.model.preprocess(images)
        return self.model.backbone(batch), sizes

    @torch.inference_mode()
    def head_and_post(self, features, sizes, csq: bool):
        self.model.cfg.csq.enabled = csq
        return self.model.postprocess(self.model.inference_levels(features, sizes), sizes)

    @torch.inference_mode()
    def share_for_bias(self, features, bias: float) -> float:
        """Share of P2 + P3 positions the cascade evaluates with this query bias (query towers only)."""
        from sparsedet.models.csq import cascade_sparse_query
        m, csq = self.model, self.model.cfg.csq
        with torch.no_grad():
            self.bias.fill_(bias)
        sparse = sorted((lvl for lvl in m.levels if lvl < csq.start_level), reverse=True)
        out = cascade_sparse_query({lvl: features[f"p{lvl}"] for lvl in [csq.start_level] + sparse},
                                   m.query_head, [], sparse, **{k: getattr(csq, k) for k in
                                                                ("start_level", "threshold", "context", "method")})
        return out.stats()["share"]

    def calibrate(self, features, target: float, iterations: int = 20) -> float:
        """Bisection on the query predictor's bias; returns the share reached."""
        # Random-init logits can be huge (ResNet) or ~1e-6 (MobileNetV2): first scale the query
        # predictor so that the start level's logits have unit spread, then bracket the bias by their
        # range. Only the query predictor changes; the detection heads keep their random weights.
        with torch.inference_mode():
            self.bias.zero_()
            predictor = self.model.query_head.predictors[0]
            q = self.model.query_head(features[f"p{self.model.cfg.csq.start_level}"])[0]
            std = float(q.std())
            if math.isfinite(std) and std > 0:
                predictor.weight.div_(std)
                q = q / std
            span = 2.0 * float(q.abs().max()) + 20.0
        lo, hi = -span, span
        for _ in range(iterations):
            mid = (lo + hi) / 2
            if self.share_for_bias(features, mid) < target:
                lo = mid
            else:
                hi = mid
        # Of the two brackets, keep the bias whose share is closest to the target.
        best = min((lo, hi), key=lambda b: abs(self.share_for_bias(features, b) - target))
        return self.share_for_bias(features, best)


@torch.inference_mode()
def head_breakdown(pair: QueryDetPair, features, sizes, warmup: int, runs: int, clock: Clock) -> None:
    """Median ms of the parts of head + post-processing, dense-P2 vs CSQ."""
    from sparsedet.models.csq import anchor_level_outputs, cascade_sparse_query
    m = pair.model
    csq = m.cfg.csq
    sparse = sorted((lvl for lvl in m.levels if lvl < csq.start_level), reverse=True)
    upper = [lvl for lvl in m.levels if lvl >= csq.start_level]
    state = {}

    def cascade():
        state["out"] = cascade_sparse_query(
            {lvl: features[f"p{lvl}"] for lvl in [csq.start_level] + sparse}, m.query_head,
            [m.head.cls_tower, m.head.box_tower], sparse, start_level=csq.start_level,
            threshold=csq.threshold, context=csq.context, method=csq.method)

    def to_rows():
        state["rows"] = anchor_level_outputs(state["out"], m.anchor_generator, m.num_classes, 1)

    def upper_dense():
        state["upper"] = m.dense_levels(features, upper)

    def all_dense():
        state["all"] = m.dense_levels(features)

    from sparsedet.models.dense.postprocess import LevelOutputs
    parts = {
        "CSQ: cascade (query P4 + sparse P3/P2)": cascade,
        "CSQ: sparse rows -> anchors": to_rows,
        "CSQ: dense det head P4..P7": upper_dense,
        "CSQ: post-processing": lambda: m.postprocess(
            [[LevelOutputs(*r) for r in state["rows"][0]] + state["upper"][0]], sizes),
        "dense: det head P2..P7": all_dense,
        "dense: post-processing": lambda: m.postprocess(state["all"], sizes),
    }
    times = median_times(parts, warmup, runs, clock)
    print("head + post-processing breakdown (median ms):")
    for name, ts in times.items():
        print(f"  {name:<42} {fmt_ms(med(ts))}")


def profile_head(pair: QueryDetPair, features, sizes, device: torch.device, rows: int = 14) -> None:
    """torch.profiler tables (top ops by self CPU time) of head + post-processing, CSQ and dense."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for name, csq in (("CSQ", True), ("dense-P2", False)):
        pair.head_and_post(features, sizes, csq=csq)
        with profile(activities=activities) as prof:
            for _ in range(3):
                pair.head_and_post(features, sizes, csq=csq)
            if device.type == "cuda":
                torch.cuda.synchronize()
        print(f"profile of 3 x head + post-processing, {name}:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40))


def build_tv_retinanet(size: tuple[int, int], device: torch.device):
    from torchvision.models.detection import retinanet_resnet50_fpn
    h, w = size
    return retinanet_resnet50_fpn(weights=None, weights_backbone=None, min_size=min(h, w),
                                  max_size=max(h, w)).eval().to(device)


# --------------------------------------------------------------------------------------------
# operator counts

# Ops that only make a view or an allocation: they launch no kernel on a GPU.
METADATA_OPS = {
    "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::_unsafe_view", "aten::permute", "aten::select",
    "aten::slice", "aten::as_strided", "aten::expand", "aten::unsqueeze", "aten::squeeze", "aten::t",
    "aten::transpose", "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::resize_", "aten::detach",
    "aten::alias", "aten::lift_fresh", "aten::unbind", "aten::split", "aten::split_with_sizes", "aten::chunk",
    "aten::narrow", "aten::flatten", "aten::view_as", "aten::expand_as", "aten::result_type", "aten::unflatten",
    "aten::squeeze_", "aten::unsqueeze_", "aten::_has_compatible_shallow_copy_type", "aten::set_",
}
# Ops that make the host wait for the device (the result's size or value is read on the host).
SYNC_OPS = {"aten::nonzero", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::unique", "aten::_unique2",
            "aten::masked_select", "aten::nonzero_static", "aten::equal"}


def _is_op(name: str) -> bool:
    return name.startswith(("aten::", "torchvision::"))


def count_ops(fn) -> dict:
    """Runs ``fn`` under torch.profiler (CPU) and counts the operators Python dispatched, i.e. the
    outermost ATen / torchvision ops (an op's own sub-ops, like the CPU internals of ``index`` or
    ``nms``, are not counted): per enclosing ``csq.*`` record_function range (the cascade's levels)
    and in total. This is what a GPU run launches, about one kernel or a few per op.

    Returns ``{range: {"ops": operators, "kernels": operators that are not views/allocations,
    "syncs": operators that synchronise a GPU (nonzero, item, unique, ...)}}``; range "total"
    covers the whole call.
    """
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts: dict = {}

    def add(key, name):
        entry = counts.setdefault(key, {"ops": 0, "kernels": 0, "syncs": 0})
        entry["ops"] += 1
        entry["kernels"] += name not in METADATA_OPS
        entry["syncs"] += name in SYNC_OPS

    for event in prof.events():
        if not _is_op(event.name):
            continue
        parent, label = event.cpu_parent, None
        while parent is not None and not _is_op(parent.name):
            if label is None and parent.name.startswith("csq."):
                label = parent.name
            parent = parent.cpu_parent
        if parent is not None:         # called by another op: part of that op
            continue
        add("total", event.name)
        if label is not None:
            add(label, event.name)
    return counts


def bench_count_ops(args, build_model, device) -> None:
    """Operator counts of one CSQ inference: per cascade level and in the whole model."""
    backbone, size = args.backbones[0], args.sizes[0]
    pair = QueryDetPair(build_model, backbone, device, args.seed)
    images = [random_image(size, args.seed + i).to(device) for i in range(args.batch)]
    features, sizes = pair.features(images)
    share = pair.calibrate(features, args.share)
    pair.run(images, csq=True)                       # warm-up (weight layout caches)
    stats = pair.model.last_csq.stats()
    print(f"\n=== operators launched by one CSQ inference ({backbone}, {size[0]}x{size[1]}, batch {args.batch}, "
          f"{100 * share:.2f} % of P2+P3 evaluated; torch.profiler, CPU) ===")
    print("P{} {} queries; ".format(stats["start_level"], stats["start_queries"]) + ", ".join(
        f"P{lvl}: {e['queries']} queries, {e['active']} active" for lvl, e in stats["levels"].items()))
    parts = {"whole model (CSQ)": count_ops(lambda: pair.run(images, csq=True)),
             "head + post-processing (CSQ)": count_ops(lambda: pair.head_and_post(features, sizes, csq=True)),
             "whole model (dense-P2)": count_ops(lambda: pair.run(images, csq=False))}
    print(f"{'range':<44} | {'operators':>9} | {'kernels':>8} | {'syncs':>5}")
    print("-" * 75)
    whole = parts["whole model (CSQ)"]
    for key in sorted(k for k in whole if k.startswith("csq.")):
        e = whole[key]
        print(f"{'  ' + key:<44} | {e['ops']:9d} | {e['kernels']:8d} | {e['syncs']:5d}")
    for name, counts in parts.items():
        e = counts["total"]
        print(f"{name:<44} | {e['ops']:9d} | {e['kernels']:8d} | {e['syncs']:5d}")


# --------------------------------------------------------------------------------------------
# 1 + 2: models


def bench_models(args, build_model, device, clock) -> bool:
    all_ok = True
    summary = []
    for backbone in args.backbones:
        pair = QueryDetPair(build_model, backbone, device, args.seed)
        torch.manual_seed(args.seed)
        retina = build_model("retinanet/r50_fpn_1x_coco", COMMON + BACKBONES[backbone]).eval().to(device)
        for size in args.sizes:
            print(f"\n--- {backbone}, {size[0]}x{size[1]} (HxW), batch {args.batch} ---")
            images = [random_image(size, args.seed + i).to(device) for i in range(args.batch)]
            features, sizes = pair.features(images)
            share = pair.calibrate(features, args.share)
            print(f"query bias {float(pair.bias.detach()):+.4g} -> CSQ evaluates {100 * share:.2f} % of P2+P3 positions "
                  f"(target {100 * args.share:.1f} %)")
            fns = {
                "QueryDet dense-P2": lambda: pair.run(images, csq=False),
                "QueryDet CSQ": lambda: pair.run(images, csq=True),
                "RetinaNet (P3-P7)": torch.inference_mode()(lambda: retina(images)),
            }
            if backbone == "resnet50" and not args.skip_torchvision:
                tv = build_tv_retinanet(size, device)
                tv_images = [image / 255.0 for image in images]
                fns["torchvision RetinaNet"] = torch.inference_mode()(lambda: tv(tv_images))
            whole = median_times(fns, args.warmup, args.runs, clock)
            stats = pair.model.last_csq.stats()
            head = median_times({"dense-P2": lambda: pair.head_and_post(features, sizes, csq=False),
                                 "CSQ": lambda: pair.head_and_post(features, sizes, csq=True)},
                                args.warmup, args.runs, clock)
            if args.breakdown:
                head_breakdown(pair, features, sizes, args.warmup, args.runs, clock)
            if args.profile:
                profile_head(pair, features, sizes, device)
            dense_w, csq_w, retina_w = med(whole["QueryDet dense-P2"]), med(whole["QueryDet CSQ"]), med(whole["RetinaNet (P3-P7)"])
            dense_h, csq_h = med(head["dense-P2"]), med(head["CSQ"])
            print(f"{'model':<24} | {'whole ms':>10} | {'head+post ms':>12}")
            print("-" * 54)
            for name, times in whole.items():
                hp = {"QueryDet dense-P2": dense_h, "QueryDet CSQ": csq_h}.get(name)
                print(f"{name:<24} | {fmt_ms(med(times))} | {fmt_ms(hp) if hp is not None else '':>12}")
            levels = ", ".join(f"P{lvl}: {e['queries']} queries -> {e['children']} children, {e['active']} active "
                               f"of {e['positions']} ({100 * e['share']:.2f} %)" for lvl, e in stats["levels"].items())
            print(f"CSQ: P{stats['start_level']} {stats['start_queries']} queries; {levels}")
            checks = [
                ("head+post dense-P2 / CSQ", dense_h / csq_h, ">= 3.00", dense_h / csq_h >= 3.0),
                ("whole dense-P2 / CSQ", dense_w / csq_w, ">= 2.00", dense_w / csq_w >= 2.0),
                ("whole CSQ / RetinaNet", csq_w / retina_w, "<= 1.00", csq_w / retina_w <= 1.0),
            ]
            for name, value, target, ok in checks:
                print(f"  {name:<26} {value:6.2f}  (target {target})  {verdict(ok)}")
                all_ok &= ok
                summary.append((backbone, size, name, value, target, ok, share))
    if summary:
        print("\nsummary of targets")
        print(f"{'backbone':<13} | {'size':>9} | {'share':>6} | {'ratio':<26} | {'value':>6} | {'target':>7} | result")
        print("-" * 88)
        for backbone, size, name, value, target, ok, share in summary:
            print(f"{backbone:<13} | {size[0]:>4}x{size[1]:<4} | {100 * share:5.2f}% | {name:<26} | {value:6.2f} | "
                  f"{target:>7} | {verdict(ok)}")
    return all_ok


# --------------------------------------------------------------------------------------------
# 3: share sweep


def bench_sweep(args, build_model, device, clock) -> None:
    size = args.sizes[0]
    backbone = args.backbones[0]
    print(f"\n=== 3. Speed-up vs share of P2+P3 positions evaluated ({backbone}, {size[0]}x{size[1]}, "
          f"head + post-processing) ===")
    pair = QueryDetPair(build_model, backbone, device, args.seed)
    images = [random_image(size, args.seed + i).to(device) for i in range(args.batch)]
    features, sizes = pair.features(images)
    dense = med(median_times({"d": lambda: pair.head_and_post(features, sizes, csq=False)},
                             args.warmup, args.runs, clock)["d"])
    print(f"dense-P2 head+post: {dense * 1000:.1f} ms")
    print(f"{'target':>7} | {'share':>7} | {'P3 share':>8} | {'P2 share':>8} | {'CSQ ms':>10} | {'speed-up':>8}")
    print("-" * 64)
    for target in args.sweep:
        share = pair.calibrate(features, target)
        t = med(median_times({"c": lambda: pair.head_and_post(features, sizes, csq=True)},
                             args.warmup, args.runs, clock)["c"])
        lv = pair.model.last_csq.stats()["levels"]
        print(f"{100 * target:6.1f}% | {100 * share:6.2f}% | {100 * lv[3]['share']:7.2f}% | "
              f"{100 * lv[2]['share']:7.2f}% | {fmt_ms(t)} | {dense / t:7.2f}x")


# --------------------------------------------------------------------------------------------
# checkpoint mode


def bench_checkpoint(args, device, clock) -> None:
    import sparsedet
    from sparsedet.data.image_io import read_image
    from sparsedet.data.transforms import resize_shortest_edge

    model = sparsedet.load(args.checkpoint, device=device)
    if not hasattr(model, "query_head") or model.query_head is None:
        raise SystemExit(f"{args.checkpoint} is not a QueryDet checkpoint with a query head")
    print(f"\n=== trained QueryDet {args.checkpoint}: dense-P2 vs CSQ "
          f"(sigma {model.cfg.csq.threshold}, context {model.cfg.csq.context}, method {model.cfg.csq.method}) ===")
    if args.images:
        paths = sorted(p for p in Path(args.images).iterdir()
                       if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp"))[:args.max_images]
        if not paths:
            raise SystemExit(f"no images in {args.images}")
        inp = getattr(model, "config", {}).get("input", {})
        short, long_ = inp.get("min_size_test", 800), inp.get("max_size_test", 1333)
        images = [resize_shortest_edge(read_image(p), short, long_) for p in paths]
        print(f"{len(images)} images from {args.images}, resized to short side {short}, long side <= {long_}")
    else:
        images = [random_image(s, args.seed + i) for i, s in enumerate(args.sizes)]
        print("no --images: random images (the trained query head decides the share)")
    infer = torch.inference_mode()(lambda im: model([im]))
    dense_t, csq_t, shares = [], [], []
    for k, image in enumerate(images):
        image = image.to(device)
        for csq in (False, True):           # warm-up on the first image
            model.cfg.csq.enabled = csq
            if k == 0:
                infer(image)
        for csq, out in ((False, dense_t), (True, csq_t)):
            model.cfg.csq.enabled = csq
            start = clock()
            infer(image)
            out.append(clock() - start)
        shares.append(model.last_csq.stats()["share"])
    # Per-image FPS averaged, as the paper reports (spec section 4.3), and mean latency.
    fps = lambda ts: statistics.mean(1.0 / t for t in ts)  # noqa: E731
    print(f"{'mode':<10} | {'mean ms':>9} | {'mean FPS':>8}")
    for name, ts in (("dense-P2", dense_t), ("CSQ", csq_t)):
        print(f"{name:<10} | {statistics.mean(ts) * 1000:9.1f} | {fps(ts):8.2f}")
    print(f"CSQ / dense speed-up (mean FPS ratio): {fps(csq_t) / fps(dense_t):.2f}x; "
          f"mean share of P2+P3 positions evaluated {100 * statistics.mean(shares):.2f} %")


# --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_timing_arguments(p, runs=3, warmup=1)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: one 384x640 image, 1 warm-up, 2 runs, sweep 5 and 25 %%")
    p.add_argument("--sizes", default="800x1333,1200x2000", help="image sizes HxW (default 800x1333,1200x2000)")
    p.add_argument("--backbones", default="resnet50,mobilenet_v2", help="resnet50 and/or mobilenet_v2")
    p.add_argument("--share", type=float, default=0.05,
                   help="share of P2+P3 positions CSQ evaluates in sections 1-2 (default 0.05)")
    p.add_argument("--sweep", default="0.01,0.05,0.10,0.25", help="shares for section 3")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the parts of head + post-processing (cascade, dense upper levels, NMS)")
    p.add_argument("--profile", action="store_true", help="print torch.profiler tables of head + post-processing")
    p.add_argument("--count-ops", action="store_true",
                   help="only count the operators one CSQ inference launches (per cascade level and whole model; "
                        "first backbone and size)")
    p.add_argument("--skip-models", action="store_true", help="skip sections 1-2")
    p.add_argument("--skip-sweep", action="store_true", help="skip section 3")
    p.add_argument("--skip-torchvision", action="store_true", help="no torchvision RetinaNet")
    p.add_argument("--checkpoint", help="a trained QueryDet checkpoint: measure it instead of random models")
    p.add_argument("--images", help="with --checkpoint: a folder of images")
    p.add_argument("--max-images", type=int, default=20, help="with --images: at most this many (default 20)")
    p.add_argument("--batch", type=int, default=1,
                   help="images per call in sections 1-3 (default 1; the share is over the whole batch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--omp-passive", action="store_true",
                   help="set OMP_WAIT_POLICY=PASSIVE (for machines shared with other CPU jobs)")
    args = p.parse_args(argv)

    if args.quick:
        args.warmup, args.runs = 1, 2
        args.sizes = "384x640"
        args.sweep = "0.05,0.25"
    args.sizes = [parse_size(s) for s in args.sizes.split(",") if s]
    args.backbones = [b for b in args.backbones.split(",") if b]
    unknown = [b for b in args.backbones if b not in BACKBONES]
    if unknown:
        p.error(f"unknown backbones {unknown}; choose from {sorted(BACKBONES)}")
    args.sweep = [float(s) for s in args.sweep.split(",") if s]
    if args.batch < 1:
        p.error(f"--batch must be >= 1, got {args.batch}")

    device = script_device(args)
    if device is None:
        return 2
    clock = Clock(device)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, python {platform.python_version()}")
    print(f"threads: {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs visible)")
    print(f"device: {'cuda (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else 'cpu'}")
    if device.type == "cpu":
        warn_if_busy()

    # Models are built outside inference_mode (their parameters stay normal tensors, so the sparse
    # path can cache its weight layouts); every timed call runs under torch.inference_mode().
    ok = True
    if args.checkpoint:
        bench_checkpoint(args, device, clock)
    else:
        build_model = sparsedet_build_model
        if args.count_ops:
            bench_count_ops(args, build_model, device)
            args.skip_models = args.skip_sweep = True
        if not args.skip_models:
            print(f"\n=== 1-2. Latency (batch {args.batch}, {args.warmup} warm-up + median of {args.runs} runs) ===")
            ok = bench_models(args, build_model, device, clock)
        if not args.skip_sweep:
            bench_sweep(args, build_model, device, clock)
    load = load_average()
    if load:
        print(f"\nload average at the end (1/5/15 min): {load}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
