"""Checkpoints of the official TSP-RCNN code (Edward-Sun/TSP-Detection ``rcnn/``, detectron2 layout,
spec §6) -> sparsedet. No official weights were released; this converts self-trained ones.

Key mapping (every official key has exactly one target; ``#`` = a number kept as is):

=========================================================  ==============================================
official                                                   sparsedet
=========================================================  ==============================================
``backbone.bottom_up.*`` (detectron2 ResNet)               ``backbone.body.*`` (torchvision ResNet names)
``backbone.fpn_lateral{k}.X`` / ``fpn_output{k}.X``        ``backbone.fpn.inner_blocks|layer_blocks.{k-2}.0.X``
``backbone.top_block.p6|p7.conv|bn.X``                     ``backbone.fpn.extra_blocks.p6|p7.conv|bn.X``
``proposal_generator.rpn_head.obj_conv.#.conv.X``          ``rpn_head.objectness_convs.#.X``
``proposal_generator.rpn_head.anchor_conv.#.conv.X``       ``rpn_head.deltas_convs.#.X``
``proposal_generator.rpn_head.obj_bn_list.#.#.X``          ``rpn_head.objectness_norms.#.#.X``
``proposal_generator.rpn_head.anchor_bn_list.#.#.X``       ``rpn_head.deltas_norms.#.#.X``
``proposal_generator.rpn_head.objectness_logits|anchor_deltas.X``   ``rpn_head.objectness_logits|anchor_deltas.X``
``roi_heads.box_head[.#].X`` / ``roi_heads.box_predictor[.#].X``    ``box_head[.#].X`` / ``box_predictor[.#].X``
=========================================================  ==============================================

Ignored (regenerated): ``pixel_mean``, ``pixel_std``, ``proposal_generator.anchor_generator.cell_anchors.#``
(our anchors come from the config, keeping the official 51.80 on P3). The architecture (ResNet depth,
NUM_FC, FFN width, encoder depth, class count, class-agnostic boxes, cascade stages, positional encoding
on/off) is read off the shapes. The backbone is MSRA caffe-style, as ``tsp_rcnn/r50_fpn_3x`` sets.
"""
from __future__ import annotations

import math
import re
from collections import OrderedDict
from typing import Mapping, Optional

import torch

from ..models import build_model
from .detectron2 import backbone_to_official_key, backbone_to_sparsedet_key
from .common import ConversionResult, describe_layout, summarize_keys
from .sparse_rcnn import MissingKeyError, _infer_backbone

BASE_CONFIG = "tsp_rcnn/r50_fpn_3x"
FIRST_FPN_STAGE = 2   # P2-P5 (+ P6 from the top block)
IGNORED = re.compile(r"^(pixel_mean|pixel_std|proposal_generator\.anchor_generator\.cell_anchors\.\d+)$")
SIGNATURE_KEY = "roi_heads.box_head.post_input_proj_norm.weight"

# (official, ours) prefixes; "#" stands for one number, carried over.
_PREFIX_PAIRS = [
    ("backbone.top_block.", "backbone.fpn.extra_blocks."),   # p6|p7.conv|bn.X: same names below
    ("proposal_generator.rpn_head.obj_conv.#.conv.", "rpn_head.objectness_convs.#."),
    ("proposal_generator.rpn_head.anchor_conv.#.conv.", "rpn_head.deltas_convs.#."),
    ("proposal_generator.rpn_head.obj_bn_list.", "rpn_head.objectness_norms."),
    ("proposal_generator.rpn_head.anchor_bn_list.", "rpn_head.deltas_norms."),
    ("proposal_generator.rpn_head.objectness_logits.", "rpn_head.objectness_logits."),
    ("proposal_generator.rpn_head.anchor_deltas.", "rpn_head.anchor_deltas."),
    ("roi_heads.box_head.", "box_head."),
    ("roi_heads.box_predictor.", "box_predictor."),
]


