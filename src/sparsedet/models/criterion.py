"""Set prediction loss: Hungarian matching, then focal (or softmax CE), L1 and GIoU on matched pairs."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from ..layers.box_ops import elementwise_generalized_box_iou
from .matcher import HungarianMatcher


def average_num_boxes(targets: Sequence[dict], device: torch.device) -> float:
    """Total target boxes in the local batch, averaged over processes when ``torch.distributed``
    is initialised, and at least 1. Every loss term is divided by it."""
    num_boxes = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(num_boxes)
        num_boxes = num_boxes / dist.get_world_size()
    return max(num_boxes.item(), 1.0)


class SetCriterion(nn.Module):
    """Loss of a set predictor with deep supervision.

    Each stage's output is matched on its own; all stages share ``num_boxes``. Loss keys are
    ``loss_ce``, ``loss_bbox``, ``loss_giou`` for the last stage and ``*_{k}`` for earlier stage k;
    values are already multiplied by their weights, so the total loss is their sum.

    Args:
        num_classes: C foreground classes.
        matcher: the per-stage matcher.
        class_weight, l1_weight, giou_weight: loss weights.
        use_focal: sigmoid focal loss over C logits (sum / num_boxes); otherwise softmax CE over C+1
            logits with ``no_object_weight`` on the last class (PyTorch weighted mean).
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, class_weight: float = 2.0,
                 l1_weight: float = 5.0, giou_weight: float = 2.0, use_focal: bool = True,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0, no_object_weight: float = 0.1):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weights = {"loss_ce": class_weight, "loss_bbox": l1_weight, "loss_giou": giou_weight}
        self.use_focal = use_focal
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        if not use_focal:
            empty_weight = torch.ones(num_classes + 1)
            empty_weight[-1] = no_object_weight
            self.register_buffer("empty_weight", empty_weight, persistent=False)

    def forward(self, stage_outputs: Sequence[dict], targets: Sequence[dict]) -> dict[str, Tensor]:
        """
        Args:
            stage_outputs: per stage (first to last) ``{"pred_logits": (B, N, C), "pred_boxes": (B, N, 4)}``.
            targets: per image ``labels`` (M,), ``boxes`` (M, 4) abs xyxy, ``image_size_whwh`` (4,).
        """
        num_boxes = average_num_boxes(targets, stage_outputs[-1]["pred_logits"].device)
        losses = {}
        last = len(stage_outputs) - 1
        for stage, output in enumerate(stage_outputs):
            suffix = "" if stage == last else f"_{stage}"
            for key, value in self.stage_losses(output, targets, num_boxes).items():
                losses[key + suffix] = value * self.weights[key]
        return losses

    def stage_losses(self, output: dict, targets: Sequence[dict], num_boxes: float) -> dict[str, Tensor]:
        """Unweighted ``loss_ce``, ``loss_bbox``, ``loss_giou`` of one stage."""
        logits, boxes = output["pred_logits"], output["pred_boxes"]
        matches = self.matcher(logits, boxes, targets)
        batch_idx = torch.cat([torch.full_like(pred, i) for i, (pred, _) in enumerate(matches)]).to(logits.device)
        pred_idx = torch.cat([pred for pred, _ in matches]).to(logits.device)
        matched_labels = torch.cat([t["labels"][tgt.to(t["labels"].device)] for t, (_, tgt) in zip(targets, matches)])
        matched_targets = torch.cat([t["boxes"][tgt.to(t["boxes"].device)] for t, (_, tgt) in zip(targets, matches)])
        target_whwh = torch.cat([t["image_size_whwh"].expand(len(tgt), 4) for t, (_, tgt) in zip(targets, matches)])

        if self.use_focal:
            onehot = torch.zeros_like(logits)
            onehot[batch_idx, pred_idx, matched_labels] = 1.0
            loss_ce = sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma, reduction="sum") / num_boxes
        else:
            classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
            classes[batch_idx, pred_idx] = matched_labels
            loss_ce = F.cross_entropy(logits.transpose(1, 2), classes, self.empty_weight)

        matched_boxes = boxes[batch_idx, pred_idx]
        whwh = target_whwh.to(matched_boxes)
        loss_bbox = F.l1_loss(matched_boxes / whwh, matched_targets / whwh, reduction="sum") / num_boxes
        loss_giou = (1 - elementwise_generalized_box_iou(matched_boxes, matched_targets)).sum() / num_boxes
        return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}
