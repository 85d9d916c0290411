"""A small TSP-FCOS must learn real photos: it overfits two tiny_coco images.

MobileNetV2-FPN with ImageNet weights (frozen), 64 FPN channels, 2-conv GN towers, a 2-layer 64-d
encoder over 100 FoIs, images at short side 256, the official optimiser split (SGD + AdamW on the
transformer) with higher learning rates for a 2-image batch.
"""
from __future__ import annotations

import pytest
import torch

from sparsedet import build_model
from sparsedet.data.coco import read_coco
from sparsedet.data.image_io import read_image
from sparsedet.data.transforms import resize_shortest_edge
from sparsedet.engine.fit import fit_batch
from sparsedet.evaluation import evaluate_detections
from sparsedet.models.backbones.mobilenet import imagenet_weights_path

NUM_IMAGES = 2
SHORT_SIDE = 256
ITERATIONS = 120
# Thresholds on the training images themselves (COCO AP in [0, 1]).
MIN_AP50 = 0.8
MIN_AP = 0.4


@pytest.mark.slow
def test_tsp_fcos_overfits_real_images(shared_data):
    try:
        imagenet_weights_path()
    except FileNotFoundError:
        pytest.skip("needs the MobileNetV2 ImageNet weights package")
    torch.manual_seed(0)
    root = shared_data / "tiny_coco"
    dataset = read_coco(root / "annotations/instances_train2017.json", root / "train2017")
    records = [r for r in dataset.records if 1 <= len(r.labels) <= 3][:NUM_IMAGES]
    images, targets = [], []
    for record in records:
        image = read_image(record.image_path).float()
        resized = resize_shortest_edge(image, SHORT_SIDE, 2 * SHORT_SIDE)
        scale = resized.shape[-1] / image.shape[-1]
        images.append(resized)
        targets.append({"boxes": record.boxes * scale, "labels": record.labels})

    model = build_model("tsp_fcos/mobilenetv2_fpn_cpu", [
        f"model.num_classes={dataset.num_classes}", "model.transformer.d_model=64", "model.transformer.nhead=4",
        "model.transformer.dim_feedforward=128", "model.foi.num_foi=100"])
    solver = dict(model.config["solver"], base_lr=0.01, warmup_iters=10, steps=[int(0.8 * ITERATIONS)],
                  param_groups=[{"match": "transformer", "optimizer": "adamw", "lr": 1e-3, "clip_grad_norm": 0.1}])
    history = fit_batch(model, images, targets, ITERATIONS, solver, progress=False)
    assert history[-1] < 0.3 * history[0], f"loss only went {history[0]:.2f} -> {history[-1]:.2f}"

    model.eval()
    with torch.no_grad():
        outputs = model(images, original_sizes=[(r.height, r.width) for r in records])
    metrics = evaluate_detections(dataset.json_path, {r.image_id: o for r, o in zip(records, outputs)},
                                  dataset.category_ids)
    assert metrics.stats["AP50"] >= MIN_AP50, metrics.table()
    assert metrics.stats["AP"] >= MIN_AP, metrics.table()
