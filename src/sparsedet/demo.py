"""``sparsedet demo``: generate images, train a small Sparse R-CNN on them, evaluate, report."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .data.synthetic import CLASS_NAMES, make_shapes_image
from .engine.fit import fit_batch
from .evaluation import evaluate_detections
from .models import build_model
from .models.backbones.mobilenet import imagenet_weights_path

NUM_IMAGES = 4


def demo_model(seed: int):
    """The CPU config narrowed to a 64-d head with 20 proposals and 3 classes, on a frozen ImageNet
    MobileNetV2 when its weights package is installed, otherwise on a ResNet-18 from scratch."""
    torch.manual_seed(seed)
    overrides = [f"model.num_classes={len(CLASS_NAMES)}", "model.num_proposals=20", "model.backbone.freeze_at=5",
                 "model.hidden_dim=64", "model.fpn.channels=64", "model.dim_dynamic=16", "model.dim_feedforward=256"]
    try:
        imagenet_weights_path()
    except FileNotFoundError as err:
        print(f"note: {err}\n      falling back to a ResNet-18 backbone from random init.")
        overrides += ["model.backbone.name=resnet", "model.backbone.depth=18", "model.backbone.weights=null",
                      "model.backbone.freeze_at=0"]
    return build_model("sparse_rcnn/mobilenetv2_fpn_cpu", overrides)


def run_demo(output_dir: str | Path = "outputs/demo", iterations: int = 300, seed: int = 0) -> dict:
    """Trains on ``NUM_IMAGES`` generated images and evaluates on the same images.

    Returns:
        The COCO metrics (AP, AP50, ...) of the trained model.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(min(torch.get_num_threads(), 2) or 1)
    samples = [make_shapes_image(seed * 1000 + i) for i in range(NUM_IMAGES)]
    images = [image.float() for image, _, _ in samples]
    targets = [{"boxes": boxes, "labels": labels} for _, boxes, labels in samples]
    model = demo_model(seed)
    solver = dict(model.config["solver"], base_lr=5e-4, warmup_iters=20,
                  steps=[int(iterations * 0.8)], clip_grad_norm=1.0)

    print(f"training Sparse R-CNN ({model.cfg.backbone.name}-FPN, {model.num_proposals} proposals, "
          f"{model.cfg.num_stages} stages) on {NUM_IMAGES} generated images for {iterations} steps")
    start = time.time()

    def log(iteration: int, losses: dict) -> None:
        if iteration % 25 == 0 or iteration == iterations - 1:
            print(f"  step {iteration:4d}  loss {sum(losses.values()):8.3f}  "
                  f"(last stage: ce {losses['loss_ce']:.3f}, l1 {losses['loss_bbox']:.3f}, giou {losses['loss_giou']:.3f})",
                  flush=True)

    history = fit_batch(model, images, targets, iterations, solver, progress=False, on_step=log)
    model.eval()
    with torch.no_grad():
        predictions = dict(enumerate(model(images)))
    ground_truth = _coco_ground_truth(samples)
    metrics = evaluate_detections(ground_truth, predictions, list(range(1, len(CLASS_NAMES) + 1)))
    elapsed = time.time() - start
    print(f"loss {history[0]:.2f} -> {history[-1]:.2f} in {elapsed:.0f} s; "
          f"AP {100 * metrics['AP']:.1f}, AP50 {100 * metrics['AP50']:.1f} on the training images")
    (output_dir / "metrics.json").write_text(json.dumps({"metrics": metrics, "loss": history}, indent=1))
    print(f"wrote {output_dir / 'metrics.json'}")
    return metrics


def _coco_ground_truth(samples) -> dict:
    images, annotations = [], []
    for image_id, (image, boxes, labels) in enumerate(samples):
        images.append({"id": image_id, "height": image.shape[1], "width": image.shape[2], "file_name": f"{image_id}.png"})
        for (x1, y1, x2, y2), label in zip(boxes.tolist(), labels.tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(CLASS_NAMES)]
    return {"images": images, "annotations": annotations, "categories": categories}
