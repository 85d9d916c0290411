"""Pictures for people: detections drawn on an image, and training curves from the metrics log.

Detections are drawn with PIL (exact pixels, no display); curves with matplotlib's Agg canvas on a
standalone ``Figure`` (no pyplot state, no screen, safe in any backend setting).
"""
from __future__ import annotations

import colorsys
import json
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# matplotlib's tab10: ten colours that stay apart from each other; later classes get golden-ratio hues.
_TAB10 = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
          (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))

CURVE_WIDTH_PX = 960
PANEL_HEIGHT_PX = 400
_DPI = 100


def class_colour(label: int) -> tuple[int, int, int]:
    """The RGB colour (0..255) that ``draw_detections`` uses for contiguous class ``label``."""
    if label < len(_TAB10):
        return _TAB10[label]
    hue = (label * 0.618033988749895) % 1.0
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, 0.75, 0.95))


def _as_pil(image: torch.Tensor | Image.Image | str | Path) -> Image.Image:
    if isinstance(image, (str, Path)):
        with Image.open(image) as file:
            return file.convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")  # a copy: the caller's image is not drawn on
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensor must be (3, H, W) RGB, got shape {tuple(image.shape)}")
        array = image.detach().cpu()
        if array.dtype != torch.uint8:  # 0-255 float images, as the models take them
            array = array.round().clamp(0, 255).to(torch.uint8)
        return Image.fromarray(array.permute(1, 2, 0).numpy())
    raise TypeError(f"image must be a (3, H, W) uint8 tensor, a PIL image or a path, got {type(image).__name__}")


def draw_detections(image: torch.Tensor | Image.Image | str | Path, detections: Mapping[str, object],
                    class_names: Sequence[str], score_threshold: float = 0.3) -> Image.Image:
    """The image with boxes, class names and scores drawn on it.

    Args:
        image: (3, H, W) uint8 RGB tensor (float 0-255 is rounded), a PIL image or an image path.
        detections: ``boxes`` (K, 4) xyxy in the image's pixels, ``labels`` (K,) contiguous class
            indices, and optionally ``scores`` (K,); without scores (ground truth) every box is drawn
            and labelled with its name only.
        class_names: name of each contiguous label.
        score_threshold: boxes scoring below it are not drawn.

    Returns:
        A new RGB PIL image of the same size. Each class has one colour (``class_colour``), the box
        edge is a band of it between thin black lines, and the label sits on a filled tag in the
        class colour with black or white text, whichever contrasts more: readable on any background.
    """
    canvas = _as_pil(image)
    width, height = canvas.size
    boxes = np.asarray(_numpy(detections["boxes"]), dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(_numpy(detections["labels"])).reshape(-1).astype(np.int64)
    scores = detections.get("scores")
    scores = None if scores is None else np.asarray(_numpy(scores), dtype=np.float64).reshape(-1)
    if len(labels) != len(boxes) or (scores is not None and len(scores) != len(boxes)):
        raise ValueError(f"detections: {len(boxes)} boxes, {len(labels)} labels"
                         + ("" if scores is None else f", {len(scores)} scores"))
    if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise ValueError(f"labels must be in 0..{len(class_names) - 1} (class_names), got {labels.min()}..{labels.max()}")

    keep = np.arange(len(boxes)) if scores is None else np.flatnonzero(scores >= score_threshold)
    if scores is not None:
        keep = keep[np.argsort(scores[keep], kind="stable")]  # best last, so drawn on top
    line = max(2, round(min(width, height) / 200))
    font = ImageFont.load_default(size=max(10, round(min(width, height) / 36)))
    draw = ImageDraw.Draw(canvas)
    for index in keep:
        x1, y1, x2, y2 = (int(round(v)) for v in boxes[index])
        x2, y2 = max(x1, x2 - 1), max(y1, y2 - 1)  # xyxy corners -> PIL's inclusive last pixel
        colour = class_colour(int(labels[index]))
        draw.rectangle((x1 - 1, y1 - 1, x2 + 1, y2 + 1), outline=(0, 0, 0), width=line + 2)
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=line)
        text = class_names[labels[index]] + ("" if scores is None else f" {scores[index]:.2f}")
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tag_w, tag_h = right - left + 4, bottom - top + 4
        # Above the box when there is room, else just inside its top edge; kept inside the image.
        tag_x = min(max(0, x1 - 1), max(0, width - tag_w))
        tag_y = y1 - 1 - tag_h if y1 - 1 - tag_h >= 0 else y1 + line
        draw.rectangle((tag_x, tag_y, tag_x + tag_w - 1, tag_y + tag_h - 1), fill=colour)
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        draw.text((tag_x + 2 - left, tag_y + 2 - top), text, font=font,
                  fill=(0, 0, 0) if luminance > 140 else (255, 255, 255))
    return canvas


