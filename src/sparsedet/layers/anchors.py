"""Grid anchors with detectron2 ``DefaultAnchorGenerator`` semantics (dense detectors, QueryDet).

Why not torchvision's ``AnchorGenerator``: it rounds the cell anchors and orders them ratio-major,
while detectron2 keeps them unrounded and size-major. The predictors' channel layout follows the
anchor order, so official (detectron2) checkpoints only work with detectron2's order.

Conventions (spec §1.2):
* cell anchor for size s and aspect ratio r = h / w: ``w = sqrt(s^2 / r)``, ``h = r * w``, box
  ``(-w/2, -h/2, w/2, h/2)``, no rounding;
* the A = len(sizes) * len(ratios) cell anchors are ordered size-major, ratio-minor;
* position (y, x) of a level with stride S has its anchors centred on
  ``((x + offset) * S, (y + offset) * S)`` in padded-image pixels (offset 0 by default);
* a level's anchors are flattened row-major over positions, then over the cell anchors:
  anchor index = ``(y * W + x) * A + a``.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
from torch import Tensor, nn


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> Tensor:
    """(len(sizes) * len(aspect_ratios), 4) xyxy anchors centred on (0, 0), size-major."""
    anchors = []
    for size in sizes:
        area = float(size) ** 2
        for ratio in aspect_ratios:
            w = math.sqrt(area / ratio)
            h = ratio * w
            anchors.append((-w / 2.0, -h / 2.0, w / 2.0, h / 2.0))
    return torch.tensor(anchors, dtype=torch.float32)


def octave_sizes(base_size: float, scales_per_octave: int) -> tuple:
    """``base_size * 2^(i / scales_per_octave)`` for i < scales_per_octave (RetinaNet: 3 sizes)."""
    return tuple(base_size * 2.0 ** (i / scales_per_octave) for i in range(scales_per_octave))


class AnchorGenerator(nn.Module):
    """Anchors of every pyramid level, on demand for any feature-map size or set of positions.

    Args:
        levels: pyramid levels, e.g. (3, 4, 5, 6, 7); level l has stride 2^l.
        sizes: per level, the anchor sizes (square-root areas) in pixels, e.g. ``(32, 40.3, 50.8)``.
        aspect_ratios: h / w ratios shared by all levels.
        offset: anchor centre offset in units of the stride (detectron2 default 0.0).

    The cell anchors are non-persistent buffers: they follow ``.to(device)`` but are not part of
    the state_dict (official checkpoints may store them; converters drop and regenerate them).

    ``grid_anchors(..., cache=True)`` (inference) keeps the last ``GRID_CACHE_SIZE`` grids, so that
    a stream of same-size images does not rebuild them (~15 small ops per level per call).
    """

    GRID_CACHE_SIZE = 16

    def __init__(self, levels: Sequence[int], sizes: Sequence[Sequence[float]],
                 aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0), offset: float = 0.0):
        super().__init__()
        if len(levels) != len(sizes):
            raise ValueError(f"got {len(sizes)} anchor size lists for {len(levels)} levels")
        counts = {len(s) for s in sizes}
        if len(counts) != 1:
            raise ValueError(f"every level needs the same number of anchor sizes, got {[len(s) for s in sizes]}")
        self.levels = tuple(int(lvl) for lvl in levels)
        self.strides = {lvl: 2 ** lvl for lvl in self.levels}
        self.offset = float(offset)
        self.num_anchors = counts.pop() * len(aspect_ratios)
        for lvl, level_sizes in zip(self.levels, sizes):
            self.register_buffer(f"cell_anchors_p{lvl}", cell_anchors(level_sizes, aspect_ratios), persistent=False)
        self._grid_cache: "OrderedDict[tuple, Tensor]" = OrderedDict()

    def cell_anchors(self, level: int) -> Tensor:
        """(A, 4) anchors of ``level`` centred on (0, 0)."""
        if level not in self.strides:
            raise KeyError(f"no anchors for level P{level}; levels are {['P%d' % l for l in self.levels]}")
        return getattr(self, f"cell_anchors_p{level}")

    def grid_anchors(self, level: int, height: int, width: int, cache: bool = False) -> Tensor:
        """(height * width * A, 4) anchors of a whole (height, width) map, index (y * W + x) * A + a.

        ``cache=True``: reuse the grid from an earlier call with the same level, size and cell
        anchors (same tensor: read it, never modify it in place). Never while tracing (ONNX export
        traces the sizes) or compiling.
        """
        cell = self.cell_anchors(level)
        if not cache or torch.jit.is_tracing() or torch.compiler.is_compiling() or cell.is_inference():
            return self._grid(cell, self.strides[level], height, width)
        key = (level, int(height), int(width), cell.device, cell.dtype, cell.data_ptr(), cell._version, self.offset)
        grid = self._grid_cache.get(key)
        if grid is None:
            # A normal tensor even inside inference_mode, usable by later calls in any mode.
            with torch.inference_mode(False), torch.no_grad():
                grid = self._grid(cell, self.strides[level], height, width)
            self._grid_cache[key] = grid
            while len(self._grid_cache) > self.GRID_CACHE_SIZE:
                self._grid_cache.popitem(last=False)
        else:
            self._grid_cache.move_to_end(key)
        return grid

    def _grid(self, cell: Tensor, stride: int, height: int, width: int) -> Tensor:
        ys = torch.arange(height, device=cell.device, dtype=torch.float32)
        xs = torch.arange(width, device=cell.device, dtype=torch.float32)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        return self._place(cell, stride, grid_y.reshape(-1), grid_x.reshape(-1))

    def _apply(self, fn, *args, **kwargs):
        self._grid_cache.clear()   # .to(device) / .double(): the cached grids are on the old one
        return super()._apply(fn, *args, **kwargs)

    def anchors_at(self, level: int, ys: Tensor, xs: Tensor) -> Tensor:
        """(n * A, 4) anchors at n positions ``(ys[i], xs[i])`` of ``level``, position-major.

        Row ``i * A + a`` equals row ``(ys[i] * W + xs[i]) * A + a`` of ``grid_anchors`` for any map
        width W: Cascade Sparse Query decodes its sparse outputs with these.
        """
        if ys.shape != xs.shape or ys.dim() != 1:
            raise ValueError(f"ys and xs must be 1-D of equal length, got {tuple(ys.shape)} and {tuple(xs.shape)}")
        cell = self.cell_anchors(level)
        return self._place(cell, self.strides[level], ys.to(cell.device, torch.float32),
                           xs.to(cell.device, torch.float32))

    def forward(self, feature_shapes: Sequence[tuple[int, int]]) -> list[Tensor]:
        """Per level (in ``levels`` order), the (H * W * A, 4) anchors for the given (H, W) shapes."""
        if len(feature_shapes) != len(self.levels):
            raise ValueError(f"got {len(feature_shapes)} feature shapes for levels {self.levels}")
        return [self.grid_anchors(lvl, h, w) for lvl, (h, w) in zip(self.levels, feature_shapes)]

    def _place(self, cell: Tensor, stride: int, ys: Tensor, xs: Tensor) -> Tensor:
        # Centres in float32 like detectron2 (arange * stride is exact for integer positions).
        cx = (xs + self.offset) * stride
        cy = (ys + self.offset) * stride
        shifts = torch.stack((cx, cy, cx, cy), dim=1)                 # (n, 4)
        return (shifts[:, None, :] + cell[None, :, :]).reshape(-1, 4)  # (n * A, 4)
