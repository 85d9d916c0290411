#!/usr/bin/env python
"""Where a Sparse R-CNN training step's time goes, on real images of a config's data.train.

Builds the config's model (num_classes from data.train), takes batches of 4 training images
through the config's train transforms (so the input sizes are the recipe's), and times
``--steps`` steps of forward + backward + AdamW after one warm-up step. Forward hooks (they only
read the clock) split the forward into MobileNetV2/ResNet body, FPN, RoIAlign pooler (all stages),
the stages' compute (self-attention, dynamic interaction, FFN, towers; the dynamic interaction
alone is also shown) and the set criterion (Hungarian matching of the 6 stages included).

    OMP_NUM_THREADS=1 python benchmarks/sparse_rcnn_train_step.py sparse_rcnn/mobilenetv2_fpn_small_data
    OMP_NUM_THREADS=1 python benchmarks/sparse_rcnn_train_step.py sparse_rcnn/mobilenetv2_fpn_cpu \\
        data.root=../shared/data data.train="{format: voc, images: raccoon/images, annotations: raccoon/annotations}"

On a shared machine the absolute seconds scale with the load; the shares are what to read.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from sparsedet.config import load_config
from sparsedet.data import TransformedDataset, build_transforms, collate, read_dataset
from sparsedet.models import build_model


def add_timer(module: torch.nn.Module, name: str, totals: dict) -> None:
    """Accumulates the wall time of ``module``'s forward calls into ``totals[name]``."""
    starts = []
    module.register_forward_pre_hook(lambda m, args: starts.append(time.perf_counter()))

    def done(m, args, output):
        totals[name] += time.perf_counter() - starts.pop()
    module.register_forward_hook(done)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()

    config = load_config(args.config, args.overrides)
    train_set = read_dataset(config["data"]["train"], config["data"].get("root"), "data.train")
    config["model"]["num_classes"] = train_set.num_classes
    torch.manual_seed(0)
    model = build_model(config).train()
    data = TransformedDataset(train_set, build_transforms(config["input"], train=True))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    totals: dict = defaultdict(float)
    for name in ("forward (total)", "backbone body", "FPN", "RoIAlign pooler (all stages)",
                 "stages: attention + interaction + FFN + towers", "  of which the dynamic interaction",
                 "set criterion (6 x Hungarian matching + losses)", "backward", "optimizer"):
        totals[name] = 0.0
    add_timer(model.backbone.body, "backbone body", totals)
    add_timer(model.backbone.fpn, "FPN", totals)
    add_timer(model.head.pooler, "RoIAlign pooler (all stages)", totals)
    for stage in model.head.head_series:
        add_timer(stage, "stages: attention + interaction + FFN + towers", totals)
        add_timer(stage.inst_interact, "  of which the dynamic interaction", totals)
    add_timer(model.criterion, "set criterion (6 x Hungarian matching + losses)", totals)

    for step in range(args.steps + 1):
        if step == 1:  # step 0 is the warm-up
            for name in totals:  # keep the first-call order, which is the print order
                totals[name] = 0.0
            start = time.perf_counter()
        first = (step * args.batch) % max(1, len(data) - args.batch)
        images, targets = collate([data[i] for i in range(first, first + args.batch)])
        t = time.perf_counter()
        losses = model(images, targets)
        totals["forward (total)"] += time.perf_counter() - t
        t = time.perf_counter()
        sum(losses.values()).backward()
        totals["backward"] += time.perf_counter() - t
        t = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        totals["optimizer"] += time.perf_counter() - t
    elapsed = time.perf_counter() - start

    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{args.config} {' '.join(args.overrides)}")
    print(f"threads {torch.get_num_threads()}, batch {args.batch}, last input sizes {[tuple(i.shape[1:]) for i in images]}")
    print(f"parameters {params / 1e6:.2f} M, trainable {trainable / 1e6:.2f} M")
    print(f"step: {elapsed / args.steps:.2f} s")
    for name, seconds in totals.items():
        print(f"  {name:50s} {seconds / args.steps:6.2f} s {100 * seconds / elapsed:5.1f} %")


if __name__ == "__main__":
    main()
