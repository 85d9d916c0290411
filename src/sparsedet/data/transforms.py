"""Geometric transforms of the training and test recipes (torchvision.transforms.v2).

Training (Sparse R-CNN §3, QueryDet §4): horizontal flip -> with probability ``crop.probability``
the DETR-style crop branch (short side to one of ``crop.first_resize`` with no max size, then a
crop whose height and width are drawn independently from the integers ``crop.size`` = [lo, hi],
each capped at the image size, at a uniform position) -> shortest-edge resize to a random choice of
``min_size_train`` with the long side at most ``max_size_train`` -> boxes clipped to the image and
boxes with a side <= 1e-5 px dropped (labels follow). Test: the deterministic shortest-edge resize
to ``min_size_test`` / ``max_size_test``, with the same size rounding as :func:`resize_shortest_edge`
so evaluation and ``sparsedet.predict`` see identical inputs.

Only geometry happens here: pixel normalisation, RGB/BGR channel order and padding to the size
divisor are done inside the model (``models/preprocess.py``), so images stay uint8 RGB.

All randomness comes from torch's global RNG, so seeding it before a call (as
``TransformedDataset`` does per sample) makes the augmentation reproducible.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from torchvision.transforms.v2._utils import query_size

from .validation import MIN_BOX_SIDE


def shortest_edge_size(height: int, width: int, short_side: int, max_size: Optional[int]) -> tuple[int, int]:
    """Output (H, W) of detectron2's ResizeShortestEdge: short side to ``short_side`` unless the
    long side would exceed ``max_size`` (None: no limit), rounded to the nearest pixel."""
    scale = short_side / min(height, width)
    if max_size is not None and max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def resize_shortest_edge(image: torch.Tensor, short_side: int, max_size: Optional[int]) -> torch.Tensor:
    """Resizes a (3, H, W) image (bilinear, antialiased) to the test scale of a recipe."""
    size = shortest_edge_size(image.shape[-2], image.shape[-1], short_side, max_size)
    if size == tuple(image.shape[-2:]):
        return image
    return TF.resize(image, list(size), antialias=True)


class ResizeShortestEdge(v2.Transform):
    """Resizes so the short side is one of ``short_sides`` (uniform choice) and the long side is at
    most ``max_size`` (None: unbounded); bilinear with antialiasing, like PIL's resize that
    detectron2 uses. Sizes are rounded as :func:`shortest_edge_size` does."""

    def __init__(self, short_sides: Sequence[int], max_size: Optional[int]):
        super().__init__()
        self.short_sides = [int(s) for s in short_sides]
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = query_size(flat_inputs)
        choice = int(torch.randint(len(self.short_sides), ())) if len(self.short_sides) > 1 else 0
        return {"size": list(shortest_edge_size(height, width, self.short_sides[choice], self.max_size))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(TF.resize, inpt, params["size"], antialias=True)


class RandomAbsoluteRangeCrop(v2.Transform):
    """Crops a window whose height and width are drawn independently and uniformly from the
    integers [min_size, max_size], each capped at the image's side, at a uniform position
    (detectron2's ``RandomCrop("absolute_range")``, DETR's ``RandomSizeCrop``). Boxes are
    shifted and clipped to the window (they may become empty; dropped later)."""

    def __init__(self, min_size: int, max_size: int):
        super().__init__()
        if not 0 < min_size <= max_size:
            raise ValueError(f"crop size range must satisfy 0 < min <= max, got [{min_size}, {max_size}]")
        self.min_size, self.max_size = int(min_size), int(max_size)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = query_size(flat_inputs)
        crop_h = int(torch.randint(min(height, self.min_size), min(height, self.max_size) + 1, ()))
        crop_w = int(torch.randint(min(width, self.min_size), min(width, self.max_size) + 1, ()))
        top = int(torch.randint(height - crop_h + 1, ()))
        left = int(torch.randint(width - crop_w + 1, ()))
        return {"top": top, "left": left, "height": crop_h, "width": crop_w}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(TF.crop, inpt, **params)


class DetectionTransform:
    """``(image, boxes, labels) -> (image, boxes, labels)`` around a v2 pipeline.

    Args (call):
        image: (3, H, W) uint8 RGB.
        boxes: (M, 4) float xyxy pixels of ``image``.
        labels: (M,) int64.

    Returns:
        image (3, h, w) uint8, boxes (M', 4) float32 xyxy in the new pixels, clipped to the image,
        every side > 1e-5, and their labels (M',). Plain tensors, not tv_tensors.
    """

    def __init__(self, pipeline: v2.Transform):
        self.pipeline = pipeline

    def __call__(self, image: Tensor, boxes: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        boxes = tv_tensors.BoundingBoxes(boxes.to(torch.float32).reshape(-1, 4), format="XYXY",
                                         canvas_size=tuple(image.shape[-2:]))
        image, boxes = self.pipeline(tv_tensors.Image(image), boxes)
        boxes = TF.clamp_bounding_boxes(boxes).as_subclass(Tensor)
        keep = ((boxes[:, 2:] - boxes[:, :2]) > MIN_BOX_SIDE).all(dim=1)
        return image.as_subclass(Tensor), boxes[keep], labels[keep]

    def __repr__(self) -> str:
        return f"DetectionTransform({self.pipeline})"


def _sizes(cfg: Mapping, key: str, where: str = "input") -> list[int]:
    value = cfg.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not (isinstance(value, (list, tuple)) and value
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise ValueError(f"{where}.{key}: expected a positive integer or a list of them, got {value!r}")
    return list(value)


def _max_size(cfg: Mapping, key: str) -> Optional[int]:
    value = cfg.get(key)
    if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        raise ValueError(f"input.{key}: expected a positive integer or null, got {value!r}")
    return value


def _probability(cfg: Mapping, key: str, where: str) -> float:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{where}.{key}: expected a probability in [0, 1], got {value!r}")
    return float(value)


def build_transforms(input_cfg: Mapping, train: bool) -> DetectionTransform:
    """The training or test transform of a config's ``input:`` section.

    Keys: ``min_size_train`` (int or list), ``max_size_train``, ``horizontal_flip`` (probability),
    ``crop: {enabled, probability, first_resize: [..], size: [lo, hi]}`` (optional: absent =
    disabled) for training; ``min_size_test``, ``max_size_test`` for test.

    Raises:
        ValueError: a missing or invalid key, named as ``input.<key>``.
    """
    if not train:
        short = _sizes(input_cfg, "min_size_test")
        if len(short) != 1:
            raise ValueError(f"input.min_size_test: expected one size, got {short}")
        return DetectionTransform(ResizeShortestEdge(short, _max_size(input_cfg, "max_size_test")))

    steps: list[v2.Transform] = []
    flip = _probability(input_cfg, "horizontal_flip", "input")
    if flip > 0:
        steps.append(v2.RandomHorizontalFlip(p=flip))
    crop = input_cfg.get("crop") or {}
    if not isinstance(crop, Mapping):
        raise ValueError(f"input.crop: expected a mapping, got {crop!r}")
    if crop.get("enabled", False):
        size = crop.get("size")
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) for s in size)):
            raise ValueError(f"input.crop.size: expected [min, max] integers, got {size!r}")
        branch = v2.Compose([ResizeShortestEdge(_sizes(crop, "first_resize", "input.crop"), None),
                             RandomAbsoluteRangeCrop(size[0], size[1])])
        steps.append(v2.RandomApply([branch], p=_probability(crop, "probability", "input.crop")))
    steps.append(ResizeShortestEdge(_sizes(input_cfg, "min_size_train"), _max_size(input_cfg, "max_size_train")))
    return DetectionTransform(v2.Compose(steps))
