"""Where did Cascade Sparse Query spend its computation? (QueryDet paper, figure 5.)

``explain_prediction(model, image)`` runs a QueryDet model with CSQ on one image and draws four
panels over it: the dense query heat-map on the start level (P4), the query scores at the P3
positions the cascade evaluated, the queried sites on P3 and on P2 (the only positions where the
high-resolution heads produced outputs), each with the final detections. ``sparsedet predict
--explain`` writes it next to the annotated image.
"""
from __future__ import annotations

import copy
import importlib
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
from .visualize import class_colour

# model.name -> (module, function) drawing that model's own explanation figure.
EXPLAINERS = {"asag": (".explain_asag", "explain_asag")}


def _require_query_head(model: nn.Module) -> None:
    if getattr(model, "query_head", None) is None or not hasattr(model, "cfg") or not hasattr(model.cfg, "csq"):
        name = (getattr(model, "config", {}) or {}).get("model", {}).get("name", type(model).__name__)
        raise ValueError(f"--explain shows Cascade Sparse Query, which needs a QueryDet model with a query head; "
                         f"this model ({name}) has none")


@torch.no_grad()
def explain_prediction(model: nn.Module, image: Union[str, Path, torch.Tensor], score_threshold: float = 0.3) -> Image.Image:
    """A 2x2 figure of the CSQ query maps and active sites on ``image`` (path or (3, H, W) 0-255).

    CSQ is switched on for this call when the model's config has it off; the model is left as it was.
    """
    name = ((getattr(model, "config", {}) or {}).get("model") or {}).get("name")
    if name in EXPLAINERS:
        module, function = EXPLAINERS[name]
        return getattr(importlib.import_module(module, __package__), function)(model, image, score_threshold)
    _require_query_head(model)
    original = read_image(image) if isinstance(image, (str, Path)) else image
    input_cfg = (getattr(model, "config", {}) or {}).get("input", {})
    resized = resize_shortest_edge(original.float(), input_cfg.get("min_size_test", 800), input_cfg.get("max_size_test", 1333))
    saved_csq, was_training = copy.copy(model.cfg.csq), model.training
    model.cfg.csq.enabled = True
    model.eval()
    try:
        device = next(model.parameters()).device
        detections = model([resized.to(device)], original_sizes=[tuple(original.shape[-2:])])[0]
        output = model.last_csq
    finally:
        model.cfg.csq = saved_csq
        model.train(was_training)

    height, width = original.shape[-2:]
    # Level cell (y, x) covers original pixels scaled by stride * original / resized.
    scale_y, scale_x = height / resized.shape[-2], width / resized.shape[-1]
    picture = original.permute(1, 2, 0).to(torch.uint8).cpu().numpy()
    figure = Figure(figsize=(12, 12 * height / width + 0.8), dpi=100)
    axes = figure.subplots(2, 2)
    start = output.start_level
    panels = [(f"P{start} query heat-map (dense)", "heat", start)]
    finer = sorted(output.sparse_levels, reverse=True)
    if finer:
        panels.append((f"P{finer[0]} query scores where evaluated", "heat", finer[0]))
    panels += [(f"P{lvl}: queried sites (heads evaluated here)", "sites", lvl) for lvl in finer[:2]]
    stats = output.stats()
    for ax, (title, kind, level) in zip(axes.flat, panels):
        ax.imshow(picture)
        level_height, level_width = level_extent(output, level)
        extent = (0, level_width * 2 ** level * scale_x, level_height * 2 ** level * scale_y, 0)
        if kind == "heat":
            if level == start:
                logits = output.start_query_logits[0]
            else:
                entry = output.level(level)
                logits = entry.query_map()[0] if entry is not None and entry.query_logits is not None else None
            if logits is not None:
                probs = torch.nan_to_num(logits.float().sigmoid(), nan=0.0).cpu().numpy()
                shown = ax.imshow(np.ma.masked_less_equal(probs, 0.0), cmap="inferno", alpha=0.6, vmin=0, vmax=1,
                                  extent=extent, interpolation="nearest")
                figure.colorbar(shown, ax=ax, fraction=0.035, pad=0.02)
        else:
            entry = output.level(level)
            if entry is not None:
                sites = entry.positions[entry.positions[:, 0] == 0][:, 1:].cpu().numpy()
                mask = np.zeros(level_extent(output, level), dtype=float)
                mask[sites[:, 0], sites[:, 1]] = 1.0
                ax.imshow(np.ma.masked_equal(mask, 0.0), cmap="cool", alpha=0.55, extent=extent,
                          interpolation="nearest", vmin=0, vmax=1)
            level_stats = stats["levels"].get(level, {})
            title += f"\n{level_stats.get('children', 0)} queried, {level_stats.get('active', 0)} active sites " \
                     f"({100 * level_stats.get('share', 0.0):.1f}% of P{level})"
        _draw_boxes(ax, detections, score_threshold)
        ax.set_title(title, fontsize=10)
        ax.set_axis_off()
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_axis_off()
    figure.suptitle(f"Cascade Sparse Query: sigma {output.threshold}, context {output.context}x{output.context}, "
                    f"{100 * stats['share']:.1f}% of the sparse levels' positions evaluated", fontsize=12)
    figure.tight_layout()
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())


def level_extent(output, level: int) -> tuple[int, int]:
    """(H, W) of a level's feature map in the CSQ run."""
    if level == output.start_level:
        return tuple(output.start_query_logits.shape[-2:])
    return tuple(output.shapes[level][1:])


def _draw_boxes(ax, detections: dict, score_threshold: float) -> None:
    from matplotlib.patches import Rectangle

    for (x1, y1, x2, y2), score, label in zip(detections["boxes"].tolist(), detections["scores"].tolist(),
                                               detections["labels"].tolist()):
        if score < score_threshold:
            continue
        colour = tuple(c / 255 for c in class_colour(int(label)))
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=1.5))
