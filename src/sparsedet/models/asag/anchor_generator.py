"""ASAG's Adaptive Sparse Anchor Generator (spec section 1.4).

A fixed part predicts K1 anchors in each of the four quarters of a 30 x 30 resize of P5 and in a
whole-image "P6" patch. Adaptive Probing then looks closer where the fixed part is unsure about a
small object: such an anchor becomes a 15 x 15-cell patch on P4 (then P3) that predicts K2 anchors
replacing it. The per-image anchor sets have different sizes; they are padded to the batch maximum
with whole-image boxes and a ``valid`` mask.

Parameter names follow the official ``anchor_generator.*`` keys (``compress.{0,1,2}`` = P3, P4, P5;
``layernorm``/``pos_embedding`` ``{0,1,2}`` = P5+P6, P4, P3).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..preprocess import image_sizes_tensor
from .config import ASAGConfig
from .patches import (crop_positions, cut_patches, ground_truth_patches, patch_to_image, random_patches,
                      select_patches)

# Probing levels in order: (name, stride, compress index, layernorm/pos_embedding index).
PROBING_LEVELS = (("P4", 16, 1, 1), ("P3", 8, 0, 2))
# Offsets (x, y) of the four P5 quarters (TL, TR, BL, BR) in whole-image units.
QUARTER_OFFSETS = ((0.0, 0.0), (0.5, 0.0), (0.0, 0.5), (0.5, 0.5))


class MLP(nn.Module):
    """``layers.{0,1,2}``: Linear-act-Linear-act-Linear (the official ``MLP`` module)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, activation: str = "gelu"):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(in_dim, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, out_dim)])
        self.act = nn.GELU() if activation == "gelu" else nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers[:-1]:
            x = self.act(layer(x))
        return self.layers[-1](x)


@dataclass
class PatchPredictions:
    """Raw predictions of one level's patches, for the anchor loss and the ``--explain`` figure.

    Attributes:
        anchors: (n, K, 5) sigmoided patch-relative (cx, cy, w, h) and the score logit.
        crops: (n, 2) top-left cells (x, y) on the level (probing levels); empty for P6/P5.
        image_index: (n,) image of each patch.
        generated: (n,) True for patches whose anchors go on to the detector (generated patches,
            or ground-truth patches in the first ``target_patch_iters`` iterations).
        stride: level stride in pixels (32 for the fixed part).
    """

    anchors: Tensor
    crops: Tensor
    image_index: Tensor
    generated: Tensor
    stride: int


@dataclass
class GeneratedAnchors:
    """Output of the generator.

    Attributes:
        boxes: (B, Q, 4) pixel cxcywh anchors of each image, padded with whole-image boxes.
        scores: (B, Q) anchor probabilities (padding: 0).
        valid: (B, Q) bool, True for real anchors (always at the front).
        levels: (B, Q) int64 level each anchor came from (5 = P5/P6, 4 = P4, 3 = P3, -1 padding).
        patches: ``p6`` (B*C6 patches: 1 in eval, 4 flipped copies in training), ``p5`` (B*4),
            ``P4``, ``P3`` -> ``PatchPredictions`` (a probing level is absent when probing stopped).
    """

    boxes: Tensor
    scores: Tensor
    valid: Tensor
    levels: Tensor
    patches: dict = field(default_factory=dict)


