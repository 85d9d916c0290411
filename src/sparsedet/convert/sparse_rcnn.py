"""Official Sparse R-CNN checkpoints (PeizeSun/SparseR-CNN, detectron2 layout) -> sparsedet.

Key mapping (spec §5); every official key has exactly one target:

==========================================================  =============================================
official                                                    sparsedet (torchvision ResNet/FPN names)
==========================================================  =============================================
``backbone.bottom_up.stem.conv1.weight``                    ``backbone.body.conv1.weight``
``backbone.bottom_up.stem.conv1.norm.X``                    ``backbone.body.bn1.X``
``backbone.bottom_up.res{s}.{b}.conv{i}[.norm].X``          ``backbone.body.layer{s-1}.{b}.conv{i}|bn{i}.X``
``backbone.bottom_up.res{s}.0.shortcut[.norm].X``           ``backbone.body.layer{s-1}.0.downsample.{0|1}.X``
``backbone.fpn_lateral{l}.X`` / ``fpn_output{l}.X``         ``backbone.fpn.inner_blocks|layer_blocks.{l-2}.0.X``
``init_proposal_{features,boxes}.weight``                   same
``head.head_series.{k}.*``                                  same (our head keeps the official names; its
                                                            batch_first MHA has the same weights)
==========================================================  =============================================

A softmax-mode checkpoint also stores ``criterion.empty_weight`` (C+1,); it is dropped (our criterion
rebuilds it) and turns into ``model.loss.use_focal=false`` plus ``no_object_weight``.

Files that are not official Sparse R-CNN checkpoints are refused with a description of what they
look like. That includes files already in sparsedet layout: converting them is never needed
(``sparsedet.load`` reads them directly), so a second conversion is reported rather than passed
through silently.
"""
from __future__ import annotations

import math
import re
from collections import OrderedDict
from typing import Mapping, Optional

import torch

from ..models import build_model
from ..models.backbones.build import detectron2_resnet_key
from .detectron2 import RESNET_DEPTHS as _RESNET_DEPTHS
from .detectron2 import _TO_D2_RESNET, resnet_blocks
from .common import ConversionResult, describe_layout, summarize_keys

BASE_CONFIG = "sparse_rcnn/r50_fpn_100pro_3x"
PROPOSAL_KEYS = ("init_proposal_features.weight", "init_proposal_boxes.weight")
OFFICIAL_BACKBONE_PREFIX = "backbone.bottom_up."

_OFFICIAL_FPN = re.compile(r"^backbone\.fpn_(lateral|output)(\d)\.(weight|bias)$")
_OUR_FPN = re.compile(r"^backbone\.fpn\.(inner|layer)_blocks\.(\d)\.0\.(weight|bias)$")
_STAGE = re.compile(r"^head\.head_series\.(\d+)\.")


