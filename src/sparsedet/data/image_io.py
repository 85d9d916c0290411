"""Reading image files: pixels as 8-bit RGB tensors, and sizes from the header alone.

Every size in sparsedet is the size of the *displayed* image, i.e. after the EXIF orientation tag
(0x0112) has been applied, as PIL's ``ImageOps.exif_transpose`` does; annotation boxes refer to
those pixels (the convention of COCO, detectron2 and Ultralytics).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

# EXIF orientations 5-8 rotate by 90 or 270 degrees, so the displayed image has H and W swapped.
# File suffixes read as images wherever a folder is listed (predict, YOLO sets): what PIL decodes, GIF
# (first frame) included, so a file that works alone also works inside a folder.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})

_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION = 0x0112

# What PIL raises for a broken file differs by format and failure: OSError (truncated data,
# unidentified file), SyntaxError (broken PNG chunks), ValueError/EOFError (bad headers), and
# DecompressionBombError (absurd sizes, not an OSError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


@dataclass(frozen=True)
class ImageInfo:
    """An image file's size as displayed (``height``, ``width``: EXIF orientation applied) and as
    stored (``stored_height``, ``stored_width``), and its EXIF orientation (1 when absent)."""

    height: int
    width: int
    stored_height: int
    stored_width: int
    orientation: int


def read_image_info(path: str | Path, decode: bool = False) -> ImageInfo:
    """Reads an image's size from its header; with ``decode=True`` also decodes all pixels, which
    is the only way to find truncated or corrupt data (the header of a truncated JPEG is intact;
    :func:`looks_truncated` finds the likely ones cheaply).

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: the file is not a readable image, or (``decode=True``) its data is corrupt.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            orientation = int(img.getexif().get(_EXIF_ORIENTATION, 1) or 1)
            stored_width, stored_height = img.size
            if decode:
                img.load()
    except _DECODE_ERRORS as err:
        raise ValueError(f"cannot decode image {path}: {err}") from err
    if orientation in _TRANSPOSING_ORIENTATIONS:
        return ImageInfo(stored_width, stored_height, stored_height, stored_width, orientation)
    return ImageInfo(stored_height, stored_width, stored_height, stored_width, orientation)


# (leading magic, bytes a complete file ends with): JPEG SOI ... EOI, PNG signature ... IEND chunk.
_END_MARKERS = ((b"\xff\xd8", b"\xff\xd9"), (b"\x89PNG", b"IEND\xaeB`\x82"))


def looks_truncated(path: str | Path) -> bool:
    """True when a JPEG or PNG file does not end with its end marker, as a cut-off download or copy
    does (two small reads, no decoding). Some writers append bytes after the marker, so a True
    is to be confirmed by decoding the file; other formats give False."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 64))
            tail = f.read().rstrip(b"\x00\r\n ")
    except OSError:
        return False
    return any(head.startswith(magic) and not tail.endswith(end) for magic, end in _END_MARKERS)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. 16/32-bit integer and float images are mapped to 0-255 by their
    nominal range (PIL's own ``convert`` would clip them at 255, i.e. turn them almost white)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit data (PNG/TIFF) arrives as I;16* or as 32-bit "I"; 65535 -> 255.
        array = np.asarray(img, dtype=np.float64) / 257.0
        img = Image.fromarray(np.clip(array + 0.5, 0, 255).astype(np.uint8))
    elif img.mode == "F":
        array = np.asarray(img, dtype=np.float64)
        if np.nanmax(array, initial=0.0) <= 1.0:  # float images in [0, 1]
            array = array * 255.0
        img = Image.fromarray(np.clip(np.nan_to_num(array) + 0.5, 0, 255).astype(np.uint8))
    # Alpha is dropped, not composited, as detectron2 and torchvision's RGB read mode do; CMYK,
    # palette, grayscale and 1-bit images use PIL's conversions.
    return img.convert("RGB")


def read_image(path: str | Path) -> torch.Tensor:
    """Reads an image file as a (3, H, W) uint8 RGB tensor, EXIF orientation applied.

    Grayscale, 1-bit, palette, RGBA/LA, CMYK, 16-bit and float images are converted to 8-bit RGB.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: the file cannot be decoded, e.g. a truncated JPEG (names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            array = np.asarray(_to_rgb(img), dtype=np.uint8).copy()
    except _DECODE_ERRORS as err:
        raise ValueError(f"cannot decode image {path}: {err}") from err
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