def _numpy(values):
    return values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else values


# ----------------------------------------------------------------------------------------------

def read_metrics(metrics_jsonl: str | Path) -> tuple[list[dict], list[dict]]:
    """The trainer's JSON-lines log split into ``(train_records, eval_records)``, in file order.

    A train record needs numeric ``iteration`` and ``total_loss``, an eval record a numeric
    ``iteration``; lines of other ``type`` values are skipped. Malformed lines (not JSON, not an
    object, missing or non-numeric fields) are skipped with one warning naming the file and lines.
    """
    path = Path(metrics_jsonl)
    train, evaluation, bad = [], [], []
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            bad.append(number)
            continue
        if not isinstance(record, dict) or not _is_number(record.get("iteration")):
            bad.append(number)
        elif record.get("type") == "train":
            if _is_number(record.get("total_loss")):
                train.append(record)
            else:
                bad.append(number)
        elif record.get("type") == "eval":
            evaluation.append(record)
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
        warnings.warn(f"{path}: ignored {len(bad)} malformed line(s): {shown}", stacklevel=3)
    return train, evaluation


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average over ``window`` points, ignoring NaN; the window shrinks at the ends."""
    finite = np.isfinite(values)
    kernel = np.ones(window)
    total = np.convolve(np.where(finite, values, 0.0), kernel, mode="same")
    count = np.convolve(finite.astype(np.float64), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)


def plot_training_curves(metrics_jsonl: str | Path, output_png: str | Path) -> Path:
    """Plots the loss (and, when evaluated, AP / AP50) against iteration into a PNG.

    Top panel: ``total_loss`` per logged iteration, raw (faint) and smoothed (moving average over
    about 1/25 of the points), on a log scale when it spans more than a factor 20. Bottom panel,
    only when eval lines exist: AP and AP50 in percent.

    Returns:
        ``output_png`` as a Path: an RGBA PNG ``CURVE_WIDTH_PX`` wide and ``PANEL_HEIGHT_PX`` per panel high.

    Raises:
        ValueError: the file has no usable train or eval line.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train, evaluation = read_metrics(metrics_jsonl)
    if not train and not evaluation:
        raise ValueError(f"{metrics_jsonl}: no train or eval lines to plot")
    panels = int(bool(train)) + int(bool(evaluation))
    figure = Figure(figsize=(CURVE_WIDTH_PX / _DPI, PANEL_HEIGHT_PX * panels / _DPI), dpi=_DPI)
    FigureCanvasAgg(figure)  # renders off-screen; attaches itself to the figure
    axes = figure.subplots(panels, 1, squeeze=False, sharex=True)[:, 0]  # one iteration axis

    if train:
        ax = axes[0]
        train = sorted(train, key=lambda r: r["iteration"])
        iterations = np.array([r["iteration"] for r in train], dtype=np.float64)
        loss = np.array([r["total_loss"] for r in train], dtype=np.float64)
        ax.plot(iterations, loss, color="tab:blue", alpha=0.25, linewidth=0.8, label="total loss")
        window = max(1, len(loss) // 25)
        if window > 1:
            ax.plot(iterations, _smooth(loss, window), color="tab:blue", linewidth=2,
                    label=f"smoothed ({window} points)")
        positive = loss[np.isfinite(loss) & (loss > 0)]
        if len(positive) == np.isfinite(loss).sum() and len(positive) and positive.max() > 20 * positive.min():
            ax.set_yscale("log")
        ax.set_ylabel("loss")
        ax.set_title("training loss")
        ax.legend(loc="upper right")
        ax.grid(True, alpha=0.3)
    if evaluation:
        ax = axes[-1]
        evaluation = sorted(evaluation, key=lambda r: r["iteration"])
        for name, colour in (("AP", "tab:red"), ("AP50", "tab:orange")):
            points = [(r["iteration"], 100 * r[name]) for r in evaluation if _is_number(r.get(name)) and r[name] >= 0]
            if points:
                ax.plot(*zip(*points), marker="o", color=colour, label=name)
        ax.set_ylabel("%")
        ax.set_title("evaluation")
        if ax.lines:
            ax.legend(loc="lower right")
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("iteration")
    figure.tight_layout()

    output = Path(output_png)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=_DPI)
    return output
