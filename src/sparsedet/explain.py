"""Where did Cascade Sparse Query spend its computation? (QueryDet paper, figure 5.)

``explain_prediction(model, image)`` runs a QueryDet model with CSQ on one image and draws four
panels over it: the dense query heat-map on the start level (P4), the query scores at the P3
positions the cascade evaluated, the queried sites on P3 and on P2 (the only positions where the
high-resolution heads produced outputs), each with the final detections. ``sparsedet predict
--explain`` writes it next to the annotated image. Models listed in ``EXPLAINERS`` draw their
own figure (TSP: the FoIs / RoIs that entered the transformer; ASAG: patches and anchors).
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

# model.name -> (module of sparsedet, function): models whose --explain figure lives in its own module.
EXPLAINERS = {
    "tsp_fcos": ("explain_tsp", "explain_tsp_fcos"),
    "tsp_rcnn": ("explain_tsp_rcnn", "explain_tsp_rcnn"),
    "asag": ("explain_asag", "explain_asag"),
}


def _own_explainer(model: nn.Module):
    """The figure function registered in ``EXPLAINERS`` for this model's ``model.name``, or None."""

    name = (getattr(model, "config", {}) or {}).get("model", {}).get("name")
    if name not in EXPLAINERS:
        return None
    module, function = EXPLAINERS[name]
    return getattr(importlib.import_module(f"{__package__}.{module}"), function)


def require_explainable(model: nn.Module) -> None:
    """Raises ValueError (one line) unless ``model`` has an --explain figure: a model registered in
    ``EXPLAINERS``, or a QueryDet with a query head (the CSQ figure)."""
    if _own_explainer(model) is None:
        require_query_head(model)


def require_query_head(model: nn.Module) -> None:
    """Raises ValueError (one line) unless ``model`` is a QueryDet with a query head."""
    if getattr(model, "query_head", None) is None or not hasattr(model, "cfg") or not hasattr(model.cfg, "csq"):
        name = (getattr(model, "config", {}) or {}).get("model", {}).get("name", type(model).__name__)
        raise ValueError(f"--explain draws what a sparse model chose: Cascade Sparse Query (a QueryDet model with a "
                         f"query head) or the models {sorted(EXPLAINERS)}; this model ({name}) has no such figure")


# Site panels: one colour per kind of cell, legible over a dimmed grey photo.
QUERIED_COLOUR = "#ff7f0e"   # orange: queried cells, where the heads' outputs are read
CONTEXT_COLOUR = "#1f77b4"   # blue: context cells, computed only so the 3x3 convs see their neighbours
HEAT_CMAP = "viridis"        # query probability, 0 (dark blue) .. 1 (yellow)


@torch.no_grad()
def explain_prediction(model: nn.Module, image: Union[str, Path, torch.Tensor], score_threshold: float = 0.3) -> Image.Image:
    """A 2x2 figure of the CSQ query maps and active sites on ``image`` (path or (3, H, W) 0-255).

    CSQ is switched on for this call when the model's config has it off; the model is left as it was.
    Models registered in ``EXPLAINERS`` (TSP) draw their own figure instead.
    """
    explainer = _own_explainer(model)
    if explainer is not None:
        return explainer(model, image, score_threshold)
    figure = explain_figure(model, image, score_threshold)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())


