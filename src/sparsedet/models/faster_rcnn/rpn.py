"""Region proposal network training (detectron2 ``RPN``): anchor labelling, balanced sampling, losses."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.ops import box_iou

from ...layers.box_coder import BoxCoder
from ..dense.iou_matcher import BACKGROUND, FOREGROUND, IGNORE, IoUMatcher


@torch.no_grad()
def label_rpn_anchors(anchors: Tensor, targets: Sequence[dict], matcher: IoUMatcher,
                      sampler: BalancedPositiveNegativeSampler, box_coder: BoxCoder) -> tuple[Tensor, Tensor]:
    """Matches all levels' anchors jointly against each image's GT boxes, then samples.

    Args:
        anchors: (R, 4) all levels' anchors, concatenated in level order.
        targets: per image ``{"boxes": (M, 4), ...}``.

    Returns:
        labels: (B, R) float: 1 sampled positive, 0 sampled negative, -1 not sampled / ignored.
        gt_deltas: (B, R, 4) regression targets of each anchor's matched GT (zeros without GT).
    """
    all_labels, all_deltas = [], []
    for target in targets:
        boxes = target["boxes"].to(device=anchors.device, dtype=torch.float32)
        matches, match_labels = matcher(box_iou(boxes, anchors))
        labels = torch.full((anchors.shape[0],), -1.0, device=anchors.device)
        labels[match_labels == FOREGROUND] = 1.0
        labels[match_labels == BACKGROUND] = 0.0
        labels[match_labels == IGNORE] = -1.0
        all_labels.append(labels)
        all_deltas.append(box_coder.encode(anchors, boxes[matches]) if boxes.shape[0] else torch.zeros_like(anchors))
    # torchvision's sampler (detectron2 ``subsample_labels`` semantics): at most fraction * n positives,
    # negatives fill the rest of the n per image; returns per-image masks.
    positive, negative = sampler([lb.to(torch.int64) for lb in all_labels])
    sampled = []
    for pos, neg in zip(positive, negative):
        lb = torch.full(pos.shape, -1.0, device=anchors.device)
        lb[neg.bool()] = 0.0
        lb[pos.bool()] = 1.0
        sampled.append(lb)
    return torch.stack(sampled), torch.stack(all_deltas)


def rpn_losses(objectness: Tensor, deltas: Tensor, labels: Tensor, gt_deltas: Tensor, batch_size_per_image: int,
               smooth_l1_beta: float = 0.0) -> dict[str, Tensor]:
    """detectron2's RPN losses, both divided by ``batch_size_per_image * B`` (not by the sampled count).

    Args:
        objectness: (B, R) logits; deltas: (B, R, 4); labels: (B, R) 1 / 0 / -1 (``label_rpn_anchors``);
        gt_deltas: (B, R, 4).

    Returns:
        ``{"loss_rpn_cls": BCE over sampled anchors, "loss_rpn_loc": smooth-L1 (beta 0 = L1) over sampled
        positives}``.
    """
    normalizer = float(batch_size_per_image * labels.shape[0])
    valid = labels >= 0
    positive = labels == 1
    loss_cls = F.binary_cross_entropy_with_logits(objectness[valid].float(), labels[valid], reduction="sum")
    if smooth_l1_beta > 0:
        loss_loc = F.smooth_l1_loss(deltas[positive].float(), gt_deltas[positive], beta=smooth_l1_beta, reduction="sum")
    else:
        loss_loc = F.l1_loss(deltas[positive].float(), gt_deltas[positive], reduction="sum")
    return {"loss_rpn_cls": loss_cls / normalizer, "loss_rpn_loc": loss_loc / normalizer}
