"""What did TSP-RCNN's encoder see? ``sparsedet predict --explain`` on a TSP-RCNN model draws the RPN
proposals that entered the transformer encoder (all of them at test time, up to ``rpn.num_proposals``),
coloured by their RPN objectness probability, beside the final detections."""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image
from torch import nn

from .data.image_io import read_image
from .data.transforms import resize_shortest_edge
from .visualize import class_colour


@torch.no_grad()
def explain_tsp_rcnn(model: nn.Module, image: Union[str, Path, torch.Tensor], score_threshold: float = 0.3) -> Image.Image:
    """A 1x2 figure on ``image`` (path or (3, H, W) 0-255): the encoder's input RoIs coloured by RPN
    score (low scores drawn first, so the best lie on top), and the detections >= ``score_threshold``."""
    if not hasattr(model, "last_rois"):
        raise ValueError(f"explain_tsp_rcnn needs a TSP-RCNN model, got {type(model).__name__}")
    original = read_image(image) if isinstance(image, (str, Path)) else image
    input_cfg = (getattr(model, "config", {}) or {}).get("input", {})
    resized = resize_shortest_edge(original.float(), input_cfg.get("min_size_test", 800),
                                   input_cfg.get("max_size_test", 1333))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        detections = model([resized.to(device)], original_sizes=[tuple(original.shape[-2:])])[0]
        rois = model.last_rois[0]
    finally:
        model.train(was_training)
    height, width = original.shape[-2:]
    scale = torch.tensor([width / resized.shape[-1], height / resized.shape[-2]] * 2)
    boxes = (rois["boxes"].float().cpu() * scale).tolist()
    scores = rois["scores"].float().cpu()
    order = scores.argsort().tolist()                      # best last: drawn on top

    picture = original.permute(1, 2, 0).to(torch.uint8).cpu().numpy()
    figure = Figure(figsize=(14, 7 * height / width + 0.8), dpi=100)
    left, right = figure.subplots(1, 2)
    colours, norm = colormaps["viridis"], Normalize(0.0, 1.0)
    left.imshow(picture)
    for i in order:
        x1, y1, x2, y2 = boxes[i]
        s = float(scores[i])
        left.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colours(norm(s)),
                                 linewidth=0.4 + 1.2 * s, alpha=0.25 + 0.75 * s))
    mappable = left.imshow(np.zeros((1, 1)), cmap="viridis", norm=norm, visible=False)
    figure.colorbar(mappable, ax=left, fraction=0.035, pad=0.02, label="RPN objectness")
    left.set_title(f"{len(boxes)} RoIs into the encoder (RPN top {len(boxes)} after per-level NMS)", fontsize=10)
    right.imshow(picture)
    kept = 0
    for (x1, y1, x2, y2), score, label in zip(detections["boxes"].tolist(), detections["scores"].tolist(),
                                               detections["labels"].tolist()):
        if score < score_threshold:
            continue
        kept += 1
        colour = tuple(c / 255 for c in class_colour(int(label)))
        right.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=1.5))
        right.text(x1, y1, f"{int(label)} {score:.2f}", color="white", fontsize=7,
                   bbox=dict(facecolor=colour, alpha=0.7, pad=1, edgecolor="none"))
    right.set_title(f"{kept} detections with score >= {score_threshold} (class-wise NMS)", fontsize=10)
    for ax in (left, right):
        ax.set_axis_off()
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
    figure.suptitle("TSP-RCNN: the RoIs the transformer encoder attended over, and what it predicted", fontsize=12)
    figure.tight_layout()
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())