def _prefix_rule(source: str, target: str) -> tuple[re.Pattern, str]:
    pattern = re.compile("^" + re.escape(source).replace("\\#", "#").replace("#", r"(\d+)"))
    return pattern, target.replace("#", r"\1")


_TO_OURS = [_prefix_rule(o, s) for o, s in _PREFIX_PAIRS]
_TO_OFFICIAL = [_prefix_rule(s, o) for o, s in _PREFIX_PAIRS]


def official_to_sparsedet_key(key: str) -> Optional[str]:
    """Our name for an official key, or None when no rule covers it."""
    new = backbone_to_sparsedet_key(key, FIRST_FPN_STAGE)
    if new is not None:
        return new
    for pattern, repl in _TO_OURS:
        if pattern.match(key):
            return pattern.sub(repl, key, count=1)
    return None


def sparsedet_to_official_key(key: str) -> str:
    """Inverse of ``official_to_sparsedet_key``, to name missing keys as the user's file would."""
    official = backbone_to_official_key(key, FIRST_FPN_STAGE)
    if official is not None:
        return official
    for pattern, repl in _TO_OFFICIAL:
        if pattern.match(key):
            return pattern.sub(repl, key, count=1)
    return key


def infer_overrides(s: Mapping[str, torch.Tensor]) -> dict:
    """Config overrides for the model a sparsedet-layout TSP-RCNN state_dict fits (read off the shapes).

    Raises:
        MissingKeyError: a tensor the inference needs is absent (``.key`` names it, our layout).
    """
    def shape(key: str) -> tuple:
        if key not in s:
            raise MissingKeyError(key, f"cannot infer the TSP-RCNN architecture: {key!r} is missing")
        return tuple(s[key].shape)

    out = _infer_backbone(s, shape)
    out.pop("model.fpn.top_block", None)
    if out.get("model.backbone.depth", 50) < 50:
        out["model.backbone.layout"] = "torchvision"   # basic blocks: no 1x1 conv to carry the stride
    stages = sorted({int(m[1]) for k in s if (m := re.match(r"^box_head\.(\d+)\.", k))})
    head, predictor = ("box_head.0.", "box_predictor.0.") if stages else ("box_head.", "box_predictor.")
    num_classes = shape(predictor + "cls_score.weight")[0] - 1
    d_model = shape(predictor + "cls_score.weight")[1]
    if head + "input_proj.weight" in s:
        num_fc, in_features = 1, shape(head + "input_proj.weight")[1]
    else:
        num_fc, in_features = 2, shape(head + "input_proj.0.weight")[1]
        out["model.roi_heads.fc_dim"] = shape(head + "input_proj.0.weight")[0]
    side = math.isqrt(in_features // out["model.fpn.channels"])
    if side * side * out["model.fpn.channels"] != in_features:
        raise ValueError(f"{head}input_proj takes {in_features} inputs, not FPN channels x S x S")
    layers = {int(m[1]) for k in s if (m := re.match(re.escape(head) + r"transformer_encoder\.layers\.(\d+)\.", k))}
    box_outputs = shape(predictor + "bbox_pred.layers.2.weight")[0]
    out.update({
        "model.num_classes": num_classes,
        "model.rpn.num_convs": len({k.split(".")[2] for k in s if k.startswith("rpn_head.objectness_convs.")}),
        "model.roi_heads.pooler_resolution": side,
        "model.roi_heads.num_fc": num_fc,
        "model.roi_heads.d_model": d_model,
        "model.roi_heads.num_layers": len(layers),
        "model.roi_heads.dim_feedforward": shape(head + "transformer_encoder.layers.0.linear1.weight")[0],
        "model.roi_heads.cls_agnostic_bbox_reg": box_outputs == 4,
    })
    if head + "dec_pos_embed_proj.weight" not in s:
        out["model.roi_heads.position_encoding"] = "none"
    if stages:
        out["model.cascade.num_stages"] = len(stages)
    return out


def convert_tsp_rcnn(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> ConversionResult:
    """Maps an official TSP-RCNN state_dict onto sparsedet's names and checks every key and shape.

    Returns:
        ``ConversionResult`` whose state_dict loads with strict=True into
        ``build_model(BASE_CONFIG, result.config_overrides)``.

    Raises:
        ValueError: not a TSP-RCNN checkpoint (names the key it lacks and what the file looks like), or
            keys that map nowhere / are missing / have other shapes than the inferred model's.
    """
    signature = [SIGNATURE_KEY, "roi_heads.box_head.0.post_input_proj_norm.weight",
                 "proposal_generator.rpn_head.obj_bn_list.0.0.weight"]
    if not any(k in state for k in signature[:2]) or signature[2] not in state:
        from . import official_architecture  # here: the package imports this module

        absent = next(k for k in (SIGNATURE_KEY, signature[2]) if k not in state)
        other = official_architecture(state)
        hint = f"; if it is an official {other} checkpoint, use `sparsedet convert {other}`" if other else ""
        raise ValueError(f"{source}: not an official TSP-RCNN checkpoint: key {absent!r} is missing; "
                         f"it looks like {describe_layout(state)}{hint}")
    mapped, unmapped, ignored = OrderedDict(), [], []
    for key, value in state.items():
        if IGNORED.match(key):
            ignored.append(key)
            continue
        new = official_to_sparsedet_key(key)
        if new is None:
            unmapped.append(key)
        else:
            mapped[new] = value
    try:
        overrides = infer_overrides(mapped)
    except MissingKeyError as err:
        raise ValueError(f"{source}: official TSP-RCNN checkpoint is incomplete: "
                         f"{sparsedet_to_official_key(err.key)!r} is missing ({err})") from err
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from err
    expected = _model_shapes(overrides, source)
    unmapped += [sparsedet_to_official_key(k) for k in mapped if k not in expected]
    missing = [sparsedet_to_official_key(k) for k in expected if k not in mapped]
    wrong = [f"{sparsedet_to_official_key(k)}: file {tuple(v.shape)}, model {expected[k]}"
             for k, v in mapped.items() if k in expected and tuple(v.shape) != expected[k]]
    if unmapped or missing or wrong:
        lines = [f"{source}: does not convert cleanly to sparsedet TSP-RCNN ({overrides}). Official key names:"]
        for items, what in ((unmapped, "in the file with no place in the model"),
                            (missing, "of the model missing from the file"), (wrong, "with another shape")):
            if items:
                lines += [f"  {len(items)} key(s) {what}:", summarize_keys(items) if items is not wrong
                          else "\n".join(f"    - {w}" for w in items[:15])]
        raise ValueError("\n".join(lines))
    converted = OrderedDict((k, mapped[k]) for k in expected)
    report = "\n".join([
        f"{source}: official TSP-RCNN checkpoint, {len(state)} tensors -> {len(converted)} sparsedet keys "
        f"({len(ignored)} ignored: pixel statistics / cell anchors, regenerated)",
        "  overrides: " + " ".join(f"{k}={v}" for k, v in overrides.items()),
        f"  not stored in the weights, taken from {BASE_CONFIG}: anchors (P3 51.80), attention heads, "
        "box coder weights, input format (caffe BGR)",
    ])
    return ConversionResult(converted, overrides, report, base_config=BASE_CONFIG)


def _model_shapes(overrides: dict, source: str) -> "OrderedDict[str, tuple]":
    """Key -> shape of the model the overrides build (on the meta device: no memory, no init cost)."""
    try:
        with torch.device("meta"):
            model = build_model(BASE_CONFIG, {**overrides, "model.backbone.weights": None})
    except (ValueError, AssertionError, RuntimeError) as err:
        raise ValueError(f"{source}: the architecture read off the tensors ({overrides}) cannot be built: {err}") from err
    return OrderedDict((k, tuple(v.shape)) for k, v in model.state_dict().items())
