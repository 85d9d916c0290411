"""A small Sparse R-CNN must learn real photos: it overfits a few tiny_coco images.

MobileNetV2-FPN with ImageNet weights when the weights package is installed (else ResNet-18
from scratch, with more steps), frozen backbone, 30 proposals, 6 stages, images at short side 256.
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
# Thresholds on the training images themselves (COCO AP in [0, 1]).
MIN_AP50 = 0.9
MIN_AP = 0.5


def _small_model(num_classes: int):
    overrides = [f"model.num_classes={num_classes}", "model.num_proposals=30", "model.backbone.freeze_at=5",
                 "model.hidden_dim=64", "model.fpn.channels=64", "model.dim_dynamic=16", "model.dim_feedforward=256"]
    try:
        imagenet_weights_path()
        iterations = 300
    except FileNotFoundError:
        overrides += ["model.backbone.name=resnet", "model.backbone.depth=18", "model.backbone.weights=null",
                      "model.backbone.freeze_at=0", "model.backbone.frozen_bn=false"]
        iterations = 500
    return build_model("sparse_rcnn/mobilenetv2_fpn_cpu", overrides), iterations


@pytest.mark.slow
def test_sparse_rcnn_overfits_real_images(shared_data):
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

    model, iterations = _small_model(dataset.num_classes)
    solver = dict(model.config["solver"], base_lr=5e-4, warmup_iters=10, steps=[int(0.8 * iterations)])
    history = fit_batch(model, images, targets, iterations, solver, progress=False)
    assert history[-1] < 0.25 * history[0], f"loss only went {history[0]:.2f} -> {history[-1]:.2f}"

    model.eval()
    with torch.no_grad():
        outputs = model(images, original_sizes=[(r.height, r.width) for r in records])
    metrics = evaluate_detections(dataset.json_path, {r.image_id: o for r, o in zip(records, outputs)},
                                  dataset.category_ids)
    assert metrics.stats["AP50"] >= MIN_AP50, metrics.table()
    assert metrics.stats["AP"] >= MIN_AP, metrics.table()
