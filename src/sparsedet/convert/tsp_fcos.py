"""Official TSP-FCOS checkpoints (Edward-Sun/TSP-Detection ``fcos/``, detectron2 layout) -> sparsedet.

The official code released no trained weights (tsp.md §9): this reads checkpoints written by its
training script (``{"model": state_dict, ...}``, no ``module.`` prefix). Key mapping (tsp.md §6),
every official key has exactly one target:

==========================================================  ==============================================
official                                                    sparsedet
==========================================================  ==============================================
``backbone.bottom_up.stem.conv1[.norm].X``                  ``backbone.body.conv1.X`` / ``backbone.body.bn1.X``
``backbone.bottom_up.res{s}.{b}.conv{j}[.norm].X``          ``backbone.body.layer{s-1}.{b}.conv{j}|bn{j}.X``
``backbone.bottom_up.res{s}.0.shortcut[.norm].X``           ``backbone.body.layer{s-1}.0.downsample.{0|1}.X``
``backbone.fpn_lateral{l}.X`` / ``fpn_output{l}.X``         ``backbone.fpn.inner_blocks|layer_blocks.{l-3}.0.X``
``backbone.top_block.p6|p7.conv|bn.X``                      ``backbone.fpn.extra_blocks.p6|p7.conv|bn.X``
``fcos_head.*``, ``transformer_encoder.*``,                 same names
``pyramid_position_embedding``, ``enc_proj.*``,
``post_enc_proj_norm.*``, ``cls_logits.*``, ``bbox_pred.*``,
``ctrness.*``, ``scales``
==========================================================  ==============================================

Ignored: ``pixel_mean``, ``pixel_std`` (the config's caffe convention: BGR, mean only). The
backbone is MSRA ResNet (stride in the 1x1 conv): the base config sets ``model.backbone.layout:
caffe``. The DCN variant (``conv2_offset`` keys) has no sparsedet counterpart and is refused.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Mapping, Optional

import torch

from ..models import build_model
from .detectron2 import (BACKBONE_PREFIX, backbone_to_official_key, backbone_to_sparsedet_key,
                         infer_bottleneck_resnet_depth)
from .common import ConversionResult, describe_layout, summarize_keys

BASE_CONFIG = "tsp_fcos/r50_fpn_3x"
IGNORED = ("pixel_mean", "pixel_std")
FIRST_FPN_STAGE = 3
SAME_NAME_PREFIXES = ("fcos_head.", "transformer_encoder.", "enc_proj.", "post_enc_proj_norm.", "cls_logits.",
                      "bbox_pred.", "ctrness.")
SAME_NAME_KEYS = ("pyramid_position_embedding", "scales")



def official_to_sparsedet_key(key: str) -> Optional[str]:
    """Our name for an official TSP-FCOS key (None when no rule covers it)."""
    new = backbone_to_sparsedet_key(key, FIRST_FPN_STAGE)
    if new is not None:
        return new
    if key.startswith(SAME_NAME_PREFIXES) or key in SAME_NAME_KEYS:
        return key
    return None


def sparsedet_to_official_key(key: str) -> str:
    """Inverse mapping, to name missing keys as the user's file would."""
    official = backbone_to_official_key(key, FIRST_FPN_STAGE)
    return key if official is None else official


def is_tsp_fcos(state: Mapping) -> bool:
    """True for an official-layout TSP-FCOS state_dict (FCOS towers and a root-level encoder)."""
    return (any(k.startswith("fcos_head.cls_tower.") for k in state)
            and any(k.startswith("transformer_encoder.") for k in state))


def _check_layout(state: Mapping, source: str) -> None:
    looks_d2 = any(k.startswith((BACKBONE_PREFIX, "backbone.fpn_lateral")) for k in state)
    if looks_d2 and is_tsp_fcos(state):
        return
    if any(k.startswith("roi_heads.box_head.transformer_encoder.") for k in state):
        raise ValueError(f"{source}: this is a TSP-RCNN checkpoint (roi_heads.box_head.transformer_encoder.*), "
                         "not a TSP-FCOS one: convert it with arch 'tsp_rcnn'")
    raise ValueError(f"{source}: not an official TSP-FCOS checkpoint (expected backbone.bottom_up.*, "
                     "backbone.fpn_*, backbone.top_block.*, fcos_head.*, transformer_encoder.* keys); "
                     f"it looks like {describe_layout(state)}")


