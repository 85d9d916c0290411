"""``sparsedet demo``, the main job on a fresh machine: generate the embedded synthetic data set,
train a small Sparse R-CNN on it with the regular trainer, evaluate it on the held-out images and
write a report (AP table, loss curve, annotated predictions)."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Optional

import torch

from .checkpoint import atomic_write_text
from .config import load_config
from .data.synthetic import write_synthetic_coco
from .engine.trainer import Trainer
from .log import setup_logging
from .models.backbones.mobilenet import imagenet_weights_path

DEFAULT_MODEL = "querydet"
# Sparse R-CNN, like every set-prediction detector, converges slowly: on this budget it learns the
# boxes but not yet the classes, so its demo config runs 3000 steps.
DEMO_CONFIGS = {"sparse_rcnn": "sparse_rcnn/mobilenetv2_fpn_demo", "querydet": "querydet/mobilenetv2_fpn_demo",
                "asag_a": "asag/a_mobilenetv2_fpn_demo", "asag_s": "asag/s_mobilenetv2_fpn_demo"}
NUM_TRAIN, NUM_VAL, IMAGE_SIZE = 200, 40, 320
# Objects from 12 px (small by COCO's rule) to half the image side, 2-6 per image.
MIN_OBJECT_SIZE, OBJECTS_PER_IMAGE = 12, (2, 6)
NUM_SHOWN = 6
SHOWN_SCORE = 0.4


def demo_config(data: dict, iterations: Optional[int], seed: int, model: str = DEFAULT_MODEL) -> dict:
    """The demo config with the generated folders filled in. Without the MobileNetV2 weights
    package it falls back to a ResNet-18 from scratch (and says so)."""
    overrides = [f"solver.seed={seed}"]
    for split in ("train", "val"):
        overrides += [f"data.{split}.annotations={data[split]['annotations']}",
                      f"data.{split}.images={data[split]['images']}"]
    if iterations is not None:
        overrides += [f"solver.max_iter={iterations}", f"solver.steps=[{int(0.8 * iterations)}, {int(0.93 * iterations)}]",
                      f"solver.eval_period={max(iterations // 2, 1)}"]
    try:
        imagenet_weights_path()
    except FileNotFoundError as err:
        print(f"note: {err}\n      falling back to a ResNet-18 backbone from random init (expect a lower AP).")
        overrides += ["model.backbone.name=resnet", "model.backbone.depth=18", "model.backbone.weights=null",
                      "model.backbone.freeze_at=0", "model.backbone.frozen_bn=false"]
    if model not in DEMO_CONFIGS:
        raise ValueError(f"demo model must be one of {sorted(DEMO_CONFIGS)}, got {model!r}")
    return load_config(DEMO_CONFIGS[model], overrides)


def run_demo(output_dir: str | Path = "outputs/demo", iterations: Optional[int] = None, seed: int = 0,
             device: Optional[str] = None, model: str = DEFAULT_MODEL, num_train: int = NUM_TRAIN,
             num_val: int = NUM_VAL, image_size: int = IMAGE_SIZE) -> dict:
    """Runs the whole demo; returns the val metrics (``AP``, ``AP50``, ... in [0, 1]).

    ``num_train``, ``num_val`` and ``image_size`` size the generated data set (tests shrink it)."""
    from .visualize import plot_training_curves

    output_dir = Path(output_dir)
    setup_logging(output_dir / "demo.log")
    torch.set_num_threads(min(torch.get_num_threads(), 2) or 1)
    start = time.time()
    print(f"[1/4] generating the synthetic data set in {output_dir / 'data'} "
          f"({num_train} train + {num_val} val images, {image_size}x{image_size})")
    data = write_synthetic_coco(output_dir / "data", num_train=num_train, num_val=num_val, seed=seed,
                                height=image_size, width=image_size, objects_per_image=OBJECTS_PER_IMAGE,
                                min_object_size=MIN_OBJECT_SIZE)
    config = demo_config(data, iterations, seed, model)
    solver = config["solver"]
    print(f"[2/4] training {describe_model(config)} for {solver['max_iter']} steps of "
          f"{solver['images_per_batch']} images on {device or 'cpu'}")
    trainer = Trainer(config, output_dir / "train", device=device or "cpu")
    result = trainer.train()
    print("[3/4] evaluation on the held-out images:")
    print(result.table())
    sparse_inference = _compare_csq(trainer) if config["model"]["name"] == "querydet" else None
    if sparse_inference is not None:
        print(sparse_inference["summary"])

    print("[4/4] writing the report")
    curve = plot_training_curves(output_dir / "train" / "metrics.jsonl", output_dir / "loss_curve.png")
    pictures = _draw_predictions(trainer, config, output_dir)
    elapsed = time.time() - start
    report = _report(result, config, curve, pictures, output_dir, elapsed, sparse_inference)
    atomic_write_text(output_dir / "report.md", report)
    metrics = {"dense": result.to_dict()}
    if sparse_inference is not None:
        metrics["csq"] = sparse_inference["result"].to_dict()
        metrics["seconds_per_image"] = sparse_inference["seconds_per_image"]
    atomic_write_text(output_dir / "metrics.json", json.dumps(metrics, indent=1))
    print(f"done in {elapsed / 60:.1f} min: AP {100 * result.stats['AP']:.1f}, AP50 {100 * result.stats['AP50']:.1f} "
          f"on {len(trainer.val_set.records)} held-out images. Report: {output_dir / 'report.md'}")
    return result.stats


def _compare_csq(trainer: Trainer) -> dict:
    """QueryDet: the same weights evaluated densely and with Cascade Sparse Query, timed."""
    from .engine.evaluate import evaluate_model

    model = trainer.model
    timings, results = {}, {}
    for mode in ("dense", "csq"):
        model.cfg.csq.enabled = mode == "csq"
        begin = time.perf_counter()
        results[mode] = evaluate_model(model, trainer.val_set, trainer.config, progress=False)
        timings[mode] = (time.perf_counter() - begin) / max(len(trainer.val_set.records), 1)
    model.cfg.csq.enabled = False
    dense, csq = results["dense"].stats, results["csq"].stats
    summary = (f"Cascade Sparse Query (sigma {model.cfg.csq.threshold}, {model.cfg.csq.context}x{model.cfg.csq.context} "
               f"context) vs dense P2-P7 inference, same weights: AP {100 * csq['AP']:.1f} vs {100 * dense['AP']:.1f}, "
               f"APs {100 * csq['APs']:.1f} vs {100 * dense['APs']:.1f}; {1000 * timings['csq']:.0f} vs "
               f"{1000 * timings['dense']:.0f} ms per image (whole evaluation loop, CPU)")
    return {"result": results["csq"], "dense": results["dense"], "seconds_per_image": timings, "summary": summary}


def _draw_predictions(trainer: Trainer, config: dict, output_dir: Path) -> list[Path]:
    """Annotated predictions on the first val images (and a CSQ explanation for QueryDet)."""
    from .engine.evaluate import predict_dataset
    from .visualize import draw_detections

    shown = trainer.val_set.records[:NUM_SHOWN]
    subset = dataclasses.replace(trainer.val_set, records=shown)
    predictions = predict_dataset(trainer.model, subset, config["input"], progress=False)
    folder = output_dir / "predictions"
    folder.mkdir(parents=True, exist_ok=True)
    pictures = []
    for record in shown:
        path = folder / f"{record.image_path.stem}.png"
        draw_detections(record.image_path, predictions[record.image_id], trainer.val_set.class_names,
                        score_threshold=SHOWN_SCORE).save(path)
        pictures.append(path)
    if config["model"]["name"] == "querydet" and shown:
        from .explain import explain_prediction

        path = folder / f"{shown[0].image_path.stem}_explain.png"
        explain_prediction(trainer.model, shown[0].image_path, score_threshold=SHOWN_SCORE).save(path)
        pictures.append(path)
    return pictures


def describe_model(config: dict) -> str:
    """One line naming the detector a config builds, for the console and the report."""
    model = config["model"]
    backbone = f"{model['backbone']['name']}-FPN, {model['fpn']['channels']} channels"
    if model["name"] == "asag":
        heads = "AdaMixer" if model["decoder_type"] == "adamixer" else "Sparse R-CNN"
        return (f"ASAG-{heads[0]} ({backbone}, adaptive sparse anchors (setting {model['setting']}), "
                f"{model['num_heads_decoder']} parallel one-layer {heads} heads, tested with {model['test_head']})")
    if model["name"] == "sparse_rcnn":
        return f"Sparse R-CNN ({backbone}, {model['num_proposals']} proposals, {model['num_stages']} stages)"
    levels = model["fpn"]["out_levels"]
    return f"QueryDet ({backbone}, P{min(levels)}-P{max(levels)}, query head on P3/P4)"


def _report(result, config: dict, curve: Path, pictures: list[Path], output_dir: Path, elapsed: float,
            sparse_inference: Optional[dict] = None) -> str:
    solver = config["solver"]
    lines = [
        "# sparsedet demo report", "",
        f"{describe_model(config)}, trained for {solver['max_iter']} iterations of "
        f"{solver['images_per_batch']} images ({solver['optimizer']}, lr {solver['base_lr']}) on the generated "
        f"training set; evaluated with COCO AP on the held-out set. Wall time {elapsed / 60:.1f} min.", "",
        "## COCO metrics on the held-out images", "", "```", result.table(), "```", "",
    ]
    if sparse_inference is not None:
        lines += ["## Cascade Sparse Query", "", sparse_inference["summary"] + ".", "",
                  "```", sparse_inference["result"].table(per_class=False), "```", ""]
    lines += ["## Training curve", "", f"![loss curve]({curve.relative_to(output_dir)})", "",
              f"## Predictions on held-out images (score >= {SHOWN_SCORE})", ""]
    lines += [f"![{p.stem}]({p.relative_to(output_dir)})" for p in pictures]
    lines += ["", "Checkpoints, metrics.jsonl and TensorBoard logs: `train/`. Continue training with "
              "`sparsedet train train/config.yaml --output train --resume solver.max_iter=N`.", ""]
    return "\n".join(lines)
