"""What every detector does to its input before the backbone, and to its boxes after the head."""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ImagePreprocessor(nn.Module):
    """Checks, colour-orders, normalises and zero-pads a list of images into one batch tensor.

    Input images are RGB ``(3, H, W)`` tensors in 0-255 (float or uint8). Models whose weights
    expect BGR flip the channels here, exactly once. After normalisation the batch is padded at the
    bottom/right to the largest H and W, each rounded up to ``size_divisor``; padding is 0, i.e.
    the mean colour.
    """

    def __init__(self, pixel_mean: Sequence[float], pixel_std: Sequence[float],
                 input_format: str = "RGB", size_divisor: int = 32):
        super().__init__()
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"input_format must be 'RGB' or 'BGR', got {input_format!r}")
        self.input_format = input_format
        self.size_divisor = int(size_divisor)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(3, 1, 1), persistent=False)
        self._warned_range = False

    def forward(self, images: Sequence[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        """
        Returns:
            batch: (B, 3, H_pad, W_pad) normalised float tensor.
            image_sizes: B un-padded (H, W).
        """
        check_images(images)
        device = self.pixel_mean.device
        normalised = []
        for image in images:
            image = image.to(device=device, dtype=torch.float32)
            if self.input_format == "BGR":
                image = image.flip(0)
            normalised.append((image - self.pixel_mean) / self.pixel_std)
            # (skipped while tracing for ONNX export: a data-dependent Python branch)
            if not self._warned_range and not torch.jit.is_tracing() and image.numel() and image.max() <= 1.0:
                warnings.warn("image values are all <= 1: sparsedet models expect 0-255 pixel values "
                              "(multiply by 255)", stacklevel=3)
                self._warned_range = True
        image_sizes = [tuple(img.shape[-2:]) for img in normalised]
        # Integer ceil-division keeps H_pad, W_pad traced (0-dim tensors) under ONNX export, where
        # the sizes are tensors; eagerly they are ints. An exported batch holds one size.
        heights, widths = [h for h, _ in image_sizes], [w for _, w in image_sizes]
        height, width = (heights[0], widths[0]) if torch.jit.is_tracing() else (max(heights), max(widths))
        div = self.size_divisor
        height, width = (height + div - 1) // div * div, (width + div - 1) // div * div
        if torch.jit.is_tracing():  # in-place copies into views are lost by the ONNX exporter
            batch = torch.stack([F.pad(image, (0, width - image.shape[2], 0, height - image.shape[1]))
                                 for image in normalised])
            return batch, image_sizes
        batch = normalised[0].new_zeros((len(normalised), 3, height, width))
        for slot, image in zip(batch, normalised):
            slot[:, :image.shape[1], :image.shape[2]].copy_(image)
        return batch, image_sizes


def build_preprocessor(cfg) -> ImagePreprocessor:
    """The pre-processing a model config asks for: ``cfg.input_format`` / ``pixel_mean`` /
    ``pixel_std`` when given, else the convention of the backbone's weights (caffe ResNets: BGR,
    mean only; everything else: RGB, ImageNet mean/std), padded to ``cfg.size_divisor``."""
    from .backbones.build import PIXEL_CONVENTIONS

    convention = PIXEL_CONVENTIONS[cfg.backbone.layout if cfg.backbone.name == "resnet" else "torchvision"]
    return ImagePreprocessor(cfg.pixel_mean or convention["pixel_mean"], cfg.pixel_std or convention["pixel_std"],
                             cfg.input_format or convention["input_format"], cfg.size_divisor)


def preprocess_inputs(model: nn.Module, images: Sequence[Tensor], targets: Optional[Sequence[dict]] = None,
                      original_sizes: Optional[Sequence[tuple[int, int]]] = None) -> tuple[Tensor, list[tuple[int, int]]]:
    """The input half of every detector's ``forward``: ``model.preprocess`` the images, then check the
    targets (training) or the ``original_sizes`` (inference) against them.

    Returns:
        batch (B, 3, H_pad, W_pad) and the B un-padded (H, W).
    """
    batch, image_sizes = model.preprocess(images)
    if model.training:
        check_targets(targets, len(images), model.num_classes, image_sizes,
                      background_boxes=getattr(model, "accepts_background_boxes", False))
    elif original_sizes is not None and len(original_sizes) != len(image_sizes):
        raise ValueError(f"got {len(original_sizes)} original_sizes for {len(image_sizes)} images")
    return batch, image_sizes


def check_images(images) -> None:
    """Raises ``TypeError``/``ValueError`` naming the bad image when ``images`` is not a non-empty
    list of (3, H, W) float or uint8 tensors."""
    if isinstance(images, Tensor):
        raise TypeError("images must be a list of (3, H, W) tensors, not one tensor; "
                        "pass list(batch) for a (B, 3, H, W) batch")
    if not isinstance(images, (list, tuple)) or len(images) == 0:
        raise ValueError("images must be a non-empty list of (3, H, W) tensors")
    for i, image in enumerate(images):
        if not isinstance(image, Tensor):
            raise TypeError(f"images[{i}] is a {type(image).__name__}, expected a torch.Tensor")
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"images[{i}] has shape {tuple(image.shape)}, expected (3, H, W) RGB")
        if not (image.is_floating_point() or image.dtype == torch.uint8):
            raise TypeError(f"images[{i}] has dtype {image.dtype}, expected a float or uint8 tensor of 0-255 values")
        if image.shape[1] == 0 or image.shape[2] == 0:
            raise ValueError(f"images[{i}] is empty: shape {tuple(image.shape)}")


def check_targets(targets, num_images: int, num_classes: int, image_sizes: Sequence[tuple[int, int]],
                  background_boxes: bool = False) -> None:
    """Raises ``ValueError`` naming the image and field for malformed training targets.

    Each target needs ``boxes`` (M, 4) finite xyxy with x2 > x1 and y2 > y1, and ``labels`` (M,)
    integers in ``[0, num_classes)``, or ``[0, num_classes]`` with ``background_boxes`` (models
    whose label ``num_classes`` marks a box that is trained as background, e.g. VisDrone "others"
    for the dense detectors). M may be 0.
    """
    if targets is None:
        raise ValueError("training needs targets: model(images, targets) with one dict per image")
    if len(targets) != num_images:
        raise ValueError(f"got {len(targets)} targets for {num_images} images")
    for i, target in enumerate(targets):
        for field in ("boxes", "labels"):
            if field not in target:
                raise ValueError(f"targets[{i}] has no {field!r}")
        boxes, labels = target["boxes"], target["labels"]
        if boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"targets[{i}]['boxes'] has shape {tuple(boxes.shape)}, expected (M, 4) xyxy")
        if labels.shape != (boxes.shape[0],):
            raise ValueError(f"targets[{i}]['labels'] has shape {tuple(labels.shape)}, expected ({boxes.shape[0]},)")
        if labels.is_floating_point():
            raise ValueError(f"targets[{i}]['labels'] must be integers, got {labels.dtype}")
        if not torch.isfinite(boxes).all():
            bad = (~torch.isfinite(boxes).all(dim=1)).nonzero()[0].item()
            raise ValueError(f"targets[{i}]['boxes'][{bad}] is not finite: {boxes[bad].tolist()}")
        degenerate = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
        if degenerate.any():
            bad = degenerate.nonzero()[0].item()
            raise ValueError(f"targets[{i}]['boxes'][{bad}] = {boxes[bad].tolist()} is degenerate "
                             "(needs x2 > x1 and y2 > y1, xyxy pixel format)")
        limit = num_classes + 1 if background_boxes else num_classes
        if labels.numel() and (labels.min() < 0 or labels.max() >= limit):
            bad = ((labels < 0) | (labels >= limit)).nonzero()[0].item()
            raise ValueError(f"targets[{i}]['labels'][{bad}] = {labels[bad].item()} is outside "
                             f"[0, {num_classes}) (num_classes={num_classes}; labels are contiguous 0-based)")