class AnchorGenerator(nn.Module):
    """``forward(features [P3, P4, P5] (B, d, H_l, W_l), image_sizes [(H, W)], targets=None,
    fast=False) -> GeneratedAnchors``. Targets (training) hold ``boxes`` (M, 4) pixel xyxy."""

    def __init__(self, cfg: ASAGConfig, in_channels: int):
        super().__init__()
        a = cfg.anchors
        self.cfg = cfg
        self.patch_size = a.patch_size
        self.grid = 2 * a.patch_size
        self.k_fixed = cfg.setting_value("anchors_per_fixed_patch")
        self.k_probe = cfg.setting_value("anchors_per_probe_patch")
        self.keep_threshold = cfg.setting_value("keep_threshold")
        self.min_anchors = cfg.setting_value("min_anchors")
        self.max_anchors = cfg.setting_value("max_anchors")
        dim, cells = a.compress_dim, a.patch_size ** 2
        act = nn.GELU if a.activation == "gelu" else nn.ReLU
        self.compress = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_channels, a.compress_hidden, 1), act(),
                          nn.Conv2d(a.compress_hidden, dim, 3, padding=1))
            for _ in range(3))
        self.P6 = nn.Conv2d(dim, dim, 3, stride=2, padding=2, dilation=2)
        self.layernorm = nn.ModuleList(nn.LayerNorm((cells, dim)) for _ in range(3))
        self.pos_embedding = nn.ModuleList(nn.Embedding(cells, dim) for _ in range(3))
        hidden = 125 * dim
        self.proj_all = MLP(cells * dim, hidden, 5 * self.k_fixed, a.activation)
        self.proj_patch = MLP(cells * dim, hidden, 5 * self.k_probe, a.activation)
        # Training iterations seen; the first ``target_patch_iters`` use ground-truth patches as
        # generated ones (the official epoch 0). Saved with the weights so that resuming keeps it.
        self.register_buffer("train_steps", torch.zeros((), dtype=torch.int64))
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Official: xavier_uniform on every >1-D parameter (incl. the (225, 8) LayerNorm weight and
        # bias and the position tables), then zero position tables.
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for table in self.pos_embedding:
            nn.init.zeros_(table.weight)

    # ---------------------------------------------------------------- shared pieces
    def _predict(self, tokens: Tensor, level: int, mlp: MLP, k: int) -> Tensor:
        """(n, 225, 8) patch tokens -> (n, K, 5) sigmoided coordinates + score logit."""
        x = self.layernorm[level](tokens) + self.pos_embedding[level].weight
        out = mlp(x.flatten(1)).view(tokens.shape[0], k, 5)
        return torch.cat((out[..., :4].sigmoid(), out[..., 4:]), dim=-1)

    @staticmethod
    def _tokens(patches: Tensor) -> Tensor:
        """(n, D, P, P) -> (n, P*P, D), position index y * P + x."""
        return patches.flatten(2).transpose(1, 2)

    # ---------------------------------------------------------------- fixed part
    def fixed_part(self, p5: Tensor, image_sizes: Sequence[tuple[int, int]]) -> tuple[Tensor, Tensor]:
        """P5 quarters and the P6 patch.

        Returns:
            raw: (B, 5 or 8, K1, 5) predictions [TL, TR, BL, BR, P6 (, P6 h-flip, v-flip, hv-flip
                in training)], patch-relative.
            anchors: (B, 5*K1, 5) detached pixel (cx, cy, w, h, probability) of the first five.
        """
        compressed = self.compress[2](p5)
        size = self.patch_size
        grids = []
        for b, (h, w) in enumerate(image_sizes):
            # Each image's own valid region is resized (a batched resize would shift anchors).
            rows, cols = _p5_cells(h), _p5_cells(w)
            grids.append(F.interpolate(compressed[b:b + 1, :, :rows, :cols], size=(self.grid, self.grid),
                                       mode="bilinear", align_corners=False))
        grid = torch.cat(grids)                                                   # (B, 8, 30, 30)
        p6 = self.P6(F.relu(grid))                                                 # (B, 8, 15, 15)
        patches = [grid[:, :, r:r + size, c:c + size] for r, c in ((0, 0), (0, size), (size, 0), (size, size))]
        patches.append(p6)
        if self.training:
            patches += [p6.flip(-1), p6.flip(-2), p6.flip(-1).flip(-2)]
        stack = torch.stack(patches, dim=1)                                        # (B, n, 8, 15, 15)
        batch, count = stack.shape[:2]
        raw = self._predict(self._tokens(stack.flatten(0, 1)), 0, self.proj_all, self.k_fixed)
        raw = raw.view(batch, count, self.k_fixed, 5)

        with torch.no_grad():
            coords = raw[:, :5, :, :4].clone()
            for q, (ox, oy) in enumerate(QUARTER_OFFSETS):
                coords[:, q] = coords[:, q] * 0.5 + coords.new_tensor([ox, oy, 0.0, 0.0])
            whwh = image_sizes_tensor(image_sizes, coords.dtype, coords.device)[:, [1, 0, 1, 0]]
            pixels = coords.flatten(1, 2) * whwh[:, None]
            prob = raw[:, :5, :, 4].flatten(1).sigmoid()
            prob = torch.where((pixels[..., 2:] < 3.0).any(-1), torch.zeros_like(prob), prob)
            anchors = torch.cat((pixels, prob[..., None]), dim=-1)
        return raw, anchors

    # ---------------------------------------------------------------- full forward
    def forward(self, features: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]],
                targets: Optional[Sequence[dict]] = None, fast: bool = False) -> GeneratedAnchors:
        p3, p4, p5 = features
        maps = {"P4": p4, "P3": p3}
        device = p5.device
        batch = len(image_sizes)
        sizes_wh = image_sizes_tensor(image_sizes, torch.float32, device)[:, [1, 0]]
        # An ONNX trace records one path through the Python branches below: when tracing, every
        # data-dependent shortcut (early stop, empty levels) is skipped; the full path gives the
        # same anchors on empty tensors.
        tracing = torch.jit.is_tracing()
        cfg = self.cfg.anchors
        training = self.training
        targets_as_generated = training and int(self.train_steps) < cfg.target_patch_iters
        if training:
            self.train_steps += 1

        raw_fixed, current = self.fixed_part(p5, image_sizes)
        everyone = torch.arange(batch, device=device)
        patches = {
            "p6": PatchPredictions(raw_fixed[:, 4:].flatten(0, 1), torch.empty(0, 2, dtype=torch.int64, device=device),
                                   everyone.repeat_interleave(raw_fixed.shape[1] - 4), everyone.new_zeros(0, dtype=torch.bool), 32),
            "p5": PatchPredictions(raw_fixed[:, :4].flatten(0, 1), torch.empty(0, 2, dtype=torch.int64, device=device),
                                   everyone.repeat_interleave(4), everyone.new_zeros(0, dtype=torch.bool), 32),
        }
        current_image = everyone                 # image of each row of ``current``
        current_level, is_fixed = 5, True
        kept: list[list[Tensor]] = [[] for _ in range(batch)]
        kept_levels: list[list[int]] = [[] for _ in range(batch)]
        stop_before = {"P3P6": None, "P4P6": "P3", "P5P6": "P4"}[cfg.inference_levels]

        for name, stride, compress_index, norm_index in PROBING_LEVELS:
            if not training and name == stop_before:
                break
            score, wh = current[..., 4], current[..., 2:4]
            half_patch = self.patch_size * stride / 2
            selected = (score > cfg.low_threshold) & (score < cfg.high_threshold) & (wh < half_patch).all(-1)
            if fast:
                counts = torch.zeros(batch, dtype=torch.int64, device=device).index_add_(
                    0, current_image, selected.sum(-1))
                selected &= (counts >= cfg.fast_stop_below)[current_image][:, None]
            if not training and not tracing and not selected.any():
                break  # official: stop only when nothing in the whole batch is selected (eval)

            # Patches around the selected anchors (none while ground-truth patches stand in).
            if targets_as_generated:
                crops = torch.empty(0, 2, dtype=torch.int64, device=device)
                crop_images = current_image[:0]
            else:
                rows, cols = selected.nonzero(as_tuple=True)
                chosen = select_patches(current[rows, cols, :2], current[rows, cols, 4], current_image[rows],
                                        stride, cfg.patch_nms_threshold, self.patch_size,
                                        cfg.fast_max_patches if fast else cfg.max_patches)
                crop_images = current_image[rows[chosen]]
                crops = crop_positions(current[rows[chosen], cols[chosen], :2], stride, sizes_wh[crop_images],
                                       self.patch_size)
            generated = torch.ones_like(crops[:, 0], dtype=torch.bool)

            # "Correct and replace": anchors sent to probing are dropped from this level.
            keep = current[..., 4] > self.keep_threshold
            if not targets_as_generated:
                keep = keep & ~selected
            self._gather(kept, kept_levels, current, current_image, keep, is_fixed, current_level)

            if training:
                crops, crop_images, generated = self._complete_training_patches(
                    crops, crop_images, stride, image_sizes, targets, targets_as_generated)
            if not tracing and len(crops) == 0:
                current = current.new_zeros(0, self.k_probe, 5)
                current_image = current_image[:0]
                current_level, is_fixed = int(name[1]), False
                continue
            compressed = self.compress[compress_index](maps[name])
            tokens = cut_patches(compressed, crops, crop_images, self.patch_size)
            raw = self._predict(tokens, norm_index, self.proj_patch, self.k_probe)
            patches[name] = PatchPredictions(raw, crops, crop_images, generated, stride)
            with torch.no_grad():
                current = patch_to_image(raw[generated].detach(), crops[generated], stride,
                                         sizes_wh[crop_images[generated]], self.patch_size)
            current_image = crop_images[generated]
            current_level, is_fixed = int(name[1]), False

        keep = current[..., 4] > self.keep_threshold
        self._gather(kept, kept_levels, current, current_image, keep, is_fixed, current_level)
        return self._pad(kept, kept_levels, sizes_wh, patches)

    def _gather(self, kept, kept_levels, anchors: Tensor, image_index: Tensor, keep: Tensor,
                is_fixed: bool, level: int) -> None:
        """Appends each image's kept anchors; on the fixed part an image keeping fewer than
        ``min_anchors`` takes its ``min_anchors`` best among all of them instead."""
        tracing = torch.jit.is_tracing()
        for b in range(len(kept)):
            rows = (image_index == b).nonzero(as_tuple=True)[0]
            if not tracing and len(rows) == 0:
                continue
            image_anchors = anchors[rows].reshape(-1, 5)
            image_keep = keep[rows].reshape(-1)
            if is_fixed and tracing:
                chosen = image_anchors[_fixed_part_choice(image_anchors[:, 4], image_keep, self.min_anchors)]
            elif is_fixed and int(image_keep.sum()) < self.min_anchors:
                chosen = image_anchors[image_anchors[:, 4].topk(min(self.min_anchors, len(image_anchors))).indices]
            else:
                chosen = image_anchors[image_keep]
            kept[b].append(chosen)
            kept_levels[b].append(torch.full_like(chosen[:, 4], level, dtype=torch.int64))

    def _complete_training_patches(self, crops, crop_images, stride, image_sizes, targets, targets_as_generated):
        """Adds ground-truth and random patches until each image has ``min_training_patches``
        on this level (spec section 2.1). Returns crops, images and the ``generated`` flags."""
        need = self.cfg.anchors.min_training_patches
        device = crops.device
        all_crops, all_images, all_generated = [], [], []
        for b, (h, w) in enumerate(image_sizes):
            mine = crops[crop_images == b]
            pieces, flags = [mine], [torch.ones(len(mine), dtype=torch.bool, device=device)]
            boxes = targets[b]["boxes"].to(device=device, dtype=torch.float32) if targets is not None else None
            gt = (ground_truth_patches(boxes, stride, (w, h), self.patch_size, self.cfg.anchors.patch_nms_threshold)
                  if boxes is not None and len(boxes) else torch.empty(0, 2, dtype=torch.int64, device=device))
            if targets_as_generated:
                pieces.append(gt)
                flags.append(torch.ones(len(gt), dtype=torch.bool, device=device))
            elif len(mine) < need and len(gt):
                take = gt[torch.randperm(len(gt))[:need - len(mine)].to(device)]
                pieces.append(take)
                flags.append(torch.zeros(len(take), dtype=torch.bool, device=device))
            count = sum(len(p) for p in pieces)
            if count < need:
                pieces.append(random_patches(need - count, stride, (w, h), self.patch_size, device))
                flags.append(torch.zeros(need - count, dtype=torch.bool, device=device))
            merged = torch.cat(pieces)
            all_crops.append(merged)
            all_images.append(torch.full((len(merged),), b, dtype=torch.int64, device=device))
            all_generated.append(torch.cat(flags))
        return torch.cat(all_crops), torch.cat(all_images), torch.cat(all_generated)

    def _pad(self, kept, kept_levels, sizes_wh: Tensor, patches: dict) -> GeneratedAnchors:
        """Per image: concatenate, keep the ``max_anchors`` best, pad to the batch maximum."""
        per_image, per_level = [], []
        for anchors, levels in zip(kept, kept_levels):
            anchors, levels = torch.cat(anchors), torch.cat(levels)
            if torch.jit.is_tracing():
                best = _best_if_over(anchors[:, 4], self.max_anchors)
                anchors, levels = anchors[best], levels[best]
            elif len(anchors) > self.max_anchors:
                best = anchors[:, 4].topk(self.max_anchors).indices
                anchors, levels = anchors[best], levels[best]
            per_image.append(anchors)
            per_level.append(levels)
        if len(per_image) == 1:  # one image: nothing to pad (and no Python count for an ONNX trace)
            anchors, levels = per_image[0], per_level[0]
            return GeneratedAnchors(anchors[None, :, :4].contiguous(), anchors[None, :, 4].contiguous(),
                                    torch.ones_like(levels, dtype=torch.bool)[None],
                                    levels[None], patches)
        q = max(len(a) for a in per_image)
        batch = len(per_image)
        device = sizes_wh.device
        boxes = torch.cat((sizes_wh / 2, sizes_wh), dim=1)[:, None, :].repeat(1, q, 1)
        scores = torch.zeros(batch, q, device=device)
        valid = torch.zeros(batch, q, dtype=torch.bool, device=device)
        levels = torch.full((batch, q), -1, dtype=torch.int64, device=device)
        for b, (anchors, level) in enumerate(zip(per_image, per_level)):
            n = len(anchors)
            boxes[b, :n] = anchors[:, :4]
            scores[b, :n] = anchors[:, 4]
            valid[b, :n] = True
            levels[b, :n] = level
        return GeneratedAnchors(boxes, scores, valid, levels, patches)


