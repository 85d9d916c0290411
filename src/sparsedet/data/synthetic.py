"""The embedded default data set: textured shapes on varied backgrounds, with clutter and occlusion.

Every image is a pure function of its seed (numpy's PCG64 and PIL rasterisation), so a set is
reproducible byte for byte. Six shape classes (``CLASS_NAMES``) are drawn with solid, striped,
checkered or noisy textures in random colours, from tiny (8 px) to half the image side, over
gradient, smooth-noise or patterned backgrounds, among strokes and blobs that are not objects.
Later objects and clutter cover earlier objects: an object's box is the extent of its *visible*
pixels, and an object less than ``MIN_VISIBLE_FRACTION`` visible becomes an ``iscrowd`` ignore
region (COCO neither rewards nor penalises detections of it).

``write_synthetic_coco`` writes a COCO-format folder (PNG images + instances json per split).
"""
from __future__ import annotations

import io
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

CLASS_NAMES = ("square", "disc", "triangle", "star", "ring", "cross")
# Bump when rendering changes: a folder written by another version is regenerated, not reused.
GENERATOR_VERSION = 1
MIN_VISIBLE_FRACTION = 0.35
MIN_OBJECT_SIZE = 8.0          # px, the smallest object's nominal extent
MAX_OBJECT_SIZE_FRACTION = 0.5  # of the shorter image side, the largest object's nominal extent
MANIFEST_NAME = "synthetic_manifest.json"

Seed = int | Sequence[int]


@dataclass(frozen=True)
class Shape:
    """One object's geometry in image pixels (x right, y down).

    The unit shape fits in the unit circle; it is scaled by (``rx``, ``ry``), rotated by ``angle``
    radians and centred at (``cx``, ``cy``). ``inner`` is the star's inner radius, the ring's hole
    radius or the cross's arm half-width, in unit-shape coordinates (0 for the other classes).
    """

    label: int
    cx: float
    cy: float
    rx: float
    ry: float
    angle: float
    inner: float = 0.0

    def window(self, height: int, width: int) -> tuple[int, int, int, int]:
        """``(y0, y1, x0, x1)``: a pixel window holding the whole shape, clipped to the image."""
        radius = max(self.rx, self.ry)
        return (max(0, math.floor(self.cy - radius) - 1), min(height, math.ceil(self.cy + radius) + 2),
                max(0, math.floor(self.cx - radius) - 1), min(width, math.ceil(self.cx + radius) + 2))

    def mask(self, height: int, width: int) -> tuple[tuple[int, int, int, int], np.ndarray]:
        """The shape's pixels: ``(window, mask)``, ``mask`` a bool (y1 - y0, x1 - x0) array over ``window``."""
        y0, y1, x0, x1 = window = self.window(height, width)
        name = CLASS_NAMES[self.label]
        if name in ("disc", "ring"):
            # Pixel centres in the shape's unit frame: inside the unit circle, outside the hole.
            ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
            dx, dy = xs - self.cx, ys - self.cy
            cos, sin = math.cos(self.angle), math.sin(self.angle)
            u, v = (dx * cos + dy * sin) / self.rx, (-dx * sin + dy * cos) / self.ry
            radius2 = u * u + v * v
            mask = radius2 <= 1.0
            if name == "ring":
                mask &= radius2 >= self.inner ** 2
            return window, mask
        cos, sin = math.cos(self.angle), math.sin(self.angle)
        # PIL's integer coordinates are pixel centres, ours are pixel corners: shift by half a pixel.
        points = [(self.cx + x * self.rx * cos - y * self.ry * sin - x0 - 0.5,
                   self.cy + x * self.rx * sin + y * self.ry * cos - y0 - 0.5) for x, y in _unit_polygon(name, self.inner)]
        canvas = Image.new("1", (x1 - x0, y1 - y0), 0)
        ImageDraw.Draw(canvas).polygon(points, fill=1)
        return window, np.asarray(canvas, dtype=bool)