def image_sizes_tensor(image_sizes: Sequence[tuple[int, int]], dtype: torch.dtype = torch.float32,
                       device=None) -> Tensor:
    """The B (H, W) image sizes as a (B, 2) tensor. Under ONNX export the sizes are traced 0-dim
    tensors: stacking them keeps them traced, where ``torch.tensor(image_sizes)`` would freeze the
    export-time size into the graph."""
    return torch.stack([torch.stack([torch.as_tensor(v, dtype=dtype, device=device) for v in size])
                        for size in image_sizes])


def rescale_boxes(boxes: Tensor, input_size: tuple[int, int], output_size: Optional[tuple[int, int]]) -> Tensor:
    """Maps (K, 4) xyxy boxes from the network input's (H, W) to ``output_size`` (per-axis scale)
    and clips them to it. ``output_size=None`` only clips to the input."""
    height, width = output_size if output_size is not None else input_size
    # Sizes may be 0-dim tensors (ONNX export traces them); as_tensor keeps both cases exact.
    height, width = (torch.as_tensor(v, dtype=boxes.dtype, device=boxes.device) for v in (height, width))
    in_height, in_width = (torch.as_tensor(v, dtype=boxes.dtype, device=boxes.device) for v in input_size)
    x1, y1, x2, y2 = boxes.unbind(1)
    x_scale, y_scale = width / in_width, height / in_height
    zero = boxes.new_zeros(())
    return torch.stack((torch.minimum(torch.maximum(x1 * x_scale, zero), width),
                        torch.minimum(torch.maximum(y1 * y_scale, zero), height),
                        torch.minimum(torch.maximum(x2 * x_scale, zero), width),
                        torch.minimum(torch.maximum(y2 * y_scale, zero), height)), dim=1)

