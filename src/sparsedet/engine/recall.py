"""``sparsedet eval --anchor-recall``: average recall of a model's generated anchors (and, when it
has them, its supervised proposals) over a data set, as ASAG's table 5e reports."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..data import DetectionDataset, TransformedDataset, build_transforms, collate
from ..evaluation.recall import average_recall
from ..layers.box_ops import box_cxcywh_to_xyxy


@torch.no_grad()
def anchor_recall(model: nn.Module, dataset: DetectionDataset, config: Mapping,
                  budgets=(100, 300, 1000), progress: bool = True) -> dict[str, dict[int, float]]:
    """AR@N of ``model.last_anchors`` (sorted by anchor score) and, for ASAG, of the proposals
    (``model.last_proposals``, sorted by their best class score), one image at a time at the test
    scale, against the non-crowd ground truth in the same resized pixels.

    Returns:
        ``{"anchors": {N: AR}, "proposals": {N: AR}}`` (``proposals`` only when the model has them).
    """
    if not hasattr(model, "last_anchors"):
        raise ValueError(f"--anchor-recall needs a model that exposes the anchors it generates "
                         f"(ASAG: model.last_anchors); {type(model).__name__} has none")
    loader = DataLoader(TransformedDataset(dataset, build_transforms(config.get("input") or {}, train=False)),
                        batch_size=1, collate_fn=collate)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    anchors, proposals, truth = [], [], []
    for images, targets in tqdm(loader, desc="anchor recall", disable=not progress, leave=False):
        model([img.to(device) for img in images])
        generated = model.last_anchors
        valid = generated.valid[0]
        order = generated.scores[0, valid].argsort(descending=True)
        anchors.append(box_cxcywh_to_xyxy(generated.boxes[0, valid][order]).cpu())
        last = getattr(model, "last_proposals", None)
        if last is not None:
            h, w = images[0].shape[-2:]
            boxes = box_cxcywh_to_xyxy(last["boxes"][0, valid]) * torch.tensor([w, h, w, h], device=device)
            order = last["logits"][0, valid].max(-1).values.argsort(descending=True)
            proposals.append(boxes[order].cpu())
        truth.append(targets[0]["boxes"])
    model.train(was_training)
    result = {"anchors": average_recall(anchors, truth, budgets)}
    if proposals:
        result["proposals"] = average_recall(proposals, truth, budgets)
    return result
