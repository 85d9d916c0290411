"""Reading images as RGB tensors, with EXIF orientation applied."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps


def read_image(path: str | Path) -> torch.Tensor:
    """Reads an image file as a (3, H, W) uint8 RGB tensor, EXIF orientation applied.

    Grayscale, palette, RGBA, CMYK and 16-bit images are converted to 8-bit RGB.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: the file cannot be decoded (names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(img, dtype=np.float64)
                img = Image.fromarray((array / max(array.max(), 1) * 255).astype(np.uint8))
            img = img.convert("RGB")
            array = np.asarray(img, dtype=np.uint8).copy()
    except OSError as err:
        raise ValueError(f"cannot decode image {path}: {err}") from err
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
