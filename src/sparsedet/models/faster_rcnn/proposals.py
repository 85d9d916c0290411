"""RPN proposals from per-level outputs (detectron2 ``find_top_rpn_proposals``), dense or sparse levels."""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor
from torchvision.ops import batched_nms, clip_boxes_to_image

from ...layers.box_coder import BoxCoder
from ..dense.postprocess import topk_count


class RPNLevelOutputs(NamedTuple):
    """One image's RPN outputs on one level; a dense level has R = H * W * A rows, a Cascade Sparse Query
    level only the anchors of its queried positions (R = n * A)."""

    objectness: Tensor  # (R,) logits
    deltas: Tensor      # (R, 4)
    anchors: Tensor     # (R, 4) xyxy
    level: int


def select_proposals(levels: Sequence[RPNLevelOutputs], box_coder: BoxCoder, image_size: tuple[int, int],
                     pre_nms_topk: int, post_nms_topk: int, nms_threshold: float,
                     min_box_size: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """One image's proposals.

    Per level: the min(pre_nms_topk, R) highest objectness logits, decoded. Then over all levels: clip to
    ``image_size`` (H, W), drop boxes with a side <= ``min_box_size``, NMS separately per level
    (``batched_nms`` with the level as the group), keep the ``post_nms_topk`` best.

    Returns:
        boxes (P, 4) fp32, objectness logits (P,), level (P,) int64 — sorted by decreasing objectness.
    """
    boxes, scores, level_ids = [], [], []
    for lv in levels:
        top, index = lv.objectness.float().topk(topk_count(pre_nms_topk, lv.objectness.shape[0]))
        boxes.append(box_coder.decode(lv.deltas[index].float(), lv.anchors[index].float()))
        scores.append(top)
        level_ids.append(torch.full_like(index, lv.level))
    boxes, scores, level_ids = torch.cat(boxes), torch.cat(scores), torch.cat(level_ids)
    finite = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
    boxes = clip_boxes_to_image(boxes[finite], tuple(image_size))
    scores, level_ids = scores[finite], level_ids[finite]
    keep = ((boxes[:, 2] - boxes[:, 0]) > min_box_size) & ((boxes[:, 3] - boxes[:, 1]) > min_box_size)
    boxes, scores, level_ids = boxes[keep], scores[keep], level_ids[keep]
    keep = batched_nms(boxes, scores, level_ids, nms_threshold)[:post_nms_topk]
    return boxes[keep], scores[keep], level_ids[keep]
