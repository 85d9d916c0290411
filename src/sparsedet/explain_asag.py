"""Where did ASAG put its anchors? (ASAG paper, figures 1 and 6.)

``explain_asag(model, image)`` runs an ASAG model on one image and draws four panels over it:
the fixed part (the four P5 quarters and the whole-image P6 patch) with the anchors it kept, the
P4 probing patches with their anchors, the P3 probing patches with theirs, and the final
detections. ``sparsedet predict --explain`` writes it next to the annotated image.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image
from torch import nn

from .data.image_io import read_image
from .data.transforms import resize_shortest_edge
from .visualize import class_colour

LEVEL_COLOURS = {5: "#1f77b4", 4: "#ff7f0e", 3: "#2ca02c"}


@torch.no_grad()
def explain_asag(model: nn.Module, image: Union[str, Path, torch.Tensor], score_threshold: float = 0.3) -> Image.Image:
    """A 2x2 figure of the patches and anchors of ``image`` (path or (3, H, W) 0-255)."""
    if not hasattr(model, "anchor_generator"):
        raise ValueError("explain_asag needs an ASAG model (model.name: asag)")
    original = read_image(image) if isinstance(image, (str, Path)) else image
    input_cfg = (getattr(model, "config", {}) or {}).get("input", {})
    resized = resize_shortest_edge(original.float(), input_cfg.get("min_size_test", 800), input_cfg.get("max_size_test", 1333))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        detections = model([resized.to(device)], original_sizes=[tuple(original.shape[-2:])])[0]
        anchors = model.last_anchors
    finally:
        model.train(was_training)

    height, width = original.shape[-2:]
    scale = torch.tensor([width / resized.shape[-1], height / resized.shape[-2]] * 2)
    valid = anchors.valid[0].cpu()
    boxes = anchors.boxes[0, valid].cpu()
    xyxy = torch.cat((boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2), 1) * scale
    levels = anchors.levels[0, valid].cpu()
    picture = original.permute(1, 2, 0).to(torch.uint8).cpu().numpy()
    figure = Figure(figsize=(12, 12 * height / width + 0.8), dpi=100)
    axes = figure.subplots(2, 2)
    patch_size = model.cfg.anchors.patch_size

    def draw(ax, rects, colour, width_line=1.0, style="-"):
        for x1, y1, x2, y2 in rects.tolist():
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour,
                                   linewidth=width_line, linestyle=style))

    ax = axes[0, 0]
    ax.imshow(picture)
    draw(ax, torch.tensor([[0, 0, width / 2, height / 2], [width / 2, 0, width, height / 2],
                           [0, height / 2, width / 2, height], [width / 2, height / 2, width, height]]), "white", 2, "--")
    draw(ax, xyxy[levels == 5], LEVEL_COLOURS[5])
    ax.set_title(f"fixed part: 4 P5 patches + the P6 (whole image) patch\n{int((levels == 5).sum())} anchors kept", fontsize=10)
    for ax, name, level in ((axes[0, 1], "P4", 4), (axes[1, 0], "P3", 3)):
        ax.imshow(picture)
        found = anchors.patches.get(name)
        count = 0
        if found is not None:
            crops, stride = found.crops[found.image_index == 0].cpu().float(), found.stride
            squares = torch.cat((crops * stride, (crops + patch_size) * stride), 1) * scale
            draw(ax, squares, "white", 2, "--")
            count = len(crops)
        draw(ax, xyxy[levels == level], LEVEL_COLOURS[level])
        ax.set_title(f"{name} probing: {count} patches, {int((levels == level).sum())} anchors kept", fontsize=10)
    ax = axes[1, 1]
    ax.imshow(picture)
    for (x1, y1, x2, y2), score, label in zip(detections["boxes"].tolist(), detections["scores"].tolist(),
                                               detections["labels"].tolist()):
        if score >= score_threshold:
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, linewidth=1.5,
                                   edgecolor=tuple(c / 255 for c in class_colour(int(label)))))
    ax.set_title(f"detections ({model.cfg.test_head} head, score >= {score_threshold})", fontsize=10)
    for ax in axes.flat:
        ax.set_axis_off()
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
    figure.suptitle(f"ASAG adaptive sparse anchors: {int(valid.sum())} anchors "
                    f"(P5/P6 {int((levels == 5).sum())}, P4 {int((levels == 4).sum())}, P3 {int((levels == 3).sum())})",
                    fontsize=12)
    figure.tight_layout(rect=(0, 0, 1, 0.97))  # room for the suptitle
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())
