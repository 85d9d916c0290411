"""Multi-level RoIAlign with detectron2's level rule (FPN paper eq. 1), and the guard every RoI
pooler runs first: torchvision's ``roi_align`` kernel crashes the process (segmentation fault) on
NaN/inf boxes and aborts on absurdly large ones, which a diverging model produces. The guard turns
them into a ``FloatingPointError``, the trainer's non-finite-step path (skip, count, advise)."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import MultiScaleRoIAlign, roi_align

# A box coordinate beyond this (pixels) only comes from a diverged model; roi_align's adaptive
# sampling would allocate a grid that size.
MAX_BOX_COORDINATE = 1e7


def check_poolable(features: Sequence[Tensor], boxes: Sequence[Tensor]) -> None:
    """Raises ``FloatingPointError`` when any box is non-finite or beyond ``MAX_BOX_COORDINATE``,
    or any feature map is non-finite.

    Args:
        features: feature maps, each (B, C, H, W); pass ``()`` to check the boxes only (the
            poolers do so at inference, where NaN features only give NaN scores, not a crash,
            and a full pass over every map at every head stage would cost time).
        boxes: per image (K_i, 4) xyxy boxes in input pixels.
    """
    for b in boxes:
        if b.numel() and not bool((b.abs() <= MAX_BOX_COORDINATE).all()):  # NaN compares False
            bad = b[~(b.abs() <= MAX_BOX_COORDINATE).all(dim=1)][0].tolist()
            raise FloatingPointError(f"non-finite or diverged box {bad} reached RoIAlign: the model has diverged")
    for f in features:
        if not bool(torch.isfinite(f).all()):
            raise FloatingPointError("non-finite features reached RoIAlign: the model has diverged")


class GuardedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's ``MultiScaleRoIAlign`` (used by ``RoIHeads``) behind ``check_poolable``."""

    def forward(self, x: Mapping[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        check_poolable([x[name] for name in self.featmap_names] if self.training else (), boxes)
        return super().forward(x, boxes, image_shapes)


class MultiLevelRoIAlign(nn.Module):
    """Pools each box from one FPN level chosen by its size.

    ``level = floor(canonical_level + log2(sqrt(area) / canonical_size + 1e-8))``, clamped to the
    levels given. Unlike ``torchvision.ops.MultiScaleRoIAlign`` this uses ``aligned=True`` (the
    half-pixel offset of detectron2's ROIAlignV2) and the level strides are given, not inferred.

    ``level_rule="torchvision"`` with ``aligned=False`` reproduces ``MultiScaleRoIAlign`` (used by
    ASAG's official code): its epsilon sits outside the log,
    ``floor(canonical_level + log2(sqrt(area) / canonical_size) + 1e-6)``, which only differs from
    the default rule for boxes within ~1e-4 px of a level boundary.

    Args:
        levels: pyramid levels of the input features, e.g. ``(2, 3, 4, 5)`` for P2..P5
            (stride ``2 ** level``).
        output_size: side S of the pooled map.
        sampling_ratio: bilinear samples per bin side (0 = adaptive).
    """

    def __init__(self, levels: Sequence[int] = (2, 3, 4, 5), output_size: int = 7,
                 sampling_ratio: int = 2, canonical_size: float = 224.0,
                 canonical_level: int = 4, aligned: bool = True, level_rule: str = "detectron2"):
        super().__init__()
        if level_rule not in ("detectron2", "torchvision"):
            raise ValueError(f"pooler level_rule must be 'detectron2' or 'torchvision', got {level_rule!r}")
        self.level_rule = level_rule
        self.levels = tuple(int(level) for level in levels)
        if list(self.levels) != list(range(self.levels[0], self.levels[0] + len(self.levels))):
            raise ValueError(f"pooler levels must be consecutive, got {self.levels}")
        self.output_size = int(output_size)
        self.sampling_ratio = int(sampling_ratio)
        self.canonical_size = float(canonical_size)
        self.canonical_level = int(canonical_level)
        self.aligned = aligned

    def assign_levels(self, boxes: Tensor) -> Tensor:
        """(K, 4) xyxy boxes -> (K,) index into ``self.levels``."""
        sizes = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
        if self.level_rule == "torchvision":
            levels = torch.floor(self.canonical_level + torch.log2(sizes / self.canonical_size) + 1e-6)
        else:
            levels = torch.floor(self.canonical_level + torch.log2(sizes / self.canonical_size + 1e-8))
        # A NaN size (degenerate box) would give an undefined level; send it to the lowest one.
        levels = torch.nan_to_num(levels, nan=float(self.levels[0]))
        levels = levels.clamp(min=self.levels[0], max=self.levels[-1])
        return (levels - self.levels[0]).to(torch.int64)

    def forward(self, features: Sequence[Tensor], boxes: Sequence[Tensor]) -> Tensor:
        """Pools boxes from a feature pyramid.

        Args:
            features: one (B, C, H_l, W_l) map per level, in ``self.levels`` order.
            boxes: B tensors of (K_i, 4) xyxy boxes in input-image pixels.

        Returns:
            (sum K_i, C, S, S), image-major (all boxes of image 0 first).
        """
        if len(features) != len(self.levels):
            raise ValueError(f"pooler expects {len(self.levels)} feature maps, got {len(features)}")
        check_poolable(features if self.training else (), boxes)
        rois = torch.cat([
            torch.cat([torch.full_like(b[:, :1], i, dtype=torch.float32), b.float()], dim=1)
            for i, b in enumerate(boxes)
        ])
        level_index = self.assign_levels(rois[:, 1:])
        ref = features[0]
        out = ref.new_zeros((rois.shape[0], ref.shape[1], self.output_size, self.output_size))
        for index, (level, feature) in enumerate(zip(self.levels, features)):
            selected = torch.nonzero(level_index == index).squeeze(1)
            if selected.numel() == 0 and not torch.jit.is_tracing():  # an exported graph keeps every level
                continue
            pooled = roi_align(feature, rois[selected].to(feature.dtype), self.output_size,
                               spatial_scale=1.0 / 2 ** level,
                               sampling_ratio=self.sampling_ratio, aligned=self.aligned)
            out.index_copy_(0, selected, pooled.to(out.dtype))
        return out

