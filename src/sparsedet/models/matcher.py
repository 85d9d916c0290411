"""Hungarian matching of predictions to ground truth (one-to-one, per image)."""
from __future__ import annotations

from typing import Sequence

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from ..layers.box_ops import generalized_box_iou

CLASS_COSTS = ("focal", "softmax")


def focal_class_cost(logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Focal matching cost: positive minus negative focal term at each target's class.

    Args:
        logits: (P, C) class logits.
        labels: (M,) target classes.

    Returns:
        (P, M) cost; lower = better match.
    """
    prob = logits.sigmoid()
    neg = (1 - alpha) * prob ** gamma * -torch.log(1 - prob + 1e-8)
    pos = alpha * (1 - prob) ** gamma * -torch.log(prob + 1e-8)
    return pos[:, labels] - neg[:, labels]


class HungarianMatcher(nn.Module):
    """Optimal one-to-one assignment minimising ``w_class * class + w_bbox * L1 + w_giou * (-GIoU)``.

    The L1 term compares xyxy boxes normalised by their own image size (each side by its own
    ``(W, H, W, H)``); GIoU is computed on absolute boxes. The cost is computed for the whole batch
    at once; ``scipy.optimize.linear_sum_assignment`` then solves each image's block.

    Args:
        cost_class, cost_bbox, cost_giou: weights of the three terms.
        class_cost: ``focal`` (sigmoid logits, C columns) or ``softmax`` (C+1 logits, last = no object).
    """

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 class_cost: str = "focal", focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        if class_cost not in CLASS_COSTS:
            raise ValueError(f"class_cost must be one of {CLASS_COSTS}, got {class_cost!r}")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.class_cost = class_cost
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    def cost_matrix(self, logits: Tensor, boxes: Tensor, boxes_whwh: Tensor,
                    labels: Tensor, target_boxes: Tensor, target_whwh: Tensor) -> Tensor:
        """Pairwise matching cost.

        Args:
            logits: (P, C) class logits; boxes: (P, 4) abs xyxy; boxes_whwh: (P, 4) image sizes.
            labels: (M,); target_boxes: (M, 4) abs xyxy; target_whwh: (M, 4) image sizes.

        Returns:
            (P, M) float32 cost.
        """
        logits, boxes = logits.float(), boxes.float()
        if self.class_cost == "focal":
            class_cost = focal_class_cost(logits, labels, self.focal_alpha, self.focal_gamma)
        else:
            class_cost = -logits.softmax(-1)[:, labels]
        l1_cost = torch.cdist(boxes / boxes_whwh, target_boxes.float() / target_whwh, p=1)
        giou_cost = -generalized_box_iou(boxes, target_boxes.float())
        return self.cost_bbox * l1_cost + self.cost_class * class_cost + self.cost_giou * giou_cost

    @torch.no_grad()
    def forward(self, logits: Tensor, boxes: Tensor, targets: Sequence[dict]) -> list[tuple[Tensor, Tensor]]:
        """Matches each image's predictions to its targets.

        Args:
            logits: (B, N, C) class logits.
            boxes: (B, N, 4) predicted xyxy boxes in input pixels.
            targets: B dicts with ``labels`` (M_i,), ``boxes`` (M_i, 4) abs xyxy and
                ``image_size_whwh`` (4,) = (W, H, W, H) of the un-padded input image.

        Returns:
            B pairs ``(pred_index, target_index)`` of int64 tensors with min(N, M_i) entries.
        """
        batch, num_queries = logits.shape[:2]
        sizes = [len(t["labels"]) for t in targets]
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty) for _ in targets]
        whwh = torch.stack([t["image_size_whwh"] for t in targets]).to(boxes)
        cost = self.cost_matrix(
            logits.flatten(0, 1), boxes.flatten(0, 1), whwh.repeat_interleave(num_queries, dim=0),
            torch.cat([t["labels"] for t in targets]), torch.cat([t["boxes"] for t in targets]),
            torch.cat([t["image_size_whwh"].expand(n, 4) for t, n in zip(targets, sizes)]).to(boxes),
        ).view(batch, num_queries, -1).cpu()
        if not torch.isfinite(cost).all():
            raise FloatingPointError(
                "matching cost is not finite: predictions contain NaN/inf (training diverged; "
                "lower the learning rate or disable AMP)")
        matches = []
        for i, block in enumerate(cost.split(sizes, dim=-1)):
            if sizes[i] == 0:
                matches.append((empty, empty))
                continue
            rows, cols = linear_sum_assignment(block[i].numpy())
            matches.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return matches


def solve_assignment(cost: Tensor) -> tuple[Tensor, Tensor]:
    """Hungarian assignment of one cost matrix.

    Args:
        cost: (P, M) matching cost, lower = better.

    Returns:
        ``(rows, cols)`` int64 tensors on ``cost.device`` with min(P, M) matched pairs.

    Raises:
        FloatingPointError: the cost holds NaN/inf (diverged predictions).
    """
    empty = torch.empty(0, dtype=torch.int64, device=cost.device)
    if cost.numel() == 0:
        return empty, empty
    cost_cpu = cost.detach().float().cpu()
    if not torch.isfinite(cost_cpu).all():
        raise FloatingPointError(
            "matching cost is not finite: predictions contain NaN/inf (training diverged; "
            "lower the learning rate or disable AMP)")
    rows, cols = linear_sum_assignment(cost_cpu.numpy())
    return (torch.as_tensor(rows, dtype=torch.int64, device=cost.device),
            torch.as_tensor(cols, dtype=torch.int64, device=cost.device))
