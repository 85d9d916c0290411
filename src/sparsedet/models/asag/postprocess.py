"""ASAG inference post-processing (spec section 5.1): top-k over the valid queries' Q x C scores,
class-wise NMS for setting 300."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from ...layers.box_ops import box_cxcywh_to_xyxy
from ..dense.postprocess import topk_count
from ..preprocess import image_sizes_tensor, rescale_boxes


@torch.no_grad()
def postprocess(logits: Tensor, boxes: Tensor, valid: Tensor, image_sizes: Sequence[tuple[int, int]],
                detections_per_image: int = 100, nms_threshold: Optional[float] = None,
                original_sizes: Optional[Sequence[tuple[int, int]]] = None) -> list[dict]:
    """Detections of one head.

    A query may give several detections with different classes (top-k over the flattened Q x C
    sigmoid scores). Padded queries are dropped first (the official code evaluates batch 1 only).

    Args:
        logits: (B, Q, C); boxes: (B, Q, 4) normalised cxcywh; valid: (B, Q) bool.
        image_sizes: un-padded network-input (H, W); original_sizes: optional output (H, W).
            Boxes are clipped only when mapped to ``original_sizes``; in network pixels they are
            returned as predicted, like the official code.

    Returns:
        per image ``boxes`` (K, 4) xyxy pixels, ``scores`` (K,), ``labels`` (K,), best first.
    """
    results = []
    num_classes = logits.shape[-1]
    for b, (h, w) in enumerate(image_sizes):
        scores = logits[b][valid[b]].sigmoid().flatten()  # the valid queries are the first ones
        top, index = scores.topk(topk_count(detections_per_image, scores.shape[0]))
        labels = index % num_classes
        query = torch.div(index, num_classes, rounding_mode="floor")
        xyxy = box_cxcywh_to_xyxy(boxes[b, query].float()) * image_sizes_tensor([(h, w)], top.dtype, top.device)[:, [1, 0, 1, 0]]
        if nms_threshold is not None:
            keep = batched_nms(xyxy, top, labels, nms_threshold)
            xyxy, top, labels = xyxy[keep], top[keep], labels[keep]
        if original_sizes is not None:
            xyxy = rescale_boxes(xyxy, (h, w), tuple(original_sizes[b]))
        results.append({"boxes": xyxy, "scores": top, "labels": labels})
    return results