class MissingKeyError(ValueError):
    """A tensor needed to infer the architecture is absent; ``key`` is its sparsedet name."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def looks_official(state: Mapping[str, object]) -> bool:
    """True when ``state`` uses the official (detectron2) backbone names."""
    return any(k.startswith((OFFICIAL_BACKBONE_PREFIX, "backbone.fpn_lateral", "backbone.fpn_output"))
               for k in state)


def official_to_sparsedet_key(key: str) -> Optional[str]:
    """The sparsedet name of an official key, or None when no rule covers it."""
    if key.startswith(OFFICIAL_BACKBONE_PREFIX):
        rest = key[len(OFFICIAL_BACKBONE_PREFIX):]
        new = detectron2_resnet_key(rest)
        return None if new == rest else "backbone.body." + new
    match = _OFFICIAL_FPN.match(key)
    if match:
        kind = "inner_blocks" if match[1] == "lateral" else "layer_blocks"
        # Official FPN levels are P2..P5, our blocks are numbered from the first input stage.
        return f"backbone.fpn.{kind}.{int(match[2]) - 2}.0.{match[3]}"
    if key in PROPOSAL_KEYS or _STAGE.match(key):
        return key
    return None


def sparsedet_to_official_key(key: str) -> str:
    """Inverse of ``official_to_sparsedet_key`` (for naming missing keys as the user's file would)."""
    if key.startswith("backbone.body."):
        rest = key[len("backbone.body."):]
        for pattern, repl in _TO_D2_RESNET:
            new, count = re.subn(pattern, repl, rest)
            if count:
                return OFFICIAL_BACKBONE_PREFIX + new
        return key
    match = _OUR_FPN.match(key)
    if match:
        kind = "lateral" if match[1] == "inner" else "output"
        return f"backbone.fpn_{kind}{int(match[2]) + 2}.{match[3]}"
    return key


def infer_overrides(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Config overrides for a model that a sparsedet-layout Sparse R-CNN state_dict fits.

    Read off the shapes: backbone (ResNet depth from blocks per stage and block type, or
    MobileNetV2), FrozenBN vs BatchNorm, FPN channels and P6/P7 convs, N and d from
    ``init_proposal_features`` (N, d), C from ``class_logits`` (C, d), the number of stages, FFN
    width, tower depths, self-attention on/off, interaction type, dynamic width and RoI side S
    (``out_layer`` is (d, S*S*d)).

    Not in the weights, so left to the base config (``sparse_rcnn/r50_fpn_100pro_3x``): attention
    heads, ResNet stride layout, FPN input stages / output levels, box coder, and focal vs softmax
    classification (a softmax model has C+1 logits and would be read as C+1 classes).

    Returns:
        ``{"model.backbone.depth": 50, "model.num_proposals": 100, ...}`` (plain ints/bools/strs).

    Raises:
        MissingKeyError: a tensor the inference needs is absent (``.key`` names it).
        ValueError: the tensors do not describe a model sparsedet can build.
    """
    s = state_dict

    def shape(key: str) -> tuple:
        if key not in s:
            raise MissingKeyError(key, f"cannot infer the Sparse R-CNN architecture: {key!r} is missing")
        return tuple(s[key].shape)

    num_proposals, hidden_dim = shape("init_proposal_features.weight")
    stages = sorted({int(m[1]) for k in s if (m := _STAGE.match(k))})
    if not stages:
        raise MissingKeyError("head.head_series.0.class_logits.weight",
                              "cannot infer the Sparse R-CNN architecture: no head.head_series.* keys")
    if stages != list(range(len(stages))):
        raise ValueError(f"head stages are numbered {stages}, expected 0..{len(stages) - 1}")
    out = _infer_backbone(s, shape)
    p = "head.head_series.0."
    out.update({
        "model.num_classes": shape(p + "class_logits.weight")[0],
        "model.num_proposals": num_proposals,
        "model.num_stages": len(stages),
        "model.hidden_dim": hidden_dim,
        "model.dim_feedforward": shape(p + "linear1.weight")[0],
        "model.num_cls_layers": _tower_depth(s, p + "cls_module."),
        "model.num_reg_layers": _tower_depth(s, p + "reg_module."),
        "model.self_attention": p + "self_attn.in_proj_weight" in s,
    })
    if p + "inst_interact.dynamic_layer.weight" in s:
        # dynamic_layer emits two kernels, d x d_dyn and d_dyn x d: 2 * d * d_dyn rows.
        dim_dynamic = shape(p + "inst_interact.dynamic_layer.weight")[0] // (2 * hidden_dim)
        area = shape(p + "inst_interact.out_layer.weight")[1] // hidden_dim
        side = math.isqrt(area)
        if side * side != area:
            raise ValueError(f"{p}inst_interact.out_layer.weight has {area * hidden_dim} inputs, "
                             f"not S*S*{hidden_dim} for an integer RoI side S")
        out.update({"model.interaction": "dynamic_conv", "model.dim_dynamic": dim_dynamic,
                    "model.pooler_resolution": side})
    elif p + "inst_interact.attn.in_proj_weight" in s:
        out["model.interaction"] = "multihead_attention"
    else:
        raise MissingKeyError(p + "inst_interact.dynamic_layer.weight",
                              f"cannot infer the instance interaction: no {p}inst_interact.* weights")
    return out


def _infer_backbone(s: Mapping[str, torch.Tensor], shape) -> dict:
    if "backbone.body.conv1.weight" in s:
        bottleneck, blocks = resnet_blocks(s)
        depth = _RESNET_DEPTHS.get((bottleneck, blocks))
        if depth is None:
            known = ", ".join(f"R-{d}: {b}" for (_, b), d in _RESNET_DEPTHS.items())
            raise ValueError(f"cannot infer the ResNet depth from {blocks} {'bottleneck' if bottleneck else 'basic'} "
                             f"blocks in res2..res5 (known: {known}); is a block missing?")
        out = {"model.backbone.name": "resnet", "model.backbone.depth": depth}
    elif "backbone.body.features.0.0.weight" in s:
        out = {"model.backbone.name": "mobilenet_v2"}
    else:
        raise MissingKeyError("backbone.body.conv1.weight",
                              "cannot infer the backbone: neither backbone.body.conv1.weight (ResNet) nor "
                              "backbone.body.features.0.0.weight (MobileNetV2) is present")
    # Trainable BatchNorm2d stores a step counter; FrozenBatchNorm2d does not.
    out["model.backbone.frozen_bn"] = not any(
        k.startswith("backbone.body.") and k.endswith("num_batches_tracked") for k in s)
    out["model.fpn.channels"] = shape("backbone.fpn.layer_blocks.0.0.weight")[0]
    if "backbone.fpn.extra_blocks.p6.weight" in s:
        from_p5 = s["backbone.fpn.extra_blocks.p6.weight"].shape[1] == out["model.fpn.channels"]
        out["model.fpn.top_block"] = "p6p7_from_p5" if from_p5 else "p6p7_from_c5"
    return out


def _tower_depth(s: Mapping[str, torch.Tensor], prefix: str) -> int:
    # Each tower layer is Linear (2-D weight) + LayerNorm (1-D weight) + ReLU.
    return sum(1 for k, v in s.items() if k.startswith(prefix) and k.endswith(".weight") and v.dim() == 2)


def convert_state_dict(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> ConversionResult:
    """Maps an official Sparse R-CNN state_dict onto sparsedet's names and checks it.

    Args:
        state: official tensors, e.g. 523 for R-50 (N = 100, C = 80).
        source: file name used in messages.

    Returns:
        ``ConversionResult`` whose state_dict loads with strict=True into
        ``build_model(BASE_CONFIG, result.config_overrides)``.

    Raises:
        ValueError: not an official Sparse R-CNN checkpoint (says what it looks like), or keys
            that map nowhere / are missing / have other shapes than the inferred model's (listed).
    """
    _check_official(state, source)
    state = OrderedDict(state)
    notes = []
    extra_overrides = {}
    if "criterion.empty_weight" in state:
        empty_weight = state.pop("criterion.empty_weight")
        extra_overrides = {"model.loss.use_focal": False, "model.loss.no_object_weight": float(empty_weight[-1])}
        notes.append("softmax classifier (criterion.empty_weight present): use_focal=false, "
                     "criterion.empty_weight dropped (rebuilt from no_object_weight)")

    mapped, unmapped = OrderedDict(), []
    for key, value in state.items():
        new = official_to_sparsedet_key(key)
        if new is None:
            unmapped.append(key)
        else:
            mapped[new] = value
    try:
        overrides = infer_overrides(mapped)
    except MissingKeyError as err:
        raise ValueError(f"{source}: official Sparse R-CNN checkpoint is incomplete: "
                         f"{sparsedet_to_official_key(err.key)!r} is missing, so the architecture cannot be "
                         f"inferred ({err})") from err
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from err
    if extra_overrides:
        overrides["model.num_classes"] -= 1  # C foreground classes + 1 no-object logit
        overrides.update(extra_overrides)

    expected = _model_shapes(overrides, source)
    unmapped += [sparsedet_to_official_key(k) for k in mapped if k not in expected]
    missing = [sparsedet_to_official_key(k) for k in expected if k not in mapped]
    wrong = [f"{sparsedet_to_official_key(k)}: file {tuple(v.shape)}, model {expected[k]}"
             for k, v in mapped.items() if k in expected and tuple(v.shape) != expected[k]]
    if unmapped or missing or wrong:
        raise ValueError(_mismatch_message(source, overrides, unmapped, missing, wrong))

    converted = OrderedDict((k, mapped[k]) for k in expected)
    return ConversionResult(converted, overrides, _report(source, state, converted, overrides, notes))


def _check_official(state: Mapping[str, object], source: str) -> None:
    has_head = any(k.startswith("head.head_series.") for k in state)
    if not (has_head and looks_official(state)):
        raise ValueError(f"{source}: not an official Sparse R-CNN checkpoint (expected backbone.bottom_up.*, "
                         f"backbone.fpn_lateral*, head.head_series.* keys); it looks like {describe_layout(state)}")


def _model_shapes(overrides: dict, source: str) -> "OrderedDict[str, tuple]":
    """Key -> shape of the model the overrides build (on the meta device: no memory, no init cost)."""
    try:
        with torch.device("meta"):
            model = build_model(BASE_CONFIG, {**overrides, "model.backbone.weights": None})
    except (ValueError, AssertionError, RuntimeError) as err:
        raise ValueError(f"{source}: the architecture read off the tensors ({overrides}) cannot be built: {err}") from err
    return OrderedDict((k, tuple(v.shape)) for k, v in model.state_dict().items())


def _architecture(overrides: dict) -> str:
    backbone = (f"R-{overrides['model.backbone.depth']}" if overrides["model.backbone.name"] == "resnet"
                else overrides["model.backbone.name"])
    return (f"{backbone}, N={overrides['model.num_proposals']}, C={overrides['model.num_classes']}, "
            f"{overrides['model.num_stages']} stages, d={overrides['model.hidden_dim']}")


def _mismatch_message(source, overrides, unmapped, missing, wrong) -> str:
    lines = [f"{source}: does not convert cleanly to sparsedet Sparse R-CNN ({_architecture(overrides)}, "
             f"inferred from the file's shapes). Official key names:"]
    for items, what, listing in (
            (unmapped, "in the file with no place in the model", summarize_keys),
            (missing, "of the model missing from the file", summarize_keys),
            (wrong, "with a different shape than the model's", _first_lines)):
        if items:
            lines.append(f"  {len(items)} key{'s' if len(items) != 1 else ''} {what}:")
            lines.append(listing(items))
    return "\n".join(lines)


def _first_lines(items: list, limit: int = 15) -> str:
    shown = [f"    - {item}" for item in items[:limit]]
    if len(items) > limit:
        shown.append(f"    ... and {len(items) - limit} more")
    return "\n".join(shown)


def _report(source, state, converted, overrides, notes) -> str:
    counts = OrderedDict((name, 0) for name in ("ResNet", "FPN", "proposals", "head"))
    for key in converted:
        group = ("ResNet" if key.startswith("backbone.body.") else "FPN" if key.startswith("backbone.fpn.")
                 else "proposals" if key in PROPOSAL_KEYS else "head")
        counts[group] += 1
    lines = [
        f"{source}: official Sparse R-CNN checkpoint, {len(state)} tensors -> {len(converted)} sparsedet keys",
        "  mapped: " + ", ".join(f"{n} {name}" for name, n in counts.items()),
        f"  architecture: {_architecture(overrides)}",
        "  overrides: " + " ".join(f"{k}={v}" for k, v in overrides.items()),
        f"  not stored in the weights, taken from {BASE_CONFIG}: attention heads, box coder, "
        "input format and normalisation" + ("" if "model.loss.use_focal" in overrides else ", focal classifier"),
    ]
    return "\n".join(lines + [f"  note: {n}" for n in notes])
