"""Training proposals of TSP-RCNN's box head (spec §3.3): argmax-IoU labels, noisy GTs only when an
image has no foreground proposal, the 700 / 0.25 sampler and the per-image random keep of 70-100 %."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torchvision.ops import box_iou


class LabelledProposals(NamedTuple):
    """One image's proposals with their targets; P rows.

    Attributes:
        boxes: (P, 4) xyxy proposals.
        gt_classes: (P,) int64 class of the argmax-IoU GT when IoU >= threshold, else ``num_classes``.
        gt_boxes: (P, 4) the argmax-IoU GT's box (meaningful for foreground rows only).
        gt_indices: (P,) int64 index of the argmax-IoU GT within the image (0 without GT).
    """

    boxes: Tensor
    gt_classes: Tensor
    gt_boxes: Tensor
    gt_indices: Tensor

    def select(self, index: Tensor) -> "LabelledProposals":
        return LabelledProposals(*(t[index] for t in self))


def label_proposals(proposals: Tensor, gt_boxes: Tensor, gt_labels: Tensor, num_classes: int,
                    iou_threshold: float, strict: bool = False) -> LabelledProposals:
    """Each proposal takes its argmax-IoU GT; foreground iff that IoU >= ``iou_threshold`` (code: no
    low-quality matches, detectron2 ``Matcher([thr], [0, 1])``), or IoU > threshold with ``strict`` (paper).

    Args:
        proposals: (P, 4) xyxy; gt_boxes: (M, 4) xyxy; gt_labels: (M,) in [0, num_classes).
    """
    num = proposals.shape[0]
    if gt_boxes.shape[0] == 0:
        return LabelledProposals(proposals, torch.full((num,), num_classes, dtype=torch.int64, device=proposals.device),
                                 torch.zeros_like(proposals), torch.zeros(num, dtype=torch.int64, device=proposals.device))
    best_iou, best_gt = box_iou(gt_boxes.float(), proposals.float()).max(dim=0)
    classes = gt_labels.to(torch.int64)[best_gt]
    foreground = best_iou > iou_threshold if strict else best_iou >= iou_threshold
    classes = torch.where(foreground, classes, torch.full_like(classes, num_classes))
    return LabelledProposals(proposals, classes, gt_boxes[best_gt].to(proposals.dtype), best_gt)


def noisy_gt_boxes(gt_boxes: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Jittered copies of (M, 4) xyxy GT boxes (official fallback when no proposal is foreground):
    the centre moves by w * U(-0.1, 0.1) and h * U(-0.1, 0.1), w and h are each scaled by 0.8^U(-1, 1)."""
    w = gt_boxes[:, 2] - gt_boxes[:, 0]
    h = gt_boxes[:, 3] - gt_boxes[:, 1]
    cx = gt_boxes[:, 0] + 0.5 * w
    cy = gt_boxes[:, 1] + 0.5 * h
    u = torch.rand((gt_boxes.shape[0], 4), generator=generator, device=gt_boxes.device, dtype=gt_boxes.dtype) * 2 - 1
    cx = cx + w * 0.1 * u[:, 0]
    cy = cy + h * 0.1 * u[:, 1]
    w = w * 0.8 ** u[:, 2]
    h = h * 0.8 ** u[:, 3]
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=1)


def sample_foreground_background(gt_classes: Tensor, num_classes: int, batch_size: int, positive_fraction: float,
                                 generator: Optional[torch.Generator] = None) -> Tensor:
    """detectron2 ``subsample_labels``: at most ``int(batch_size * positive_fraction)`` random
    foreground rows, background fills up to ``batch_size``. Returns the kept row indices, fg first."""
    foreground = torch.nonzero(gt_classes < num_classes).squeeze(1)
    background = torch.nonzero(gt_classes == num_classes).squeeze(1)
    num_fg = min(foreground.numel(), int(batch_size * positive_fraction))
    num_bg = min(background.numel(), batch_size - num_fg)
    fg = foreground[torch.randperm(foreground.numel(), generator=generator)[:num_fg].to(foreground.device)]
    bg = background[torch.randperm(background.numel(), generator=generator)[:num_bg].to(background.device)]
    return torch.cat((fg, bg))


def random_keep(num: int, keep_ratio_min: float, generator: Optional[torch.Generator] = None,
                device=None, keep_ratio_max: float = 1.0) -> Tensor:
    """Indices of ``int(num * f)`` distinct random rows, f = max - U[0, 1) * (max - min), i.e. f in
    (keep_ratio_min, keep_ratio_max] (official: keep 70-100 %). min = max = 1 keeps every row in order."""
    if keep_ratio_min >= 1.0:
        return torch.arange(num, device=device)
    fraction = keep_ratio_max - float(torch.rand((), generator=generator)) * (keep_ratio_max - keep_ratio_min)
    return torch.randperm(num, generator=generator)[:int(num * fraction)].to(device)


def sample_training_proposals(proposals: Tensor, gt_boxes: Tensor, gt_labels: Tensor, num_classes: int,
                              iou_threshold: float, batch_size: int, positive_fraction: float,
                              keep_ratio_min: float, generator: Optional[torch.Generator] = None,
                              keep_ratio_max: float = 1.0, strict: bool = False) -> LabelledProposals:
    """The whole spec §3.3 pipeline for one image: label, noisy-GT fallback, sample, random keep.

    GT boxes are *not* appended (unlike stock detectron2), except the noisy copies when the image has
    GT boxes but no foreground proposal.
    """
    labelled = label_proposals(proposals, gt_boxes, gt_labels, num_classes, iou_threshold, strict)
    if gt_boxes.shape[0] and not bool((labelled.gt_classes < num_classes).any()):
        boxes = torch.cat((proposals, noisy_gt_boxes(gt_boxes.to(proposals.dtype), generator)))
        labelled = label_proposals(boxes, gt_boxes, gt_labels, num_classes, iou_threshold, strict)
    labelled = labelled.select(sample_foreground_background(labelled.gt_classes, num_classes, batch_size,
                                                            positive_fraction, generator))
    return labelled.select(random_keep(labelled.boxes.shape[0], keep_ratio_min, generator, labelled.boxes.device,
                                       keep_ratio_max))
