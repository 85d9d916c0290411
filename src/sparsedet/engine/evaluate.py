"""Running a detector over a data set and scoring it with COCO AP (sharded across processes)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..data import DetectionDataset, InferenceSampler, TransformedDataset, build_transforms, collate
from ..evaluation import EvaluationResult, evaluate_detections
from .distributed import all_gather_objects, is_distributed

log = logging.getLogger("sparsedet.eval")


@torch.no_grad()
def predict_dataset(model: nn.Module, dataset: DetectionDataset, input_cfg: Mapping, batch_size: int = 1,
                    num_workers: int = 0, progress: bool = True) -> dict[int, dict]:
    """Detections for every image of ``dataset``, in its original pixels.

    Each process runs its shard (``InferenceSampler``); the shards are gathered so every process
    returns all images. Images are resized to the recipe's test scale (``input.min_size_test``).

    Returns:
        ``{image_id: {"boxes" (K, 4) xyxy, "scores" (K,), "labels" (K,)}}`` on the CPU.
    """
    rank = torch.distributed.get_rank() if is_distributed() else 0
    world_size = torch.distributed.get_world_size() if is_distributed() else 1
    loader = DataLoader(TransformedDataset(dataset, build_transforms(input_cfg, train=False)),
                        batch_size=batch_size, sampler=InferenceSampler(len(dataset.records), rank, world_size),
                        num_workers=num_workers, collate_fn=collate)
    was_training = model.training
    model.eval()
    predictions: dict[int, dict] = {}
    for images, targets in tqdm(loader, desc="eval", disable=not (progress and rank == 0), dynamic_ncols=True,
                                leave=False):
        outputs = model(images, original_sizes=[tuple(t["orig_size"]) for t in targets])
        for target, output in zip(targets, outputs):
            predictions[int(target["image_id"])] = {k: v.detach().cpu() for k, v in output.items()}
    model.train(was_training)
    merged: dict[int, dict] = {}
    for shard in all_gather_objects(predictions):
        merged.update(shard)
    return merged


def evaluate_model(model: nn.Module, dataset: DetectionDataset, config: Mapping, results_path: Optional[Path] = None,
                   progress: bool = True) -> EvaluationResult:
    """COCO AP of ``model`` on ``dataset`` with the config's test scale and batch size."""
    test_cfg = config.get("test") or {}
    data_cfg = config.get("data") or {}
    predictions = predict_dataset(model, dataset, config.get("input") or {},
                                  batch_size=int(test_cfg.get("images_per_batch", 1)),
                                  num_workers=int(data_cfg.get("num_workers") or 0), progress=progress)
    return evaluate_detections(dataset.coco_ground_truth(), predictions, dataset.category_ids,
                               class_names=dataset.class_names,
                               image_ids=[r.image_id for r in dataset.records], results_path=results_path)
