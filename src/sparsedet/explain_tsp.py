"""What did a TSP model feed its transformer? ``sparsedet predict --explain`` on TSP models.

``explain_tsp_fcos(model, image)``: TSP-FCOS's features of interest (the top-``num_foi``
locations by FoI score that entered the encoder) drawn over the image as dots, coloured by FoI score
and sized by their FPN level, beside the final detections.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from torch import nn

from .data.image_io import read_image
from .data.transforms import resize_shortest_edge
from .explain import _draw_boxes


def _run(model: nn.Module, image):
    """Resizes ``image`` as the config's test input, runs the model in eval mode, restores its mode.
    Returns (original (3, H, W), resized (3, h, w), detections in original pixels)."""
    original = read_image(image) if isinstance(image, (str, Path)) else image
    input_cfg = (getattr(model, "config", {}) or {}).get("input", {})
    resized = resize_shortest_edge(original.float(), input_cfg.get("min_size_test", 800), input_cfg.get("max_size_test", 1333))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        detections = model([resized.to(device)], original_sizes=[tuple(original.shape[-2:])])[0]
    finally:
        model.train(was_training)
    return original, resized, detections


def _to_image(figure: Figure) -> Image.Image:
    figure.tight_layout()
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())


@torch.no_grad()
def explain_tsp_fcos(model: nn.Module, image: Union[str, Path, torch.Tensor], score_threshold: float = 0.3) -> Image.Image:
    """Two panels over ``image`` (path or (3, H, W) RGB 0-255): the selected FoIs (colour = FoI score
    max_c sigmoid, dot size = level, coarser levels larger) and the detections scoring >= ``score_threshold``."""
    if not hasattr(model, "last_selection"):
        raise ValueError(f"explain_tsp_fcos needs a TSP-FCOS model, got {type(model).__name__}")
    original, resized, detections = _run(model, image)
    selection = model.last_selection["images"][0]
    height, width = original.shape[-2:]
    scale = torch.tensor([width / resized.shape[-1], height / resized.shape[-2]])
    points = (selection["points"].cpu().float() * scale).numpy()
    scores = selection["scores"].cpu().float().numpy()
    levels = selection["levels"].cpu().numpy()
    picture = original.permute(1, 2, 0).clamp(0, 255).to(torch.uint8).cpu().numpy()

    figure = Figure(figsize=(14, 7 * height / width + 0.8), dpi=100)
    left, right = figure.subplots(1, 2)
    left.imshow(picture)
    order = np.argsort(scores)  # best on top
    dots = left.scatter(points[order, 0], points[order, 1], c=scores[order], s=6 * (1.6 ** levels[order]),
                        cmap="viridis", vmin=0.0, vmax=max(float(scores.max(initial=0.0)), 1e-6),
                        edgecolors="white", linewidths=0.3)
    figure.colorbar(dots, ax=left, fraction=0.035, pad=0.02, label="FoI score (max class probability)")
    strides = [2 ** lvl for lvl in model.levels]
    per_level = ", ".join(f"P{lvl}: {int((levels == i).sum())}" for i, lvl in enumerate(model.levels))
    left.set_title(f"{len(scores)} features of interest entering the encoder\n({per_level}; strides {strides})",
                   fontsize=10)
    right.imshow(picture)
    _draw_boxes(right, detections, score_threshold)
    right.set_title(f"detections (score >= {score_threshold}; class-wise NMS "
                    f"{model.cfg.test.nms_threshold})", fontsize=10)
    for ax in (left, right):
        ax.set_axis_off()
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
    figure.suptitle("TSP-FCOS: top-k FoIs by the FCOS classifier -> transformer encoder -> set prediction", fontsize=12)
    return _to_image(figure)
