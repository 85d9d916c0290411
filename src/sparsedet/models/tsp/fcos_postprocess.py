"""TSP-FCOS inference post-processing (tsp.md §2.8)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..dense.postprocess import Candidates, merge_detections, topk_count


def tsp_fcos_detections(logits: Tensor, boxes: Tensor, levels: Tensor, num_levels: int, topk_candidates: int,
                        score_threshold: float, nms_threshold: float, max_detections: int,
                        image_size: tuple[int, int], original_size: Optional[tuple[int, int]] = None) -> dict:
    """One image's encoder outputs -> ``{"boxes", "scores", "labels"}``.

    Per level: the (FoI, class) pairs with sigmoid(logit) > ``score_threshold``, at most
    ``topk_candidates`` of them (the best); no centerness; the reported score is sqrt(sigmoid) (as the
    official code; monotone, AP unchanged). Then one class-wise NMS over all levels, the best
    ``max_detections``, rescale to ``original_size``, clip, drop empty boxes (``merge_detections``).

    Args:
        logits: (n, K) set-classifier logits of the image's FoIs; boxes: (n, 4) decoded xyxy pixels of
            the network input; levels: (n,) level index of every FoI.
    """
    num_classes = logits.shape[1]
    candidates = []
    for level in range(num_levels):
        rows = (levels == level).nonzero().squeeze(1)
        probs = logits.index_select(0, rows).float().sigmoid().flatten()
        top, flat = probs.topk(topk_count(topk_candidates, probs.shape[0]))  # shape, not numel(): traced for ONNX
        keep = top > score_threshold
        top, flat = top[keep], flat[keep]
        picked = rows[torch.div(flat, num_classes, rounding_mode="floor")]
        candidates.append(Candidates(boxes.index_select(0, picked).float(), top.sqrt(), flat % num_classes))
    # The pairs above were already filtered; merge_detections filters on the reported sqrt score.
    return merge_detections(candidates, math.sqrt(score_threshold) if score_threshold > 0 else -1.0,
                            nms_threshold, max_detections, image_size, original_size)
