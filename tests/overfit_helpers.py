"""The one overfit recipe of the real-image tests (Sparse R-CNN, ASAG, TSP-FCOS, TSP-RCNN).

A detector must learn real photos: it trains on one fixed batch of tiny_coco training images with the
library's own loop (``engine.fit.fit_batch``: the recipe's optimizer, warm-up + step schedule and
gradient clipping), its loss must fall by a stated factor, and its COCO AP on those same images must
pass a stated bar. The batch is read once per test session (``conftest.overfit_batch``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from sparsedet.data.coco import read_coco
from sparsedet.data.image_io import read_image
from sparsedet.data.transforms import resize_shortest_edge
from sparsedet.engine.fit import fit_batch
from sparsedet.evaluation import evaluate_detections
from sparsedet.models.backbones.mobilenet import imagenet_weights_path

# Without the MobileNetV2 weights package: a ResNet-18 trained from scratch instead.
RESNET18_FROM_SCRATCH = ["model.backbone.name=resnet", "model.backbone.depth=18", "model.backbone.weights=null",
                         "model.backbone.freeze_at=0", "model.backbone.frozen_bn=false"]


def has_imagenet_mobilenet() -> bool:
    """Whether the MobileNetV2 ImageNet weights package is installed."""
    try:
        imagenet_weights_path()
    except FileNotFoundError:
        return False
    return True


@dataclass(frozen=True)
class RealBatch:
    """``num_images`` tiny_coco training images with 1-3 objects each, resized to a short side.

    images: float RGB 0-255 tensors (3, H, W); targets: ``boxes`` (N, 4) xyxy in resized pixels and
    ``labels`` (N,) contiguous class indices; records / dataset: for the COCO evaluation."""

    dataset: object
    records: tuple
    images: tuple
    targets: tuple


@functools.lru_cache(maxsize=4)
def tiny_coco_batch(root: Path, num_images: int = 2, short_side: int = 256) -> RealBatch:
    """The first ``num_images`` training images of ``root / tiny_coco`` with 1-3 objects (cached)."""
    coco = root / "tiny_coco"
    dataset = read_coco(coco / "annotations/instances_train2017.json", coco / "train2017")
    records = [r for r in dataset.records if 1 <= len(r.labels) <= 3][:num_images]
    images, targets = [], []
    for record in records:
        image = read_image(record.image_path).float()
        resized = resize_shortest_edge(image, short_side, 2 * short_side)
        images.append(resized)
        targets.append({"boxes": record.boxes * (resized.shape[-1] / image.shape[-1]), "labels": record.labels})
    return RealBatch(dataset, tuple(records), tuple(images), tuple(targets))


def overfit(model, batch: RealBatch, iterations: int, **solver_changes):
    """Trains ``model`` on ``batch`` for ``iterations`` steps and scores it on the same images.

    The solver is the model config's with a 10-step warm-up, one LR drop at 80 % of the run and
    ``solver_changes`` (``base_lr``, ``param_groups`` ...). Returns (loss per step, EvaluationResult)."""
    torch.manual_seed(0)
    solver = dict(model.config["solver"], warmup_iters=10, steps=[int(0.8 * iterations)], **solver_changes)
    history = fit_batch(model, list(batch.images), list(batch.targets), iterations, solver, progress=False)
    model.eval()
    with torch.no_grad():
        outputs = model(list(batch.images), original_sizes=[(r.height, r.width) for r in batch.records])
    metrics = evaluate_detections(batch.dataset.json_path, {r.image_id: o for r, o in zip(batch.records, outputs)},
                                  batch.dataset.category_ids)
    return history, metrics


def assert_learned(history: list[float], metrics, max_loss_ratio: float, min_ap50: float,
                   min_ap: Optional[float] = None) -> None:
    """The last loss is below ``max_loss_ratio`` x the first; AP50 (and AP) pass their bars."""
    assert history[-1] < max_loss_ratio * history[0], f"loss only went {history[0]:.2f} -> {history[-1]:.2f}"
    assert metrics.stats["AP50"] >= min_ap50, metrics.table()
    if min_ap is not None:
        assert metrics.stats["AP"] >= min_ap, metrics.table()


def train_steps(model, images, targets, optimizer: torch.optim.Optimizer, steps: int) -> list[dict[str, float]]:
    """The short synthetic overfits (a few heads, a custom optimizer): ``steps`` plain steps on one
    batch; returns each step's losses as floats."""
    history = []
    for _ in range(steps):
        losses = model(images, targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        history.append({k: v.item() for k, v in losses.items()})
    return history