def infer_overrides(mapped: Mapping[str, torch.Tensor]) -> dict:
    """Config overrides for ``BASE_CONFIG`` read off the shapes: ResNet depth, FrozenBN, FPN channels,
    classes, tower depth, encoder width / depth / FFN, number of levels.

    Raises:
        KeyError: a tensor the inference needs is absent (``args[0]`` is its sparsedet name).
        ValueError: the tensors do not describe a model sparsedet can build.
    """
    def shape(key: str) -> tuple:
        if key not in mapped:
            raise KeyError(key)
        return tuple(mapped[key].shape)

    depth = infer_bottleneck_resnet_depth(mapped)
    num_levels = shape("pyramid_position_embedding")[0]
    if num_levels != 5:
        raise ValueError(f"pyramid_position_embedding has {num_levels} rows; TSP-FCOS detects on P3..P7 (5 levels)")
    convs = len({int(m[1]) for k, v in mapped.items()
                 if (m := re.match(r"^fcos_head\.cls_tower\.(\d+)\.weight$", k)) and v.dim() == 4})
    layers = len({int(m[1]) for k in mapped if (m := re.match(r"^transformer_encoder\.layers\.(\d+)\.", k))})
    return {
        "model.backbone.depth": depth,
        "model.backbone.frozen_bn": not any(k.startswith("backbone.body.") and k.endswith("num_batches_tracked")
                                            for k in mapped),
        "model.fpn.channels": shape("backbone.fpn.layer_blocks.0.0.weight")[0],
        "model.num_classes": shape("cls_logits.weight")[0],
        "model.head.num_convs": convs,
        "model.transformer.d_model": shape("enc_proj.weight")[0],
        "model.transformer.num_layers": layers,
        "model.transformer.dim_feedforward": shape("transformer_encoder.layers.0.linear1.weight")[0],
    }


def convert_tsp_fcos(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> ConversionResult:
    """``CONVERTERS["tsp_fcos"]``: maps an official TSP-FCOS state_dict onto sparsedet's names and
    checks every key and shape against the model the shapes describe.

    Returns:
        ``ConversionResult`` whose state_dict loads with strict=True into
        ``build_model("tsp_fcos/r50_fpn_3x", result.config_overrides)``.

    Raises:
        ValueError: not a TSP-FCOS checkpoint (says what it looks like, e.g. Sparse R-CNN or QueryDet),
            or keys that map nowhere / are missing / have other shapes (listed by official name).
    """
    _check_layout(state, source)
    ignored = [k for k in state if k in IGNORED]
    mapped, unmapped = OrderedDict(), []
    for key, value in state.items():
        if key in ignored:
            continue
        new = official_to_sparsedet_key(key)
        if new is None:
            unmapped.append(key)
        else:
            mapped[new] = value
    try:
        overrides = infer_overrides(mapped)
    except KeyError as err:
        raise ValueError(f"{source}: official TSP-FCOS checkpoint is incomplete: "
                         f"{sparsedet_to_official_key(err.args[0])!r} is missing") from err
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from err

    try:
        with torch.device("meta"):
            model = build_model(BASE_CONFIG, {**overrides, "model.backbone.weights": None})
    except (ValueError, AssertionError, RuntimeError) as err:
        raise ValueError(f"{source}: the architecture read off the tensors ({overrides}) cannot be built: {err}") from err
    expected = OrderedDict((k, tuple(v.shape)) for k, v in model.state_dict().items())
    unmapped += [sparsedet_to_official_key(k) for k in mapped if k not in expected]
    missing = [sparsedet_to_official_key(k) for k in expected if k not in mapped]
    wrong = [f"{sparsedet_to_official_key(k)}: file {tuple(v.shape)}, model {expected[k]}"
             for k, v in mapped.items() if k in expected and tuple(v.shape) != expected[k]]
    if unmapped or missing or wrong:
        lines = [f"{source}: does not convert cleanly to sparsedet TSP-FCOS ({_architecture(overrides)}, inferred "
                 "from the file's shapes). Official key names:"]
        for items, what in ((unmapped, "in the file with no place in the model"),
                            (missing, "of the model missing from the file"),
                            (wrong, "with a different shape than the model's")):
            if items:
                lines.append(f"  {len(items)} key{'s' if len(items) != 1 else ''} {what}:")
                lines.append(summarize_keys(items) if items is not wrong else "\n".join(f"    - {w}" for w in items[:15]))
        if any("conv2_offset" in k for k in unmapped):
            lines.append("  note: conv2_offset keys are the DCN backbone variant, which sparsedet does not implement")
        raise ValueError("\n".join(lines))

    converted = OrderedDict((k, mapped[k]) for k in expected)
    report = "\n".join([
        f"{source}: official TSP-FCOS checkpoint, {len(state)} tensors -> {len(converted)} sparsedet keys "
        f"({len(ignored)} ignored: pixel_mean/std, from the config)",
        f"  architecture: {_architecture(overrides)}",
        f"  base config: {BASE_CONFIG}; overrides: " + " ".join(f"{k}={v}" for k, v in overrides.items()),
        "  input: BGR, caffe mean, std 1; ResNet stride in the 1x1 conv (model.backbone.layout=caffe)",
    ])
    return ConversionResult(converted, overrides, report, base_config=BASE_CONFIG)


def _architecture(overrides: dict) -> str:
    return (f"R-{overrides['model.backbone.depth']}, K={overrides['model.num_classes']}, "
            f"{overrides['model.transformer.num_layers']}-layer d={overrides['model.transformer.d_model']} encoder")
