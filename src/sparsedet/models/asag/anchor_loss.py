"""Loss of the anchor generator (spec sections 2.2-2.5, "anchors").

Every patch is its own set-prediction problem: its K anchors (patch-relative cxcywh + one
location-score logit) are matched one-to-one, class-agnostically, to the objects centred in it.
* classification, Quality Focal Loss (beta 2): ``BCE(x, 0) sigmoid(x)^2`` for every anchor; a
  matched anchor gets ``BCE(x, u) |u - sigmoid(x)|^2 a`` (u = IoU with its target) instead; an
  unmatched anchor overlapping any target of its patch with IoU >= 0.5 gets 0;
* L1 and 1 - GIoU of matched anchors times ``Norm(s^0.4, u^0.6) a``.
Three groups are summed: P6 (4 flipped copies, inverse area weight), P5 (4 quarters), and the
probing patches of P4 and P3 (times 4 / their number). Everything is divided by the number of
ground-truth boxes.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ...layers.box_ops import box_cxcywh_to_xyxy, box_iou, elementwise_generalized_box_iou
from .config import ASAGLossConfig
from .matching import hungarian_match
from .patches import fixed_patch_targets, flipped_p6_targets, probe_patch_targets
from .query_weighting import area_weight, positive_weight


def single_patch_losses(anchors: Tensor, targets: Tensor, cfg: ASAGLossConfig, inverse_area: bool = False) -> Tensor:
    """Summed (classification, L1, GIoU) of one patch.

    Args:
        anchors: (K, 5) sigmoided patch-relative (cx, cy, w, h) and the score logit.
        targets: (m, 4) patch-relative cxcywh.

    Returns:
        (3,) tensor.
    """
    logits = anchors[:, 4]
    loss_ce = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none") * logits.sigmoid() ** 2
    if len(targets) == 0:
        zero = anchors[:, :4].sum() * 0
        return torch.stack((loss_ce.sum(), zero, zero))
    weight = area_weight(targets, cfg.area_weight, inverse=inverse_area)
    rows, cols = hungarian_match(anchors[:, 4:5], anchors[:, :4], torch.zeros(len(targets), dtype=torch.int64, device=anchors.device),
                                 targets, weight, (cfg.class_weight, cfg.l1_weight, cfg.giou_weight),
                                 cfg.focal_alpha, cfg.focal_gamma)
    boxes, matched = anchors[rows, :4], targets[cols]
    with torch.no_grad():
        overlaps = box_iou(box_cxcywh_to_xyxy(anchors[:, :4]), box_cxcywh_to_xyxy(targets))   # (K, m)
        iou = overlaps[rows, cols]
        score = logits[rows].sigmoid()
        box_weight = positive_weight(score, iou, cfg.gamma1, cfg.gamma2) if cfg.query_weighting else torch.ones_like(iou)
        ignored = overlaps.max(dim=1).values >= 0.5
        ignored[rows] = False
    matched_logits = logits[rows]
    positive = (F.binary_cross_entropy_with_logits(matched_logits, iou, reduction="none")
                * (iou - matched_logits.sigmoid()).abs() ** 2 * weight[cols])
    loss_ce = loss_ce.masked_fill(ignored, 0.0)
    ce = loss_ce.sum() - loss_ce[rows].sum() + positive.sum()
    l1 = ((boxes - matched).abs().sum(-1) * box_weight * weight[cols]).sum()
    giou = elementwise_generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(matched))
    giou_loss = ((1 - giou) * box_weight * weight[cols]).sum()
    return torch.stack((ce, l1, giou_loss))


def anchor_losses(patches: dict, targets: Sequence[dict], sizes_wh: Tensor, num_boxes: float,
                  cfg: ASAGLossConfig, patch_size: int = 15) -> dict[str, Tensor]:
    """Weighted ``loss_ce_anchor``, ``loss_bbox_anchor``, ``loss_giou_anchor``.

    Args:
        patches: ``GeneratedAnchors.patches`` of a training forward.
        targets: per image ``boxes_cxcywh`` (M, 4) normalised to the image.
        sizes_wh: (B, 2) image (W, H).
    """
    p6, p5 = patches["p6"], patches["p5"]
    copies = len(p6.anchors) // len(targets)
    total = p6.anchors.new_zeros(3)
    for i, anchors in enumerate(p6.anchors):
        boxes = targets[int(p6.image_index[i])]["boxes_cxcywh"]
        total = total + single_patch_losses(anchors, flipped_p6_targets(boxes, i % copies, cfg.p6_flip_compat),
                                            cfg, inverse_area=True)
    for i, anchors in enumerate(p5.anchors):
        boxes = targets[int(p5.image_index[i])]["boxes_cxcywh"]
        total = total + single_patch_losses(anchors, fixed_patch_targets(boxes, i % 4, 2 * patch_size, patch_size), cfg)
    probe_total = p6.anchors.new_zeros(3)
    num_probe = 0
    for name in ("P4", "P3"):
        level = patches.get(name)
        if level is None:
            continue
        for anchors, crop, image in zip(level.anchors, level.crops, level.image_index):
            tgt = probe_patch_targets(targets[int(image)]["boxes_cxcywh"], crop, level.stride, sizes_wh[int(image)], patch_size)
            probe_total = probe_total + single_patch_losses(anchors, tgt, cfg)
            num_probe += 1
    if num_probe:
        total = total + probe_total * (4.0 / num_probe)
    total = total / num_boxes
    coef = cfg.anchor_loss_coef
    return {"loss_ce_anchor": total[0] * 2.0 * coef, "loss_bbox_anchor": total[1] * 1.0 * coef,
            "loss_giou_anchor": total[2] * 0.5 * coef}