def _unit_polygon(name: str, inner: float) -> list[tuple[float, float]]:
    if name == "square":
        return [(0.7, 0.7), (-0.7, 0.7), (-0.7, -0.7), (0.7, -0.7)]
    if name == "triangle":
        return [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if name == "star":
        return [((1.0 if k % 2 == 0 else inner) * math.cos(-math.pi / 2 + k * math.pi / 5),
                 (1.0 if k % 2 == 0 else inner) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    if name == "cross":
        t, e = inner, 0.9  # arm half-width, arm end (0.9: the corners stay inside the unit circle)
        return [(t, e), (t, t), (e, t), (e, -t), (t, -t), (t, -e), (-t, -e), (-t, -t), (-e, -t), (-e, t), (-t, t), (-t, e)]
    raise ValueError(f"no polygon for class {name!r}")


@dataclass(eq=False)  # tensors have no single truth value to compare by
class SyntheticScene:
    """A rendered image with every object that kept visible pixels.

    Attributes:
        image: (3, H, W) uint8 RGB.
        boxes: (M, 4) float32 xyxy pixels: the extent of each object's visible pixels (x2, y2 exclusive).
        labels: (M,) int64 in 0..len(CLASS_NAMES)-1.
        iscrowd: (M,) bool: less than ``MIN_VISIBLE_FRACTION`` visible, an ignore region.
        visible_fraction: (M,) float32: visible pixels / the object's full mask pixels.
        area: (M,) int64: visible pixel count (COCO's ``area``, which sets small/medium/large).
        instance_map: (H, W) int64: index 0..M-1 of the object seen at each pixel, -1 for background and clutter.
        shapes: the M objects' geometry (``shapes[k].mask`` re-rasterises object k unoccluded).
    """

    image: torch.Tensor
    boxes: torch.Tensor
    labels: torch.Tensor
    iscrowd: torch.Tensor
    visible_fraction: torch.Tensor
    area: torch.Tensor
    instance_map: torch.Tensor
    shapes: list[Shape]


def render_scene(seed: Seed, height: int = 320, width: int = 320,
                 objects_per_image: tuple[int, int] = (2, 8), min_object_size: float = MIN_OBJECT_SIZE) -> SyntheticScene:
    """Renders one image and its annotations; a pure function of the arguments.

    Args:
        seed: an int, or a sequence of ints (numpy seeds PCG64 with it, e.g. ``(seed, split, index)``).
        height, width: image size in pixels (each at least 32).
        objects_per_image: inclusive range of objects drawn (occluded ones included).
        min_object_size: nominal extent of the smallest objects in pixels (sizes are log-uniform
            from it to half the shorter image side).
    """
    if height < 32 or width < 32:
        raise ValueError(f"synthetic images must be at least 32x32 pixels, got {height}x{width}")
    rng = np.random.default_rng(seed)
    canvas = _background(rng, height, width)
    owner = np.full((height, width), -1, dtype=np.int64)  # drawn object index per pixel, -1: not an object

    for _ in range(rng.integers(0, 4)):
        _draw_stroke(rng, canvas, owner)
    for _ in range(rng.integers(0, 3)):
        _draw_blob(rng, canvas, owner)

    shapes, full_areas = [], []
    low, high = objects_per_image
    for index in range(rng.integers(low, high + 1)):
        shape = _random_shape(rng, height, width, min_object_size)
        (y0, y1, x0, x1), mask = shape.mask(height, width)
        region = canvas[y0:y1, x0:x1]
        colour = _contrasting_colour(rng, region[mask].mean(axis=0))
        texture = _texture(rng, y1 - y0, x1 - x0, colour)
        if rng.random() < 0.3:  # a darker outline on some objects, as drawn objects often have
            texture[mask & ~_erode(mask)] *= 0.35
        region[mask] = texture[mask]
        owner[y0:y1, x0:x1][mask] = index
        shapes.append(shape)
        full_areas.append(int(mask.sum()))

    # Clutter over the objects too: strokes across shapes are occlusion the boxes must follow.
    for _ in range(rng.integers(0, 3)):
        _draw_stroke(rng, canvas, owner)
    if rng.random() < 0.3:
        _draw_blob(rng, canvas, owner)

    if rng.random() < 0.3:  # slight defocus on some images
        blurred = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.7))
        canvas = np.asarray(blurred, dtype=np.float32).copy()
    canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * rng.uniform(0.0, 6.0)  # sensor noise
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return _annotate(image, owner, shapes, full_areas)


def _annotate(image: np.ndarray, owner: np.ndarray, shapes: list[Shape], full_areas: list[int]) -> SyntheticScene:
    height, width = owner.shape
    kept, boxes, fractions, areas = [], [], [], []
    for index, shape in enumerate(shapes):
        y0, y1, x0, x1 = shape.window(height, width)
        visible = owner[y0:y1, x0:x1] == index  # an object's pixels never leave its own window
        count = int(visible.sum())
        if count == 0:
            continue
        rows, cols = np.flatnonzero(visible.any(axis=1)), np.flatnonzero(visible.any(axis=0))
        boxes.append((x0 + cols[0], y0 + rows[0], x0 + cols[-1] + 1, y0 + rows[-1] + 1))
        kept.append(index)
        fractions.append(count / full_areas[index])
        areas.append(count)
    # Renumber the owner map to the kept objects (fully hidden ones vanish).
    lookup = np.full(len(shapes) + 1, -1, dtype=np.int64)
    lookup[kept] = np.arange(len(kept))
    instance_map = lookup[owner]  # owner -1 indexes the trailing -1
    fractions = np.asarray(fractions, dtype=np.float32)
    return SyntheticScene(
        image=torch.from_numpy(image).permute(2, 0, 1).contiguous(),
        boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        labels=torch.tensor([shapes[i].label for i in kept], dtype=torch.int64),
        iscrowd=torch.from_numpy(fractions < MIN_VISIBLE_FRACTION),
        visible_fraction=torch.from_numpy(fractions),
        area=torch.tensor(areas, dtype=torch.int64),
        instance_map=torch.from_numpy(instance_map),
        shapes=[shapes[i] for i in kept],
    )


def make_synthetic_image(seed: Seed, height: int = 320, width: int = 320,
                         objects_per_image: tuple[int, int] = (2, 8)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One generated image and its trainable objects (ignore regions left out).

    Returns:
        image (3, H, W) uint8 RGB, boxes (M, 4) float32 xyxy pixels (visible extent), labels (M,) int64.
    """
    scene = render_scene(seed, height, width, objects_per_image)
    keep = ~scene.iscrowd
    return scene.image, scene.boxes[keep], scene.labels[keep]


def make_shapes_image(seed: int, height: int = 256, width: int = 320,
                      num_objects: tuple[int, int] = (2, 5)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``make_synthetic_image`` under the name and defaults the first demo used."""
    return make_synthetic_image(seed, height, width, num_objects)


# ----------------------------------------------------------------------------------------------
# Drawing. ``canvas`` is (H, W, 3) float32 RGB 0..255, modified in place.

def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, 3).astype(np.float32)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    kind = rng.integers(4)
    if kind == 0:  # linear gradient in a random direction
        angle = rng.uniform(0, 2 * math.pi)
        t = xs * math.cos(angle) + ys * math.sin(angle)
        t = ((t - t.min()) / max(float(np.ptp(t)), 1.0))[..., None]
        canvas = _random_colour(rng) * (1 - t) + _random_colour(rng) * t
    elif kind == 1:  # smooth colour noise: a coarse random grid upsampled
        noise = _smooth_noise(rng, height, width, cells=int(rng.integers(2, 7)), channels=3) * 255
        # Pulled halfway to a base colour: full-range colour noise would outshout the objects.
        canvas = 0.5 * noise + 0.5 * _random_colour(rng)
    else:  # a low-contrast pattern: stripes or checker
        base = _random_colour(rng)
        other = np.clip(base + rng.normal(0, 45, 3), 0, 255).astype(np.float32)
        on = _pattern(rng, ys, xs, "stripes" if kind == 2 else "checker", period=rng.uniform(10, 48))
        canvas = np.where(on[..., None], base, other)
    # A soft gradient of light over every kind, so no background is flat.
    t = (ys / height)[..., None] * rng.uniform(-40, 40)
    return (canvas + t).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int, channels: int) -> np.ndarray:
    """(H, W, channels) float32 in [0, 1]: random values on a ``cells`` grid, bicubic-upsampled."""
    coarse = (rng.uniform(0, 255, (cells, cells, channels))).astype(np.uint8)
    mode = "RGB" if channels == 3 else "L"
    image = Image.fromarray(coarse if channels == 3 else coarse[..., 0], mode)
    smooth = np.asarray(image.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    return smooth if channels == 3 else smooth[..., None]


def _pattern(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray, kind: str, period: float) -> np.ndarray:
    """Bool stripes (half-period bands) or checker squares along a random direction."""
    angle = rng.uniform(0, math.pi)
    u = (xs * math.cos(angle) + ys * math.sin(angle)) / period + rng.uniform(0, 1)
    if kind == "stripes":
        return (u % 1.0) < 0.5
    v = (-xs * math.sin(angle) + ys * math.cos(angle)) / period
    return (np.floor(u) + np.floor(v)) % 2 == 0


def _contrasting_colour(rng: np.random.Generator, behind: np.ndarray) -> np.ndarray:
    """A random colour, redrawn a few times when it is close to ``behind`` (3,): objects stay visible."""
    best, best_distance = None, -1.0
    for _ in range(4):
        colour = _random_colour(rng)
        distance = float(np.linalg.norm(colour - behind))
        if distance > best_distance:
            best, best_distance = colour, distance
        if distance > 90:
            break
    return best


def _texture(rng: np.random.Generator, height: int, width: int, colour: np.ndarray) -> np.ndarray:
    """(h, w, 3) float32 fill: solid, stripes, checker or noise, with a little shading."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    kind = ("solid", "stripes", "checker", "noise")[rng.integers(4)]
    if kind == "solid":
        texture = np.broadcast_to(colour, (height, width, 3)).copy()
    elif kind == "noise":
        grain = rng.normal(0, 28, (height, width, 1)).astype(np.float32)
        texture = colour + grain + rng.normal(0, 8, (height, width, 3)).astype(np.float32)
    else:
        # The second colour is a darker or lighter version or a random one: the shape's outline must
        # come from its mask, not from a colour that changes at the edge.
        second = colour * rng.uniform(0.3, 0.6) if rng.random() < 0.5 else _random_colour(rng)
        on = _pattern(rng, ys, xs, kind, period=rng.uniform(3, 10))
        texture = np.where(on[..., None], colour, second).astype(np.float32)
    shade = rng.uniform(-30, 30) * (ys / max(height - 1, 1) - 0.5)
    return texture + shade[..., None]


def _erode(mask: np.ndarray) -> np.ndarray:
    """4-neighbour erosion of a bool mask (pixels off the array count as outside)."""
    padded = np.pad(mask, 1)
    return mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]


def _random_shape(rng: np.random.Generator, height: int, width: int, min_size: float = MIN_OBJECT_SIZE) -> Shape:
    label = int(rng.integers(len(CLASS_NAMES)))
    # Log-uniform sizes: many small objects and a few large ones, as in natural images.
    largest = MAX_OBJECT_SIZE_FRACTION * min(height, width)
    size = math.exp(rng.uniform(math.log(min_size), math.log(largest)))
    aspect = math.exp(rng.uniform(-0.25, 0.25))
    rx, ry = size / 2 * math.sqrt(aspect), size / 2 / math.sqrt(aspect)
    radius = max(rx, ry)
    inner = {"star": rng.uniform(0.38, 0.52), "ring": rng.uniform(0.45, 0.7), "cross": rng.uniform(0.22, 0.36)}
    return Shape(label=label, cx=float(rng.uniform(radius, width - radius)), cy=float(rng.uniform(radius, height - radius)),
                 rx=rx, ry=ry, angle=float(rng.uniform(0, 2 * math.pi)),
                 inner=float(inner.get(CLASS_NAMES[label], 0.0)))


def _draw_stroke(rng: np.random.Generator, canvas: np.ndarray, owner: np.ndarray) -> None:
    """A curved line (quadratic Bezier), 1..4 px wide: clutter, not an object."""
    height, width = owner.shape
    start = rng.uniform((0, 0), (width, height))
    control, end = start + rng.normal(0, 60, (2, 2))
    t = np.linspace(0, 1, 24)[:, None]
    points = (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t ** 2 * end
    layer = Image.new("L", (width, height), 0)
    ImageDraw.Draw(layer).line([tuple(p) for p in points.tolist()], fill=255, width=int(rng.integers(1, 5)), joint="curve")
    mask = np.asarray(layer) > 0
    canvas[mask] = _random_colour(rng)
    owner[mask] = -1


def _draw_blob(rng: np.random.Generator, canvas: np.ndarray, owner: np.ndarray) -> None:
    """An amorphous noise-textured blob (thresholded smooth noise under a radial falloff)."""
    height, width = owner.shape
    size = int(rng.integers(12, max(13, min(height, width) // 5)))
    y0, x0 = int(rng.integers(0, height - size)), int(rng.integers(0, width - size))
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    radial = 1 - np.hypot(ys - size / 2, xs - size / 2) / (size / 2)
    mask = (0.6 * radial + 0.6 * _smooth_noise(rng, size, size, cells=4, channels=1)[..., 0]) > 0.6
    colour = _random_colour(rng)
    texture = colour + rng.normal(0, 20, (size, size, 1)).astype(np.float32)
    canvas[y0:y0 + size, x0:x0 + size][mask] = texture[mask]
    owner[y0:y0 + size, x0:x0 + size][mask] = -1


# ----------------------------------------------------------------------------------------------
# The COCO-format folder.

def write_synthetic_coco(root: str | Path, num_train: int = 200, num_val: int = 50, seed: int = 0,
                         height: int = 320, width: int = 320,
                         objects_per_image: tuple[int, int] = (2, 8),
                         min_object_size: float = MIN_OBJECT_SIZE) -> dict[str, dict[str, str]]:
    """Writes (or reuses) a COCO-format synthetic set under ``root``.

    Layout: ``root/train/000001.png ...``, ``root/val/...``, ``root/annotations/instances_{train,val}.json``
    (image ids and annotation ids from 1, category ids 1..6 in ``CLASS_NAMES`` order, ``bbox``
    ``[x, y, w, h]`` integer pixels of the visible extent, ``area`` the visible pixel count,
    ``iscrowd`` 1 for ignore regions) and ``root/synthetic_manifest.json``. Image ``i`` of a split
    is ``render_scene((seed, split, i))``, split 0 for train and 1 for val.

    A folder whose manifest records the same parameters and generator version, with all its files,
    is reused as is. The manifest is removed before and written after everything else, so an
    interrupted run is never mistaken for a complete set; every file is written by rename.

    Returns:
        ``{"train": {"format": "coco", "annotations": json path, "images": folder}, "val": {...}}``
        (strings), usable as a dataset config section.
    """
    root = Path(root)
    params = {"num_train": int(num_train), "num_val": int(num_val), "seed": int(seed), "height": int(height),
              "width": int(width), "objects_per_image": [int(n) for n in objects_per_image],
              "min_object_size": float(min_object_size)}
    manifest = {"generator": "sparsedet.data.synthetic", "version": GENERATOR_VERSION, "params": params,
                "class_names": list(CLASS_NAMES)}
    splits = {"train": (0, int(num_train)), "val": (1, int(num_val))}
    paths = {name: {"format": "coco", "annotations": str(root / "annotations" / f"instances_{name}.json"),
                    "images": str(root / name)} for name in splits}
    if _is_complete(root, manifest, splits):
        return paths

    (root / MANIFEST_NAME).unlink(missing_ok=True)
    for name, (split_code, count) in splits.items():
        image_dir = root / name
        image_dir.mkdir(parents=True, exist_ok=True)
        dataset = _coco_skeleton(name)
        for index in range(count):
            scene = render_scene((int(seed), split_code, index), height, width, objects_per_image, min_object_size)
            file_name = _file_name(index)
            _write_atomic(image_dir / file_name, _png_bytes(scene.image))
            image_id = index + 1
            dataset["images"].append({"id": image_id, "file_name": file_name, "height": height, "width": width})
            for box, label, crowd, area in zip(scene.boxes.tolist(), scene.labels.tolist(),
                                               scene.iscrowd.tolist(), scene.area.tolist()):
                x1, y1, x2, y2 = (int(v) for v in box)
                dataset["annotations"].append({"id": len(dataset["annotations"]) + 1, "image_id": image_id,
                                               "category_id": label + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                               "area": area, "iscrowd": int(crowd)})
        # Images left by an earlier, larger set would otherwise sit beside the new ones.
        wanted = {_file_name(i) for i in range(count)}
        for stale in image_dir.glob("*.png"):
            if re.fullmatch(r"\d{6}\.png", stale.name) and stale.name not in wanted:
                stale.unlink()
        annotations = root / "annotations" / f"instances_{name}.json"
        annotations.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(annotations, json.dumps(dataset).encode())
    _write_atomic(root / MANIFEST_NAME, json.dumps(manifest, indent=1).encode())
    return paths


def _file_name(index: int) -> str:
    return f"{index + 1:06d}.png"


def _coco_skeleton(split: str) -> dict:
    return {
        "info": {"description": f"sparsedet synthetic shapes, {split} split", "version": str(GENERATOR_VERSION)},
        "licenses": [],
        "images": [],
        "annotations": [],
        "categories": [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASS_NAMES)],
    }


def _is_complete(root: Path, manifest: dict, splits: dict[str, tuple[int, int]]) -> bool:
    try:
        if json.loads((root / MANIFEST_NAME).read_text()) != manifest:
            return False
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return all((root / "annotations" / f"instances_{name}.json").is_file()
               and all((root / name / _file_name(i)).is_file() for i in range(count))
               for name, (_, count) in splits.items())


def _png_bytes(image: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    # compress_level 1: several times faster than the default for noisy images, a little larger.
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write beside ``path`` and rename: readers (or a concurrent writer) never see half a file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
