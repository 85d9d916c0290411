"""Patch geometry of the anchor generator: where patches sit, how their features are cut out, how
patch-relative anchors map to image pixels, and which training patches complete a level.

Conventions (spec section 1.4): a probing patch on a level of stride ``s`` is ``P x P`` cells
(P = 15) with integer top-left cell ``(x0, y0)`` ("crop", order x, y). A patch-relative value
``u`` in [0, 1] maps to pixel ``(x0 + P u) s``. Images are ``(W, H)`` un-padded pixels.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import batched_nms, nms

from ...layers.box_ops import box_cxcywh_to_xyxy


def crop_positions(centers: Tensor, stride: int, sizes_wh: Tensor, patch_size: int = 15) -> Tensor:
    """Top-left cells of patches centred on ``centers``.

    ``x0 = floor(cx / s - P/2)``, shifted left/up so that ``x0 + P <= ceil(W / s)``, then clamped
    at 0 (same for y).

    Args:
        centers: (n, 2) pixel centres (x, y).
        sizes_wh: (n, 2) image (W, H) of each patch.

    Returns:
        (n, 2) int64 (x0, y0).
    """
    half = patch_size * stride / 2
    centers = ((centers - half) + (centers + half)) / 2   # via the square's corners, as the official code
    top_left = torch.floor(centers / stride - patch_size / 2)
    extent = torch.ceil(sizes_wh / stride)
    top_left = torch.minimum(top_left, extent - patch_size)
    return top_left.clamp(min=0).to(torch.int64)


def cut_patches(features: Tensor, crops: Tensor, image_index: Tensor, patch_size: int = 15) -> Tensor:
    """Gathers ``P x P`` windows of a feature map as token matrices with one indexing op.

    Args:
        features: (B, D, H_l, W_l) (padded) compressed map.
        crops: (n, 2) int64 top-left cells (x0, y0).
        image_index: (n,) int64 image of each patch.

    Returns:
        (n, P*P, D) tokens, position index ``y * P + x`` (row-major). Cells beyond the map (images
        smaller than a patch) read 0.
    """
    if torch.jit.is_tracing():  # an ONNX trace cannot size the padding from the crops: pad a whole patch
        pad_h = pad_w = patch_size
    else:
        pad_h = max(0, int(crops[:, 1].max()) + patch_size - features.shape[2]) if len(crops) else 0
        pad_w = max(0, int(crops[:, 0].max()) + patch_size - features.shape[3]) if len(crops) else 0
    if pad_h or pad_w:
        features = F.pad(features, (0, pad_w, 0, pad_h))
    offsets = torch.arange(patch_size, device=features.device)
    rows = (crops[:, 1:2].to(features.device) + offsets)[:, :, None]       # (n, P, 1)
    cols = (crops[:, 0:1].to(features.device) + offsets)[:, None, :]       # (n, 1, P)
    tokens = features[image_index.to(features.device)[:, None, None], :, rows, cols]  # (n, P, P, D)
    return tokens.reshape(crops.shape[0], patch_size * patch_size, features.shape[1])


def patch_to_image(anchors: Tensor, crops: Tensor, stride: int, sizes_wh: Tensor, patch_size: int = 15,
                   min_size: float = 3.0) -> Tensor:
    """Patch-relative probing anchors -> image pixels with their probabilities.

    Args:
        anchors: (n, K, 5) sigmoided (cx, cy, w, h) in patch units and the score logit.
        crops: (n, 2) top-left cells; sizes_wh: (n, 2) image (W, H).

    Returns:
        (n, K, 5) pixel (cx, cy, w, h, probability). Anchors centred at or beyond the right/bottom
        image edge and anchors under ``min_size`` px get probability 0 (they are not removed).
    """
    # The official arithmetic, through image-normalised coordinates (equal to
    # ``(x0 + P u) s`` up to float rounding; kept for bit-level parity of the anchors).
    extent = sizes_wh[:, None, :].to(anchors) / stride                       # image size in cells
    centers = anchors[..., :2] * (patch_size / extent) + crops[:, None, :].to(anchors) / extent
    wh = anchors[..., 2:4] * (patch_size / extent)
    prob = anchors[..., 4].sigmoid()
    outside = (centers >= 1).any(-1)
    centers, wh = centers * sizes_wh[:, None, :].to(anchors), wh * sizes_wh[:, None, :].to(anchors)
    tiny = (wh < min_size).any(-1)
    prob = torch.where(outside | tiny, torch.zeros_like(prob), prob)
    return torch.cat((centers, wh, prob[..., None]), dim=-1)


def select_patches(centers: Tensor, scores: Tensor, image_index: Tensor, stride: int,
                   nms_threshold: float, patch_size: int = 15, max_per_image: int | None = None) -> Tensor:
    """Indices of the selected anchors that become patches: a ``P s`` square around each centre,
    per-image NMS at ``nms_threshold`` by score, optionally the best ``max_per_image``.

    Returns:
        (k,) int64 into the inputs, grouped by image (ascending), best score first within an image.
    """
    if not torch.jit.is_tracing() and len(centers) == 0:
        return torch.empty(0, dtype=torch.int64, device=centers.device)
    half = patch_size * stride / 2
    squares = torch.cat((centers - half, centers + half), dim=1)
    keep = batched_nms(squares.float(), scores.float(), image_index, nms_threshold)  # score order
    if torch.jit.is_tracing():  # ONNX has no stable sort: unique keys (image, rank) sort the same way
        rank = torch.arange(keep.shape[0], device=keep.device)
        keep = keep[torch.argsort(image_index[keep] * keep.shape[0] + rank)]
    else:
        keep = keep[torch.sort(image_index[keep], stable=True).indices]
    if max_per_image is not None:
        rank = _rank_within_groups(image_index[keep])
        keep = keep[rank < max_per_image]
    return keep


def _rank_within_groups(groups: Tensor) -> Tensor:
    """Position of each element within its run of equal (sorted) group ids: [0,0,1,1,1] -> [0,1,0,1,2]."""
    if len(groups) == 0:
        return groups
    starts = torch.ones_like(groups, dtype=torch.bool)
    starts[1:] = groups[1:] != groups[:-1]
    index = torch.arange(len(groups), device=groups.device)
    first = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=0).values
    return index - first


def ground_truth_patches(boxes: Tensor, stride: int, size_wh: tuple[float, float], patch_size: int = 15,
                         nms_threshold: float = 0.25, generator: torch.Generator | None = None) -> Tensor:
    """Training patches that each contain a small ground-truth object (spec section 2.1).

    Candidates are boxes smaller than half a patch (``w, h < P s / 2``); central boxes (minus the
    sum of squared centre distances) win an NMS at ``nms_threshold`` among the boxes themselves.
    Each survivor's patch starts at ``floor(x1 / s)``, is shifted to fit inside the image, then
    moved up/left by a random part of the room that keeps the whole box inside (floored, as the
    official code does).

    Args:
        boxes: (M, 4) pixel xyxy boxes of one image.
        size_wh: the image (W, H).

    Returns:
        (n, 2) int64 top-left cells (x0, y0).
    """
    wh = boxes[:, 2:] - boxes[:, :2]
    small = boxes[(wh < patch_size * stride / 2).all(dim=1)]
    if len(small) == 0:
        return torch.empty(0, 2, dtype=torch.int64, device=boxes.device)
    centers = (small[:, :2] + small[:, 2:]) / 2
    centrality = -((centers[:, None] - centers[None]) ** 2).sum(-1).sum(1)
    small = small[nms(small.float(), centrality.float(), nms_threshold)]
    extent = torch.tensor([math.ceil(size_wh[0] / stride), math.ceil(size_wh[1] / stride)],
                          device=boxes.device, dtype=torch.float32)
    top_left = torch.minimum(torch.floor(small[:, :2] / stride), extent - patch_size)
    room = (top_left + patch_size - small[:, 2:] / stride).clamp(min=0)
    jitter = torch.rand(room.shape, generator=generator).to(room)
    top_left = torch.floor(top_left - jitter * room).clamp(min=0)
    return top_left.to(torch.int64)


def random_patches(count: int, stride: int, size_wh: tuple[float, float], patch_size: int = 15,
                   device=None, generator: torch.Generator | None = None) -> Tensor:
    """``count`` uniformly placed training patches: x0 in [0, max(ceil(W/s) - P, 1) - 1], y0 alike.
    Returns (count, 2) int64."""
    high_x = max(math.ceil(size_wh[0] / stride) - patch_size, 1)
    high_y = max(math.ceil(size_wh[1] / stride) - patch_size, 1)
    x0 = torch.randint(0, high_x, (count,), generator=generator)
    y0 = torch.randint(0, high_y, (count,), generator=generator)
    return torch.stack((x0, y0), dim=1).to(device)


def probe_patch_targets(boxes_cxcywh: Tensor, crop: Tensor, stride: int, size_wh: Tensor,
                        patch_size: int = 15) -> Tensor:
    """Targets of one probing patch: objects centred inside it (inclusive) and not larger than it,
    clipped to it, in patch-relative cxcywh (spec section 2.2).

    Args:
        boxes_cxcywh: (M, 4) image-normalised ground truth.
        crop: (2,) top-left cell; size_wh: (2,) image (W, H).

    Returns:
        (m, 4) patch-relative cxcywh.
    """
    span = patch_size * stride
    pixels = boxes_cxcywh * torch.cat((size_wh, size_wh)).to(boxes_cxcywh)
    origin = crop.to(pixels) * stride
    inside = ((pixels[:, :2] >= origin) & (pixels[:, :2] <= origin + span)).all(dim=1)
    fits = (pixels[:, 2:] <= span).all(dim=1)
    xyxy = box_cxcywh_to_xyxy(pixels[inside & fits])
    xyxy = torch.max(torch.min(xyxy, (origin + span).repeat(2)), origin.repeat(2))
    relative = (xyxy - origin.repeat(2)) / span
    return torch.cat(((relative[:, :2] + relative[:, 2:]) / 2, relative[:, 2:] - relative[:, :2]), dim=1)


# Top-left corners (row, col) of the four P5 patches on the 30 x 30 grid: TL, TR, BL, BR.
FIXED_PATCH_ORIGINS = ((0, 0), (0, 15), (15, 0), (15, 15))


def fixed_patch_targets(boxes_cxcywh: Tensor, patch: int, grid: int = 30, patch_size: int = 15) -> Tensor:
    """Targets of P5 patch ``patch`` (0..3 = TL, TR, BL, BR): boxes whose centre lies in its
    quarter (inclusive), clipped to it, in patch-relative cxcywh. (M, 4) -> (m, 4)."""
    row, col = FIXED_PATCH_ORIGINS[patch]
    low = boxes_cxcywh.new_tensor([col / grid, row / grid])
    high = boxes_cxcywh.new_tensor([(col + patch_size) / grid, (row + patch_size) / grid])
    centers = boxes_cxcywh[:, :2]
    inside = ((centers >= low) & (centers <= high)).all(dim=1)
    xyxy = box_cxcywh_to_xyxy(boxes_cxcywh[inside])
    xyxy = torch.max(torch.min(xyxy, high.repeat(2)), low.repeat(2))
    relative = (xyxy - low.repeat(2)) * (grid / patch_size)
    return torch.cat(((relative[:, :2] + relative[:, 2:]) / 2, relative[:, 2:] - relative[:, :2]), dim=1)


def flipped_p6_targets(boxes_cxcywh: Tensor, copy: int, official_bug: bool = False) -> Tensor:
    """Targets of P6 copy ``copy`` (0 original, 1 h-flip, 2 v-flip, 3 hv-flip). With
    ``official_bug`` the xyxy flip formula is applied to cxcywh boxes as the official criterion
    does (spec section 2.2). (M, 4) -> (M, 4)."""
    cx, cy, w, h = boxes_cxcywh.unbind(-1)
    flip_x, flip_y = copy in (1, 3), copy in (2, 3)
    if official_bug:
        if flip_x:
            cx, w = 1 - w, 1 - cx
        if flip_y:
            cy, h = 1 - h, 1 - cy
        return torch.stack((cx, cy, w, h), dim=-1)
    return torch.stack((1 - cx if flip_x else cx, 1 - cy if flip_y else cy, w, h), dim=-1)
