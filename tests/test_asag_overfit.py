"""A small ASAG-A must learn real photos: it overfits two tiny_coco images.

The CPU config (frozen MobileNetV2-FPN with ImageNet weights when the package is installed, else a
ResNet-18 from scratch), 64-d queries, images at short side 256; ground-truth patches stand in for
generated ones during the first 50 steps, as the official code does in epoch 0.
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
ITERATIONS = 200
MIN_AP50 = 0.5           # COCO AP50 on the two training images, in [0, 1]


@pytest.mark.slow
def test_asag_overfits_real_images(shared_data):
    torch.manual_seed(0)
    root = shared_data / "tiny_coco"
    dataset = read_coco(root / "annotations/instances_train2017.json", root / "train2017")
    records = [r for r in dataset.records if 1 <= len(r.labels) <= 3][:NUM_IMAGES]
    images, targets = [], []
    for record in records:
        image = read_image(record.image_path).float()
        resized = resize_shortest_edge(image, SHORT_SIDE, 2 * SHORT_SIDE)
        images.append(resized)
        targets.append({"boxes": record.boxes * (resized.shape[-1] / image.shape[-1]), "labels": record.labels})
    overrides = [f"model.num_classes={dataset.num_classes}", "model.anchors.target_patch_iters=50"]
    try:
        imagenet_weights_path()
    except FileNotFoundError:
        overrides += ["model.backbone.name=resnet", "model.backbone.depth=18", "model.backbone.weights=null",
                      "model.backbone.freeze_at=0", "model.backbone.frozen_bn=false"]
    model = build_model("asag/a_mobilenetv2_fpn_cpu", overrides)
    solver = dict(model.config["solver"], base_lr=5e-4, warmup_iters=10, steps=[int(0.8 * ITERATIONS)])
    history = fit_batch(model, images, targets, ITERATIONS, solver, progress=False)
    assert history[-1] < 0.25 * history[0], f"loss only went {history[0]:.2f} -> {history[-1]:.2f}"

    model.eval()
    with torch.no_grad():
        outputs = model(images, original_sizes=[(r.height, r.width) for r in records])
    metrics = evaluate_detections(dataset.json_path, {r.image_id: o for r, o in zip(records, outputs)},
                                  dataset.category_ids)
    assert metrics.stats["AP50"] >= MIN_AP50, metrics.table()
