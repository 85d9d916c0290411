"""``sparsedet demo``, the main job on a fresh machine: generate the embedded synthetic data set,
train a small detector on it with the regular trainer (QueryDet by default, Sparse R-CNN with
``--model sparse_rcnn``), evaluate it on the held-out images (QueryDet: densely and with Cascade
Sparse Query, timed) and write a report (AP tables, loss curve, annotated predictions, CSQ figure).

Ctrl-C during training finishes the step, saves ``train/last.pth`` and prints the command that
continues (``--resume``)."""
from __future__ import annotations

import dataclasses
import json
import shlex
import statistics
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
                "tsp_fcos": "tsp_fcos/mobilenetv2_fpn_demo", "tsp_rcnn": "tsp_rcnn/mobilenetv2_fpn_demo",
                "asag_a": "asag/a_mobilenetv2_fpn_demo", "asag_s": "asag/s_mobilenetv2_fpn_demo",
                "asag_d": "asag/d_mobilenetv2_demo"}
NUM_TRAIN, NUM_VAL, IMAGE_SIZE = 200, 40, 320
# Objects from 12 px (small by COCO's rule) to half the image side, 2-6 per image.
MIN_OBJECT_SIZE, OBJECTS_PER_IMAGE = 12, (2, 6)
NUM_SHOWN = 6
SHOWN_SCORE = 0.4
# CSQ speed: rounds of (dense, CSQ) passes over the first TIMED_IMAGES val images, interleaved so
# that background load hits both alike; the report gives the median and the spread.
TIMING_ROUNDS, TIMED_IMAGES = 5, 10
EXPLAIN_CAPTION = (
    "*Where Cascade Sparse Query computed, on the first held-out image.* Top row: the query head's "
    "probability that a small object is near each cell, densely on the coarse start level and, on the "
    "next finer level, only at the cells the cascade evaluated (colour bar). Bottom row, on each "
    "high-resolution level: *queried* cells (orange) are the 2x2 finer cells under each coarser cell "
    "whose probability passed sigma, where the detection heads' outputs are read; *context* cells "
    "(blue) complete the window around them, where the heads' convolutions also ran (queried + context "
    "= the *active sites*); grey cells were skipped. Boxes: the final detections.")