# ---------------------------------------------------------------- traceable forms (ONNX export)
def _p5_cells(size):
    """P5 cells of an image side: ``max(1, round(size / 32))`` (round half to even, as Python's
    ``round``); a traced 0-dim size stays a traced value."""
    if isinstance(size, Tensor):
        return torch.clamp(torch.round(size / 32), min=1).to(torch.int64)
    return max(1, round(size / 32))


def _fixed_part_choice(scores: Tensor, keep: Tensor, min_anchors: int) -> Tensor:
    """The fixed part's choice of ``_gather`` without a Python branch: the kept anchors in their
    order, or, when fewer than ``min_anchors`` are kept, the ``min(min_anchors, n)`` best by score.
    Returns indices into ``scores`` (n,)."""
    n = scores.shape[0]
    position = torch.arange(n, device=scores.device)
    too_few = keep.sum() < min_anchors
    # One top-k serves both cases: by score, or by reversed position among the kept (= their order).
    in_order = torch.where(keep, (n - position).to(scores.dtype), torch.full_like(scores, -1.0))
    count = torch.where(too_few, torch.clamp(torch.ones_like(position).sum(), max=min_anchors), keep.sum())
    return torch.where(too_few, scores, in_order).topk(count).indices


def _best_if_over(scores: Tensor, max_anchors: int) -> Tensor:
    """``_pad``'s cap without a Python branch: all n indices in order, or the ``max_anchors`` best by
    score when n > ``max_anchors``."""
    count = torch.clamp(torch.ones_like(scores, dtype=torch.int64).sum(), max=max_anchors)
    best = scores.topk(count).indices
    return torch.where(torch.ones_like(scores, dtype=torch.int64).sum() > max_anchors, best,
                       torch.arange(scores.shape[0], device=scores.device)[:max_anchors])
