"""Synthetic detection images: coloured shapes on textured backgrounds, deterministic per seed."""
from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

CLASS_NAMES = ("box", "disc", "triangle")


def make_shapes_image(seed: int, height: int = 256, width: int = 320,
                      num_objects: tuple[int, int] = (2, 5)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image with 2-5 shapes of the three ``CLASS_NAMES`` classes, sizes 16..120 px.

    Returns:
        image (3, H, W) uint8 RGB, boxes (M, 4) float xyxy, labels (M,) int64.
    """
    rng = random.Random(seed)
    noise = np.random.default_rng(seed)
    top, bottom = noise.integers(30, 200, size=3), noise.integers(30, 200, size=3)
    ramp = np.linspace(0, 1, height)[:, None, None]
    background = top * (1 - ramp) + bottom * ramp + noise.normal(0, 12, (height, width, 3))
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1))
    draw = ImageDraw.Draw(image)
    boxes, labels = [], []
    for _ in range(rng.randint(*num_objects)):
        label = rng.randrange(len(CLASS_NAMES))
        size_w, size_h = rng.randint(16, 120), rng.randint(16, 120)
        x1, y1 = rng.randint(0, width - size_w), rng.randint(0, height - size_h)
        x2, y2 = x1 + size_w, y1 + size_h
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        if label == 0:
            draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=colour, outline=(0, 0, 0))
        elif label == 1:
            draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=colour, outline=(0, 0, 0))
        else:
            draw.polygon(((x1 + x2) / 2, y1, x2 - 1, y2 - 1, x1, y2 - 1), fill=colour, outline=(0, 0, 0))
        boxes.append((x1, y1, x2, y2))
        labels.append(label)
    tensor = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return tensor, torch.tensor(boxes, dtype=torch.float32), torch.tensor(labels, dtype=torch.int64)