@torch.no_grad()
def explain_figure(model: nn.Module, image: Union[str, Path, torch.Tensor], score_threshold: float = 0.3) -> Figure:
    """The matplotlib figure ``explain_prediction`` renders: heat-map panels with a labelled colour
    bar, site panels with a legend (queried / context / skipped cells), detections as boxes."""
    require_query_head(model)
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
    picture = _dimmed_grey(original)
    figure = Figure(figsize=(12, 12 * height / width + 1.6), dpi=100)
    axes = figure.subplots(2, 2)
    start = output.start_level
    panels = [(f"P{start} query heat-map (dense)", "heat", start)]
    finer = sorted(output.sparse_levels, reverse=True)
    if finer:
        panels.append((f"P{finer[0]} query scores where evaluated (elsewhere: not computed)", "heat", finer[0]))
    panels += [(f"P{lvl}: where the heads ran", "sites", lvl) for lvl in finer[:2]]
    stats = output.stats()
    for ax, (title, kind, level) in zip(axes.flat, panels):
        ax.imshow(picture, cmap="gray", vmin=0, vmax=255)
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
                shown = ax.imshow(np.ma.masked_less_equal(probs, 0.0), cmap=HEAT_CMAP, alpha=0.7, vmin=0, vmax=1,
                                  extent=extent, interpolation="nearest")
                bar = figure.colorbar(shown, ax=ax, fraction=0.035, pad=0.02)
                bar.set_label(f"query probability (small object near); queries: > {output.threshold}", fontsize=8)
        else:
            entry = output.level(level)
            if entry is not None:
                _draw_sites(ax, output, entry, extent)
            level_stats = stats["levels"].get(level, {})
            title += f"\n{level_stats.get('children', 0)} queried, {level_stats.get('active', 0)} active sites " \
                     f"({100 * level_stats.get('share', 0.0):.1f}% of P{level})"
            ax.legend(handles=_site_legend(output), loc="upper right", fontsize=8, framealpha=0.9)
        _draw_boxes(ax, detections, score_threshold)
        ax.set_title(title, fontsize=10)
        ax.set_axis_off()
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_axis_off()
    figure.suptitle(f"Cascade Sparse Query: sigma {output.threshold}, context {output.context}x{output.context}, "
                    f"{100 * stats['share']:.1f}% of the sparse levels' positions evaluated", fontsize=12)
    figure.text(0.5, 0.005, "Queried: the 2x2 finer cells under each coarser cell whose query probability passed "
                "sigma; the detection heads' outputs exist only there. Active sites: queried cells plus the context "
                "window around them, where the towers' convolutions were computed. Boxes: final detections.",
                ha="center", va="bottom", fontsize=8, wrap=True)
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    return figure


def _dimmed_grey(image: torch.Tensor) -> np.ndarray:
    """(H, W) grey picture squeezed into 100..230, so coloured overlays stand out on any photo."""
    grey = image.float().mul(torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0)
    return (100 + grey * (130 / 255)).clamp(0, 255).cpu().numpy()


def _draw_sites(ax, output, entry, extent) -> None:
    """Queried cells in orange; the context cells around them (CSQ's active set) in blue."""
    from matplotlib.colors import ListedColormap

    from .layers.sparse_conv import build_active_set

    cells = np.zeros(tuple(entry.shape[1:]), dtype=float)  # 0 skipped, 1 context, 2 queried
    if output.method == "csq" and output.context > 1 and entry.num_children:
        active = build_active_set(entry.positions, entry.shape, output.context, validate=False).indices
        active = active[active[:, 0] == 0][:, 1:].cpu().numpy()
        cells[active[:, 0], active[:, 1]] = 1.0
    sites = entry.positions[entry.positions[:, 0] == 0][:, 1:].cpu().numpy()
    cells[sites[:, 0], sites[:, 1]] = 2.0
    colours = ListedColormap([CONTEXT_COLOUR, QUERIED_COLOUR])
    ax.imshow(np.ma.masked_equal(cells, 0.0), cmap=colours, vmin=1, vmax=2, alpha=0.6, extent=extent,
              interpolation="nearest")


def _site_legend(output) -> list:
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=QUERIED_COLOUR, alpha=0.6, label="queried: heads' outputs read here")]
    if output.method == "csq" and output.context > 1:
        handles.append(Patch(facecolor=CONTEXT_COLOUR, alpha=0.6,
                             label=f"context: {output.context}x{output.context} window, convs computed"))
    handles.append(Patch(facecolor="#bbbbbb", label="grey: skipped (nothing computed)"))
    return handles


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
