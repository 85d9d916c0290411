"""Running a detector over a data set and scoring it (sharded across processes) with the data set's
own metrics: COCO AP, the CrowdHuman metrics or the VisDrone-DET toolkit (``test.metric``)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..data import DetectionDataset, InferenceSampler, TransformedDataset, build_transforms, collate
from ..evaluation import METRICS, EvaluationResult, evaluate_crowdhuman, evaluate_detections, evaluate_visdrone
from ..evaluation.crowdhuman import crowdhuman_images
from ..evaluation.visdrone import CLASS_WEIGHTINGS, visdrone_images
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
    """Scores ``model`` on ``dataset`` with the config's test scale and batch size.

    The metric is ``test.metric``: ``auto`` (default: the data set's own, i.e. ``dataset.protocol``),
    ``coco``, ``crowdhuman`` or ``visdrone``. ``results_path`` (e.g. ``results.json``) names the
    detections written alongside: the COCO results json; for CrowdHuman the same path with the
    suffix ``.odgt``; for VisDrone a folder of that name without suffix holding one txt per image.
    VisDrone options: ``test.visdrone_class_weighting`` (``image_frequency``, the bundled toolkit
    port's default, or ``uniform``) and ``test.visdrone_max_dets`` (500).
    """
    test_cfg = config.get("test") or {}
    data_cfg = config.get("data") or {}
    metric = resolve_metric(test_cfg.get("metric", "auto"), dataset)
    weighting = test_cfg.get("visdrone_class_weighting", "image_frequency")
    if metric == "visdrone" and weighting not in CLASS_WEIGHTINGS:  # checked before the model runs
        raise ValueError(f"test.visdrone_class_weighting: expected one of {', '.join(CLASS_WEIGHTINGS)}, "
                         f"got {weighting!r}")
    predictions = predict_dataset(model, dataset, config.get("input") or {},
                                  batch_size=int(test_cfg.get("images_per_batch", 1)),
                                  num_workers=int(data_cfg.get("num_workers") or 0), progress=progress)
    return score_predictions(dataset, predictions, metric, test_cfg, results_path)


def resolve_metric(metric: str, dataset: DetectionDataset) -> str:
    """``test.metric`` checked; ``auto`` becomes the data set's protocol.

    Raises:
        ValueError: an unknown metric name, or a metric the data set cannot be scored with.
    """
    if metric not in METRICS:
        raise ValueError(f"test.metric: expected one of {', '.join(METRICS)}, got {metric!r}")
    if metric == "auto":
        return dataset.protocol
    if metric != "coco" and metric != dataset.protocol:
        raise ValueError(f"test.metric: {metric} needs a data set in {metric} format, "
                         f"{dataset.source} is {dataset.protocol}")
    return metric


def score_predictions(dataset: DetectionDataset, predictions: dict[int, dict], metric: str, test_cfg: Mapping,
                      results_path: Optional[Path] = None) -> EvaluationResult:
    """The metric's :class:`EvaluationResult` of ``predictions`` (``predict_dataset`` output) on ``dataset``."""
    if metric == "crowdhuman":
        path = Path(results_path).with_suffix(".odgt") if results_path is not None else None
        return evaluate_crowdhuman(crowdhuman_images(dataset.records, predictions), results_path=path,
                                   class_name=dataset.class_names[0])
    if metric == "visdrone":
        folder = Path(results_path).with_suffix("") if results_path is not None else None
        return evaluate_visdrone(visdrone_images(dataset.records, predictions, dataset.category_ids),
                                 dataset.class_names,
                                 class_weighting=test_cfg.get("visdrone_class_weighting", "image_frequency"),
                                 max_dets=int(test_cfg.get("visdrone_max_dets", 500)), results_dir=folder)
    result = evaluate_detections(dataset.coco_ground_truth(), predictions, dataset.category_ids,
                               class_names=dataset.class_names,
                               image_ids=[r.image_id for r in dataset.records], results_path=results_path)
    result.results_path = str(results_path) if results_path is not None else None
    return result
