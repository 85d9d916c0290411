"""Losses of anchor-based dense detectors (RetinaNet, QueryDet), spec §1.5 and §2.3.

* classification: sigmoid focal loss on one-hot targets (background = all zeros), summed over the
  non-ignored anchors of a level;
* box regression: smooth-L1 (beta 0.1) on the (dx, dy, dw, dh) deltas of foreground anchors,
  summed per level;
* each level's two sums are multiplied by the level weight beta_l (QueryDet's re-balancing), summed
  over levels and divided by ``max(1, N)``, N an exponential moving average of the number of
  foreground anchors in the batch (``ForegroundNormalizer``);
* QueryDet's query loss: focal loss averaged over every position of a query level (``query_loss``).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...layers.focal_loss import binary_labels, fused_sigmoid_focal_loss


class ForegroundNormalizer(nn.Module):
    """EMA of the number of foreground anchors: ``N <- m * N + (1 - m) * num_foreground``.

    Updated before use at every training step (``update`` returns the new value); starts at
    ``initial`` (100). Each process keeps its own (no all-reduce), as detectron2 does. The value
    is a non-persistent buffer: like detectron2's Python attribute it is not checkpointed, so
    official and sparsedet checkpoints have the same keys (resuming restarts the EMA at 100).
    """

    def __init__(self, initial: float = 100.0, momentum: float = 0.9):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"normalizer momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.register_buffer("value", torch.tensor(float(initial)), persistent=False)

    @torch.no_grad()
    def update(self, num_foreground: Tensor | float) -> Tensor:
        """Folds in this step's foreground count; returns ``max(1, N)`` to divide the losses by."""
        count = torch.as_tensor(num_foreground, dtype=torch.float32, device=self.value.device)
        self.value.mul_(self.momentum).add_((1.0 - self.momentum) * count)
        return self.value.clamp(min=1.0)


def dense_detection_losses(
    logits: Sequence[Tensor], deltas: Sequence[Tensor], gt_classes: Sequence[Tensor],
    gt_deltas: Sequence[Tensor], level_weights: Sequence[float], normalizer: Tensor,
    focal_alpha: float = 0.25, focal_gamma: float = 2.0, smooth_l1_beta: float = 0.1,
) -> dict[str, Tensor]:
    """Focal + smooth-L1 losses summed per level, weighted by ``level_weights``, normalised.

    Args (one entry per level; R_l = anchors of level l over the whole batch):
        logits: (R_l, K) class logits, or any (..., K) shape with R_l rows in C order, e.g. the
            head's (B, H, W, A, K) views (``fused_sigmoid_focal_loss`` reads them in place).
        deltas: (R_l, 4) predicted box deltas.
        gt_classes: int64 of logits' leading shape ((R_l,) or e.g. (B, H, W, A)): class index in
            [0, K) for foreground anchors, K for background, -1 for ignored anchors.
        gt_deltas: (R_l, 4) regression targets (only foreground rows are read).
        level_weights: beta_l per level.
        normalizer: scalar ``max(1, N)`` from ``ForegroundNormalizer.update``.

    Returns:
        ``{"loss_cls": scalar, "loss_box_reg": scalar}`` in fp32.
    """
    if not (len(logits) == len(deltas) == len(gt_classes) == len(gt_deltas) == len(level_weights)):
        raise ValueError("logits, deltas, gt_classes, gt_deltas and level_weights need one entry per level")
    loss_cls = normalizer.new_zeros(())
    loss_box = normalizer.new_zeros(())
    for level_logits, level_deltas, classes, targets, weight in zip(logits, deltas, gt_classes, gt_deltas, level_weights):
        num_classes = level_logits.shape[-1]
        foreground = ((classes >= 0) & (classes < num_classes)).reshape(-1)
        # Labels straight from gt_classes (K = background = all-zero targets, -1 = ignored row).
        level_cls = fused_sigmoid_focal_loss(level_logits, classes, focal_alpha, focal_gamma, "sum")
        level_box = F.smooth_l1_loss(level_deltas[foreground].float(), targets[foreground].float(),
                                     beta=smooth_l1_beta, reduction="sum")
        loss_cls = loss_cls + weight * level_cls
        loss_box = loss_box + weight * level_box
    return {"loss_cls": loss_cls / normalizer, "loss_box_reg": loss_box / normalizer}


def query_loss(logits: Sequence[Tensor], targets: Sequence[Tensor], loss_weight: float = 10.0,
               focal_alpha: float = 0.25, focal_gamma: float = 1.2) -> Tensor:
    """QueryDet's query loss (spec §2.3, official code): per query level, the sigmoid focal loss
    *averaged* over all B * H * W positions, times ``loss_weight``; summed over levels. Not
    weighted by beta_l, not normalised by the number of positives.

    Args:
        logits: per query level, (B, 1, H, W) or (B, H, W) query logits.
        targets: per query level, (B, H, W) 0/1 query targets.
    """
    total = None
    for level_logits, level_targets in zip(logits, targets, strict=True):
        labels = binary_labels(level_targets)
        level = fused_sigmoid_focal_loss(level_logits.reshape(labels.shape[0], 1), labels,
                                         focal_alpha, focal_gamma, "mean")
        total = level * loss_weight if total is None else total + level * loss_weight
    if total is None:
        raise ValueError("query_loss needs at least one query level")
    return total