def demo_config(data: dict, iterations: Optional[int], seed: int, model: str = DEFAULT_MODEL,
                image_size: int = IMAGE_SIZE) -> dict:
    """The demo config with the generated folders filled in. Without the MobileNetV2 weights
    package it falls back to a ResNet-18 from scratch (and says so).

    ``iterations`` shortens the schedule: LR drops at 80 % and 93 %, evaluation half-way, warm-up
    at most a tenth of the run (so that a short run is not all warm-up). ``image_size`` other than
    the default scales the train and test sizes with the generated images."""
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
    config = load_config(DEMO_CONFIGS[model], overrides)
    solver, sizes = config["solver"], config["input"]
    if iterations is not None:
        solver["warmup_iters"] = min(int(solver.get("warmup_iters", 0)), iterations // 10)
    if image_size != IMAGE_SIZE:
        scale = image_size / IMAGE_SIZE
        for key in ("min_size_train", "max_size_train", "min_size_test", "max_size_test"):
            value = sizes[key]
            sizes[key] = [round(v * scale) for v in value] if isinstance(value, list) else round(value * scale)
    return config


def run_demo(output_dir: str | Path = "outputs/demo", iterations: Optional[int] = None, seed: int = 0,
             device: Optional[str] = None, model: str = DEFAULT_MODEL, num_train: int = NUM_TRAIN,
             num_val: int = NUM_VAL, image_size: int = IMAGE_SIZE, resume: bool = False) -> Optional[dict]:
    """Runs the whole demo; returns the val metrics (``AP``, ``AP50``, ... in [0, 1]), or None when
    training was stopped (Ctrl-C): ``train/last.pth`` is then saved and the continue command printed.

    ``num_train``, ``num_val`` and ``image_size`` size the generated data set (tests shrink it).
    ``resume`` continues the training in ``output_dir/train`` from its ``last.pth``."""
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
    config = demo_config(data, iterations, seed, model, image_size)
    solver = config["solver"]
    trainer = Trainer(config, output_dir / "train", device=device or "cpu", resume=resume)
    resumed = f", resuming at step {trainer.iteration}" if resume else ""
    print(f"[2/4] training {describe_model(config)} for {solver['max_iter']} steps of "
          f"{solver['images_per_batch']} images on {device or 'cpu'}{resumed}")
    result = trainer.train()
    if trainer.stopped_early:
        command = demo_command(output_dir, iterations, seed, device, model, num_train, num_val, image_size)
        print(f"stopped at step {trainer.iteration} of {solver['max_iter']}: saved {output_dir / 'train' / 'last.pth'}"
              f"\ncontinue with: {command}")
        return None
    if result is None:  # resumed after the last step: training is done, evaluate its weights
        result = trainer.evaluate()
    print(f"[3/4] evaluation on the {len(trainer.val_set.records)} held-out images: AP {100 * result.stats['AP']:.1f}, "
          f"AP50 {100 * result.stats['AP50']:.1f} (table above)")
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
        metrics["speed_up"] = sparse_inference["speed_up"]
    atomic_write_text(output_dir / "metrics.json", json.dumps(metrics, indent=1))
    print(f"done in {elapsed / 60:.1f} min: AP {100 * result.stats['AP']:.1f}, AP50 {100 * result.stats['AP50']:.1f} "
          f"on {len(trainer.val_set.records)} held-out images. Report: {output_dir / 'report.md'}")
    return result.stats


def demo_command(output_dir: Path, iterations: Optional[int], seed: int, device: Optional[str], model: str,
                 num_train: int, num_val: int, image_size: int) -> str:
    """The ``sparsedet demo ... --resume`` command that continues this run (non-default options only)."""
    words = ["sparsedet", "demo", "--output", str(output_dir), "--resume"]
    options = [("--model", model, DEFAULT_MODEL), ("--iterations", iterations, None), ("--seed", seed, 0),
               ("--device", device, None), ("--num-train", num_train, NUM_TRAIN), ("--num-val", num_val, NUM_VAL),
               ("--image-size", image_size, IMAGE_SIZE)]
    for flag, value, default in options:
        if value != default:
            words += [flag, str(value)]
    return shlex.join(words)


def _compare_csq(trainer: Trainer) -> dict:
    """QueryDet: the same weights evaluated densely and with Cascade Sparse Query (AP on the whole
    val set), and their inference time per image (``_time_csq``)."""
    from .engine.evaluate import evaluate_model

    model = trainer.model
    results = {}
    try:
        for mode in ("dense", "csq"):
            model.cfg.csq.enabled = mode == "csq"
            results[mode] = evaluate_model(model, trainer.val_set, trainer.config, progress=False)
        timing = _time_csq(model, [r.image_path for r in trainer.val_set.records[:TIMED_IMAGES]])
    finally:
        model.cfg.csq.enabled = False
    dense, csq = results["dense"].stats, results["csq"].stats
    seconds, ratios = timing["seconds_per_image"], timing["speed_up"]
    summary = (f"Cascade Sparse Query (sigma {model.cfg.csq.threshold}, {model.cfg.csq.context}x{model.cfg.csq.context} "
               f"context) vs dense P2-P7 inference, same weights: AP {100 * csq['AP']:.1f} vs {100 * dense['AP']:.1f}, "
               f"APs {100 * csq['APs']:.1f} vs {100 * dense['APs']:.1f}; {1000 * seconds['csq']:.0f} vs "
               f"{1000 * seconds['dense']:.0f} ms per image, speed-up {ratios['median']:.2f}x "
               f"(median of {timing['rounds']} interleaved rounds over {timing['images']} images; rounds ranged "
               f"{ratios['min']:.2f}x-{ratios['max']:.2f}x; CPU, model only, background load included)")
    return {"result": results["csq"], "dense": results["dense"], "seconds_per_image": seconds,
            "speed_up": ratios, "summary": summary}


def _time_csq(model, image_paths: list[Path], rounds: int = TIMING_ROUNDS) -> dict:
    """Inference seconds per image, dense vs CSQ, over ``rounds`` interleaved rounds (one dense and
    one CSQ pass over the images each; the images are read once, before timing).

    Returns ``{"seconds_per_image": {"dense", "csq"} medians, "speed_up": {"median", "min", "max"}
    of the per-round dense/CSQ ratios, "rounds", "images"}``."""
    from .data.image_io import read_image
    from .inference import predict

    images = [read_image(path) for path in image_paths]
    per_round: dict[str, list[float]] = {"dense": [], "csq": []}
    predict(model, images[:1])  # warm-up: first-call allocations
    for _ in range(rounds):
        for mode in ("dense", "csq"):
            model.cfg.csq.enabled = mode == "csq"
            begin = time.perf_counter()
            predict(model, images)
            per_round[mode].append((time.perf_counter() - begin) / max(len(images), 1))
    ratios = [d / c for d, c in zip(per_round["dense"], per_round["csq"])]
    return {"seconds_per_image": {mode: statistics.median(values) for mode, values in per_round.items()},
            "speed_up": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
            "rounds": rounds, "images": len(images)}


def _draw_predictions(trainer: Trainer, config: dict, output_dir: Path) -> list[Path]:
    """Annotated predictions on the first val images (and the --explain figure for QueryDet / TSP-FCOS / TSP-RCNN)."""
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
    if config["model"]["name"] in ("querydet", "tsp_fcos", "tsp_rcnn") and shown:
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
        heads = {"adamixer": "AdaMixer", "sparse_rcnn": "Sparse R-CNN", "deformable": "Deformable-DETR"}[model["decoder_type"]]
        if model["decoder_type"] == "deformable":
            encoder = model["encoder"]
            backbone = (f"{model['backbone']['name']} + {encoder['num_layers']}-layer deformable encoder, "
                        f"{encoder['channels']} channels")
        return (f"ASAG-{heads[0]} ({backbone}, adaptive sparse anchors (setting {model['setting']}), "
                f"{model['num_heads_decoder']} parallel one-layer {heads} heads, tested with {model['test_head']})")
    if model["name"] == "sparse_rcnn":
        return f"Sparse R-CNN ({backbone}, {model['num_proposals']} proposals, {model['num_stages']} stages)"
    if model["name"] == "tsp_fcos":
        t = model["transformer"]
        return (f"TSP-FCOS ({backbone}, {model['foi']['num_foi']} FoIs, {t['num_layers']}-layer "
                f"d={t['d_model']} encoder)")
    if model["name"] == "tsp_rcnn":
        roi = model["roi_heads"]
        return (f"TSP-RCNN ({backbone}, {model['rpn']['num_proposals']} RPN proposals into a {roi['num_layers']}-layer "
                f"{roi['d_model']}-d encoder)")
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
    for picture in pictures:
        lines.append(f"![{picture.stem}]({picture.relative_to(output_dir)})")
        if picture.stem.endswith("_explain"):
            lines += ["", EXPLAIN_CAPTION, ""]
    train_dir = (output_dir / "train").absolute()
    command = shlex.join(["sparsedet", "train", str(train_dir / "config.yaml"), "--output", str(train_dir),
                          "--resume", f"solver.max_iter={2 * int(solver['max_iter'])}"])
    lines += ["", "Checkpoints, metrics.jsonl and TensorBoard logs: `train/`. Continue training (from any "
              "folder; set `solver.max_iter` to the total number of steps, and `solver.steps` for the "
              f"learning-rate drops) with:", "", f"    {command}", ""]
    return "\n".join(lines)
