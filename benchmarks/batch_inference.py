#!/usr/bin/env python
"""Inference throughput with batches of images: ``sparsedet.predict(..., batch_size=N)``.

Builds a detector from a config (default ``querydet/mobilenetv2_fpn_cpu``, random heads, the
config's backbone weights), reads ``--images`` (default: the tiny_coco val images in
``../shared/data``; random 480x640 images when absent), and times ``sparsedet.predict`` over all of
them at each ``--batch-sizes`` (default 1,4), dense and with Cascade Sparse Query (QueryDet
configs). Images per second = images / wall time (median of ``--runs`` passes after one warm-up).
It also checks that the detections of each batch size equal those of batch 1 (same-size images:
exact up to float rounding; mixed sizes are padded to the batch's largest image, which can move
detections at the padded borders).

Usage::

    PYTHONPATH=src .venv/bin/python benchmarks/batch_inference.py --max-images 8 --threads 2
    PYTHONPATH=src .venv/bin/python benchmarks/batch_inference.py --device cuda --batch-sizes 1,8
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sparse_rcnn_speed import cpu_model, load_average  # noqa: E402


def load_images(folder: str | None, count: int) -> list:
    from sparsedet.data.image_io import read_image
    root = Path(folder) if folder else Path("../shared/data/tiny_coco/val2017")
    paths = sorted(p for p in root.glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:count] \
        if root.is_dir() else []
    if not paths:
        print(f"note: no images in {root}; random 480x640 images")
        g = torch.Generator().manual_seed(0)
        return [torch.randint(0, 256, (3, 480, 640), generator=g).float() for _ in range(count)]
    print(f"{len(paths)} images from {root}")
    return [read_image(p) for p in paths]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="querydet/mobilenetv2_fpn_cpu")
    parser.add_argument("--images", help="folder of images (default: ../shared/data/tiny_coco/val2017)")
    parser.add_argument("--max-images", type=int, default=8)
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import sparsedet
    from sparsedet.models import build_model

    print(f"torch {torch.__version__}, {args.threads} threads, CPU {cpu_model()}, load average {load_average()}")
    torch.manual_seed(0)
    model = build_model(args.config).eval().to(args.device)
    images = load_images(args.images, args.max_images)
    modes = [("dense", False)] + ([("CSQ", True)] if hasattr(model.cfg, "csq") else [])
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    clock = (lambda: (torch.cuda.synchronize(), time.perf_counter())[1]) if args.device.startswith("cuda") \
        else time.perf_counter
    print(f"{'mode':<6} | {'batch':>5} | {'images/s':>9} | {'vs batch ' + str(sizes[0]):>11} | same detections")
    for name, csq in modes:
        if csq:
            model.cfg.csq.enabled = True
        reference, base_rate = None, None
        for batch in sizes:
            sparsedet.predict(model, images[:batch], batch_size=batch)          # warm-up
            times = []
            for _ in range(args.runs):
                start = clock()
                out = sparsedet.predict(model, images, batch_size=batch)
                times.append(clock() - start)
            rate = len(images) / statistics.median(times)
            if reference is None:
                reference, base_rate = out, rate
            same = all(torch.equal(a["labels"], b["labels"]) and torch.allclose(a["boxes"], b["boxes"], atol=1e-2)
                       for a, b in zip(out, reference))
            print(f"{name:<6} | {batch:>5} | {rate:9.2f} | {rate / base_rate:10.2f}x | {same}")
        model.cfg.csq.enabled = False if csq else getattr(getattr(model.cfg, "csq", None), "enabled", False)
    print(f"load average at the end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
