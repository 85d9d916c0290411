"""A few hundred CPU training steps on CrowdHuman- and VisDrone-format sets made from tiny_coco,
then `sparsedet eval`: the data sets' own metrics end to end through the CLI.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/crowdhuman_visdrone_tiny.py {crowdhuman,visdrone} \
        --steps 300 --output outputs/datasets_tiny

CrowdHuman: the tiny_coco person boxes as an .odgt (crowd boxes as "mask" ignore regions),
sparse_rcnn/mobilenetv2_fpn_cpu with 50 proposals. VisDrone: the tiny_coco boxes as VisDrone txt
(person/bicycle/car/truck/bus/motorcycle -> VisDrone classes, other classes -> 11 "others", crowd ->
ignored regions), training on the quadrant split, retinanet/r50_fpn_visdrone with a frozen
MobileNetV2 and small inputs (the official test size, long side 3999, is far too slow on a CPU).
Both are evaluated on the 50 val images and, to show what the model has learned, on the train images.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from sparsedet.cli import main
from sparsedet.data.export import COCO_TO_VISDRONE, coco_to_odgt, coco_to_visdrone


def run(kind: str, steps: int, output: Path, data: Path) -> None:
    coco = data / "tiny_coco"
    sets = output / kind / "data"
    if kind == "crowdhuman":
        for split in ("train", "val"):
            coco_to_odgt(coco / f"annotations/instances_{split}2017.json", sets / f"{split}.odgt")
        config = "sparse_rcnn/mobilenetv2_fpn_cpu"
        overrides = [f"data.{s}.format=crowdhuman" for s in ("train", "val")] + [
            f"data.train.annotations={sets / 'train.odgt'}", f"data.val.annotations={sets / 'val.odgt'}",
            "model.num_proposals=50"]
    else:
        for split in ("train", "val"):
            coco_to_visdrone(coco / f"annotations/instances_{split}2017.json", sets / split, COCO_TO_VISDRONE)
        config = "retinanet/r50_fpn_visdrone"
        overrides = [f"data.train.annotations={sets / 'train'}", f"data.val.annotations={sets / 'val'}",
                     "model.backbone.name=mobilenet_v2", "model.backbone.weights=imagenet",
                     "model.backbone.freeze_at=5", "model.fpn.channels=64", "model.head.num_convs=2",
                     "solver.amp=false", "solver.base_lr=0.004", "solver.clip_grad_norm=5.0"]
    overrides += [f"data.train.images={coco / 'train2017'}", f"data.val.images={coco / 'val2017'}", "data.root=null",
                  "data.num_workers=0", "input.min_size_train=[224, 256]", "input.max_size_train=384",
                  "input.min_size_test=256", "input.max_size_test=384", "solver.images_per_batch=2",
                  f"solver.max_iter={steps}", f"solver.steps=[{int(steps * 0.8)}]", "solver.warmup_iters=20",
                  f"solver.eval_period={steps}", f"solver.checkpoint_period={steps}", "solver.log_period=20"]
    run_dir = output / kind / "run"
    assert main(["train", config, "--output", str(run_dir), "--no-progress", *overrides]) == 0
    assert main(["eval", str(run_dir / "last.pth"), "--output", str(output / kind / "eval_val")]) == 0
    train_as_val = [f"data.val.annotations={sets / ('train.odgt' if kind == 'crowdhuman' else 'train')}",
                    f"data.val.images={coco / 'train2017'}"]
    assert main(["eval", str(run_dir / "last.pth"), "--output", str(output / kind / "eval_train"), *train_as_val]) == 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["crowdhuman", "visdrone"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--output", type=Path, default=Path("outputs/datasets_tiny"))
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("SPARSEDET_DATA", "../shared/data")))
    args = parser.parse_args()
    run(args.kind, args.steps, args.output, args.data)
