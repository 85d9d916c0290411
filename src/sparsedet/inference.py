"""Loading trained or official weights, and running a detector on image files."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .checkpoint import extract_state_dict, load_model_weights, read_weights_file
from .config import format_overrides
from .data.image_io import read_image
from .data.transforms import resize_shortest_edge
from .models import build_model

ImageLike = Union[str, Path, torch.Tensor, np.ndarray]


def load(path: Union[str, Path], config: Union[str, Path, Mapping, None] = None,
         overrides: Optional[Iterable[str]] = None, device: Union[str, torch.device] = "cpu") -> nn.Module:
    """Loads a detector in eval mode from a weights file.

    Accepts a sparsedet checkpoint (``{"model": ..., "config": ...}``, as the trainer writes), a
    bare state_dict in sparsedet layout (written by ``sparsedet convert``), or an official
    checkpoint of Sparse R-CNN, QueryDet, RetinaNet, TSP-FCOS, TSP-RCNN or ASAG (converted on the fly). Without a config,
    the architecture is read off the key names and tensor shapes; give ``config`` to build
    anything else (e.g. another input size recipe). ``overrides`` apply on top, e.g.
    ``["model.csq.enabled=true"]``.
    """
    from .convert import asag, convert_checkpoint, infer_overrides, official_architecture
    from .convert.querydet import BASE_CONFIGS

    data = read_weights_file(path)
    if config is None and isinstance(data.get("config"), Mapping):
        config = data["config"]
    state = extract_state_dict(data, source=str(path))
    inferred: dict = {}
    arch = official_architecture(state)
    if arch is not None:
        result = convert_checkpoint(arch, state)
        state, inferred = result.state_dict, result.config_overrides
        config = config or result.base_config or {**BASE_CONFIGS, "asag": asag.BASE_CONFIG}.get(arch)
    elif config is None and asag.is_sparsedet_asag(state):
        inferred, config = asag.infer_overrides(state), asag.BASE_CONFIG
    elif config is None:
        inferred = infer_overrides(state)
    model = build_model(config or "sparse_rcnn/r50_fpn_100pro_3x",
                        format_overrides(inferred) + list(overrides or ()))
    load_model_weights(model, state, path)
    return model.to(device).eval()


def _as_tensor(image: ImageLike) -> torch.Tensor:
    if isinstance(image, (str, Path)):
        return read_image(image)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"numpy images must be (H, W, 3) RGB, got shape {image.shape}")
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if isinstance(image, torch.Tensor):
        return image
    raise TypeError(f"cannot read an image from a {type(image).__name__}")


@torch.no_grad()
def predict(model: nn.Module, images: Union[ImageLike, Sequence[ImageLike]], score_threshold: float = 0.0,
            min_size: Optional[int] = None, max_size: Optional[int] = None, batch_size: int = 1) -> list[dict]:
    """Runs a detector on image files, RGB numpy arrays (H, W, 3) or RGB tensors (3, H, W), 0-255.

    Each image is resized so its short side is ``min_size`` (long side at most ``max_size``;
    defaults: the config's ``input.min_size_test`` / ``max_size_test``), detected, and the boxes are
    mapped back to the original pixels. ``batch_size`` images go through the model per call
    (dense detectors and Cascade Sparse Query run whole batches); a batch is zero-padded to its
    largest image, so images of one size get exactly their one-at-a-time detections.

    Returns:
        per image ``{"boxes" (K, 4) xyxy, "scores" (K,), "labels" (K,)}`` sorted by score, with
        scores below ``score_threshold`` removed.
    """
    if isinstance(images, (str, Path, torch.Tensor, np.ndarray)):
        images = [images]
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    input_cfg = getattr(model, "config", {}).get("input", {})
    min_size = min_size or input_cfg.get("min_size_test", 800)
    max_size = max_size or input_cfg.get("max_size_test", 1333)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results = []
    for start in range(0, len(images), batch_size):
        originals = [_as_tensor(image) for image in images[start:start + batch_size]]
        resized = [resize_shortest_edge(img.float(), min_size, max_size).to(device) for img in originals]
        outputs = model(resized, original_sizes=[tuple(img.shape[-2:]) for img in originals])
        for out in outputs:
            keep = out["scores"] >= score_threshold
            order = out["scores"][keep].argsort(descending=True)
            results.append({k: v[keep][order].cpu() for k, v in out.items()})
    model.train(was_training)
    return results
