#!/usr/bin/env python
"""Speed benchmark: ASAG-D (deformable encoder + Deformable-DETR heads, spec §3.3 reconstruction)
against ASAG-A, and the multi-scale deformable attention's share and memory.

1. Latency (eval, ``torch.inference_mode()``, batch 1, random init, the two models interleaved run
   by run through ``sparsedet.benchmark``) of ``asag/d_r50_300q_3x`` and ``asag/a_r50_fpn_300q_3x``
   (both R-50, setting 300, one test head) at 800x1216 and 512x768 (H x W). Parts: preprocess /
   backbone body / neck (FPN or deformable encoder) / anchor generator / relation block / decoder
   head / post-processing. "Of which" lines: the time inside every ``MSDeformAttn`` module (encoder
   and head), and inside the encoder's ones alone.
   Random init: the number of anchors (hence the head's cost) depends on the anchor scores; both
   models share the generator's architecture and seed, so they see comparable anchor counts
   (printed per size).

2. Memory of one deformable attention call of the encoder at 800x1333 (padded 800x1344: 22,323
   tokens over 4 levels, d 256, 8 heads, 4 points): the peak process memory above the memory in use
   before the call (the harness's ``PeakMemory``, i.e. RSS on CPU, CUDA max-allocated on a GPU),
   next to the sizes of the tensors the call creates, computed from their shapes.

Usage: ``python benchmarks/asag_d_speed.py [--threads 2] [--runs 3] [--sizes 800x1216,512x768] [--quick]``
"""
from __future__ import annotations

import argparse
import sys

import torch

from sparsedet.benchmark import (Measure, Part, PeakMemory, benchmark, format_results, load_average, machine_header,
                                 model_candidate, parse_size, random_image)
from sparsedet.layers.deformable_attention import MSDeformAttn
from sparsedet.models import build_model

CONFIGS = {"ASAG-D": "asag/d_r50_300q_3x", "ASAG-A": "asag/a_r50_fpn_300q_3x"}


def asag_parts(model) -> list[Part]:
    """Execution-order parts of an ASAG detector (A, S or D)."""
    return [Part("preprocess", [model.preprocess]), Part("backbone body", [model.backbone.body]),
            Part("neck (FPN / deformable encoder)", [getattr(model.backbone, "fpn", None) or model.backbone.neck]),
            Part("anchor generator", [model.anchor_generator]), Part("relation block", [model.rpn]),
            Part("decoder head", [model.decoder])]


def attention_measures(model) -> list[Measure]:
    attention = [m for m in model.modules() if isinstance(m, MSDeformAttn)]
    if not attention:
        return []
    encoder = [m for m in model.backbone.modules() if isinstance(m, MSDeformAttn)]
    return [Measure("deformable attention (all)", attention), Measure("deformable attention (encoder)", encoder)]


def attention_memory(threads: int) -> str:
    """Peak memory of one encoder-size MSDeformAttn call at 800x1333 (padded 800x1344)."""
    torch.manual_seed(0)
    shapes = [(100, 168), (50, 84), (25, 42), (13, 21)]
    tokens = sum(h * w for h, w in shapes)
    attn = MSDeformAttn(256, 4, 8, 4).eval()
    spatial = torch.tensor(shapes)
    starts = torch.cat([spatial.new_zeros(1), (spatial[:, 0] * spatial[:, 1]).cumsum(0)[:-1]])
    src = torch.randn(1, tokens, 256)
    reference = torch.rand(1, tokens, 4, 2)
    memory = PeakMemory(torch.device("cpu"))
    increases = []
    with torch.inference_mode():
        attn(src, reference, src, spatial, starts)              # warm-up: allocator and kernels
        for _ in range(3):
            baseline = memory.reset()
            attn(src, reference, src, spatial, starts)
            increases.append(memory.read() - baseline)
    mb = 2 ** 20
    f32 = 4
    value = tokens * 256 * f32
    locations = tokens * 8 * 4 * 4 * 2 * f32
    weights = tokens * 8 * 4 * 4 * f32
    per_level = 8 * 32 * tokens * 4 * f32                        # grid_sample output of one level (B*heads, 32, Q, P)
    return (f"deformable attention, one encoder call at 800x1333 (padded 800x1344, {tokens} tokens, d 256, "
            f"8 heads, 4 levels, 4 points, float32, {threads} threads):\n"
            f"  measured peak RSS above the memory in use before the call: {max(increases) / mb:.0f} MB "
            f"(max of 3 calls: {', '.join(f'{x / mb:.0f}' for x in increases)} MB)\n"
            f"  from the shapes: value {value / mb:.1f} MB, offsets / sampling locations / [-1, 1] grids "
            f"{locations / mb:.1f} MB each, attention weights {weights / mb:.1f} MB, one level's samples "
            f"{per_level / mb:.1f} MB (+ the same again weighted), output {value / mb:.1f} MB")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--sizes", default="800x1216,512x768")
    parser.add_argument("--quick", action="store_true", help="1 run, 256x384 only (a smoke run)")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.sizes = 1, "256x384"
    torch.set_num_threads(args.threads)
    print(machine_header(torch.device("cpu")))
    models = {}
    for name, config in CONFIGS.items():
        torch.manual_seed(0)
        models[name] = build_model(config).eval()
    for text in args.sizes.split(","):
        size = parse_size(text)
        batches = [[random_image(size, 0)]]
        candidates = []
        for name, model in models.items():
            candidate = model_candidate(model, batches, name)
            candidate.parts = asag_parts(model)
            candidate.measures = attention_measures(model)
            candidates.append(candidate)
        with torch.inference_mode():
            results = benchmark(candidates, args.warmup, args.runs)
        print()
        print(format_results(results, f"=== {size[0]}x{size[1]}, batch 1, {args.warmup} warm-up + {args.runs} timed "
                                      f"runs, {torch.get_num_threads()} threads ==="))
        counts = {name: int(m.last_anchors.valid.sum()) for name, m in models.items()}
        print("anchors per image in the last run: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if not args.skip_memory:
        print()
        print(attention_memory(torch.get_num_threads()))
    print(f"\nload average at the end (1/5/15 min): {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
