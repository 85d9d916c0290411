"""Checks shared by the readers: image files against their annotated size, and box sanity.

Policy: a malformed annotation *file* (bad json/xml, missing field, wrong type) is an error that
names the file and the field, since the user has to fix it; a bad *item* (a missing or corrupt
image, a NaN box, an unknown class) is skipped or fixed, counted in the :class:`LoadReport` and
logged, so one bad item out of 100k does not stop a run.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from tqdm import tqdm

from . import records as R
from .image_io import ImageInfo, looks_truncated, read_image_info

CHECK_MODES = ("none", "header", "full")

# Boxes whose width or height is at most this many pixels are dropped, as detectron2's
# ``filter_empty_instances`` does (the training recipe's threshold).
MIN_BOX_SIDE = 1e-5

# Clipping by less than this many pixels is float rounding (xywh sums, normalised YOLO values):
# done silently rather than counted.
_CLIP_REPORT_TOLERANCE = 1e-3


def check_mode(value: str, where: str) -> str:
    """Validates a ``check_images`` value: "none" (trust the annotations), "header" (open each
    image's header: existence, format, size, EXIF orientation; and decode the JPEG/PNG files
    that lack their end marker, i.e. find truncated files up front), "full" (decode every image,
    which also finds corrupt data inside a complete file; slow)."""
    if value not in CHECK_MODES:
        raise ValueError(f"{where}: check_images must be one of {', '.join(CHECK_MODES)}, got {value!r}")
    return value


def inspect_images(paths: Sequence[Path], mode: str, desc: str = "checking images") -> list[
        Union[ImageInfo, Exception, None]]:
    """Reads each image's header (``mode="header"``, decoding the ones that look truncated) or
    decodes it fully (``"full"``).

    Returns:
        per path: its :class:`ImageInfo`, the FileNotFoundError/ValueError it raised, or None
        when ``mode="none"``.
    """
    if mode == "none":
        return [None] * len(paths)
    decode = mode == "full"

    def inspect(path: Path) -> Union[ImageInfo, Exception]:
        try:
            # A truncated file found now is skipped and reported with the others, and left out of
            # the evaluation's ground truth, instead of failing when the loader reaches it.
            return read_image_info(path, decode=decode or looks_truncated(path))
        except (FileNotFoundError, ValueError) as err:
            return err

    # PIL releases the GIL while reading and decoding, so threads overlap the file reads.
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(inspect, paths), total=len(paths), desc=desc, unit="img",
                         disable=None if decode or len(paths) > 1000 else True, leave=False))


def resolve_image_size(path: Path, declared: Optional[tuple[int, int]], info: Union[ImageInfo, Exception, None],
                       report: R.LoadReport, where: str) -> Optional[tuple[int, int]]:
    """The (height, width) to use for an image, or None when it must be skipped (counted).

    Args:
        declared: (height, width) from the annotation file, or None when it gives none.
        info: what :func:`inspect_images` found (None: not checked, trust ``declared``).
        where: the annotation file and field for messages, e.g. "instances.json: images[3]".
    """
    if isinstance(info, FileNotFoundError):
        report.add(R.MISSING_FILE, f"{where}: {path} does not exist")
        return None
    if isinstance(info, Exception):
        report.add(R.UNDECODABLE, f"{where}: {info}")
        return None
    if info is None:
        return declared
    oriented = (info.height, info.width)
    if declared is None or declared == oriented:
        return oriented
    stored = (info.stored_height, info.stored_width)
    if declared == stored:
        # The annotation tool recorded the pixel array's size, ignoring the EXIF rotation. Boxes
        # are taken to refer to the displayed image, as in COCO and detectron2.
        report.add(R.EXIF_SIZE, f"{where}: height/width {declared[0]}x{declared[1]} is the stored size of "
                                f"{path.name}; EXIF orientation {info.orientation} displays it as "
                                f"{oriented[0]}x{oriented[1]}")
        return oriented
    report.add(R.SIZE_MISMATCH, f"{where}: height/width {declared[0]}x{declared[1]} but {path} is "
                                f"{oriented[0]}x{oriented[1]} (boxes would be misplaced)")
    return None


def clean_boxes(boxes: torch.Tensor, height: int, width: int, report: R.LoadReport,
                describe: Callable[[int], str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips boxes to the image and finds the ones to drop, counting each case.

    Args:
        boxes: (M, 4) float xyxy pixels as annotated (may hold NaN, inf, x2 < x1, ...).
        height, width: the image size.
        describe: index -> "file: field" text naming the box's annotation in messages.

    Returns:
        boxes: (M, 4) float32, clipped to [0, width] x [0, height].
        keep: (M,) bool, False for non-finite, negative-size, zero-size and outside boxes.
    """
    boxes = boxes.to(torch.float32).reshape(-1, 4)
    finite = torch.isfinite(boxes).all(dim=1)
    safe = torch.where(finite[:, None], boxes, torch.zeros_like(boxes))
    sides = safe[:, 2:] - safe[:, :2]
    negative = finite & (sides < 0).any(dim=1)
    degenerate = finite & ~negative & (sides <= MIN_BOX_SIDE).any(dim=1)
    clipped = safe.clone()
    clipped[:, 0::2] = clipped[:, 0::2].clamp(0, width)
    clipped[:, 1::2] = clipped[:, 1::2].clamp(0, height)
    valid = finite & ~negative & ~degenerate
    outside = valid & ((clipped[:, 2:] - clipped[:, :2]) <= MIN_BOX_SIDE).any(dim=1)
    changed = valid & ~outside & ((clipped - safe).abs() > _CLIP_REPORT_TOLERANCE).any(dim=1)
    raw = boxes.tolist()
    for i in torch.nonzero(~finite).flatten().tolist():
        report.add(R.BOX_NON_FINITE, f"{describe(i)}: box {raw[i]} is not finite")
    for i in torch.nonzero(negative).flatten().tolist():
        report.add(R.BOX_NEGATIVE, f"{describe(i)}: box {raw[i]} has a negative width or height")
    for i in torch.nonzero(degenerate).flatten().tolist():
        report.add(R.BOX_DEGENERATE, f"{describe(i)}: box {raw[i]} has zero width or height")
    for i in torch.nonzero(outside).flatten().tolist():
        report.add(R.BOX_OUTSIDE, f"{describe(i)}: box {raw[i]} lies outside the {width}x{height} image")
    for i in torch.nonzero(changed).flatten().tolist():
        report.add(R.BOX_CLIPPED, f"{describe(i)}: box {raw[i]} clipped to the {width}x{height} image")
    return clipped, valid & ~outside
