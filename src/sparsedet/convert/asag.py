"""Official ASAG checkpoints (iSEE-Laboratory/ASAG) -> sparsedet.

Key mapping (spec section 6); every official key has exactly one target:

==============================================  ================================================
official                                        sparsedet
==============================================  ================================================
``backbone.0.body.X`` (torchvision ResNet)      ``backbone.body.X``
``neck.inner_blocks.{i}.X`` (torchvision 0.11)  ``backbone.fpn.inner_blocks.{i}.0.X`` (also
``neck.layer_blocks.{i}.X``                     ``backbone.fpn.layer_blocks.{i}.0.X``  accepts ``.{i}.0.X``)
``anchor_generator.*``                          same
``rpn.*`` (RelationBlock)                       same
``decoder.decoder_embedding.weight``            same
``decoder.bbox_head.{k}.*`` (ASAG-A)            same
``decoder.head_series.{k}.*`` (ASAG-S)          same
==============================================  ================================================

The model also keeps ``anchor_generator.train_steps`` (training iterations seen); a converted
checkpoint gets a value past any ``target_patch_iters``, i.e. "trained".

Inferred from the shapes: decoder type (``bbox_head`` / ``head_series``), setting (100 / 300 from
``anchor_generator.proj_all.layers.2.weight``), ResNet depth (blocks in layer3), classes, number
of heads. ``keep_head="aux_2"`` (or ``main``, ``aux_0``..) keeps only that head: its weights and
``decoder_embedding`` row move to slot 0 and the model is built with one head (the paper's speed
model, spec section 5.2).
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Mapping, Optional

import torch

from ..models import build_model
from ..models.asag.config import SETTINGS
from .common import ConversionResult, describe_layout, summarize_keys

BASE_CONFIG = "asag/a_r50_fpn_100q_1x"
TRAINED_STEPS = 2 ** 40

_FPN = re.compile(r"^neck\.(inner|layer)_blocks\.(\d)\.(?:0\.)?(weight|bias)$")
_HEAD = re.compile(r"^decoder\.(bbox_head|head_series)\.(\d+)\.(.*)$")
# (bottleneck blocks?, blocks in layer3) -> ResNet depth
_RESNET_DEPTHS = {(False, 2): 18, (False, 6): 34, (True, 6): 50, (True, 23): 101, (True, 36): 152}
_MODEL_PREFIXES = ("anchor_generator.", "rpn.", "decoder.")


def looks_like_asag(state: Mapping[str, object]) -> bool:
    """True for an official ASAG state_dict (``backbone.0.body.*`` + ``anchor_generator.*``)."""
    return any(k.startswith("anchor_generator.proj_all.") for k in state) and \
        any(k.startswith("backbone.0.body.") for k in state)


def is_sparsedet_asag(state: Mapping[str, object]) -> bool:
    """True for an ASAG state_dict already in sparsedet layout."""
    return any(k.startswith("anchor_generator.proj_all.") for k in state) and \
        any(k.startswith("backbone.body.") for k in state)


def official_to_sparsedet_key(key: str) -> Optional[str]:
    if key.startswith("backbone.0.body."):
        return "backbone.body." + key[len("backbone.0.body."):]
    match = _FPN.match(key)
    if match:
        return f"backbone.fpn.{match[1]}_blocks.{match[2]}.0.{match[3]}"
    if key.startswith(_MODEL_PREFIXES):
        return key
    return None


def infer_overrides(state: Mapping[str, torch.Tensor]) -> dict:
    """Architecture overrides of ``BASE_CONFIG`` from a state_dict in sparsedet (or official) layout."""
    def tensor(key):
        if key not in state:
            raise ValueError(f"key {key!r} is missing, so the architecture cannot be inferred")
        return state[key]

    anchors_out = tensor("anchor_generator.proj_all.layers.2.weight").shape[0]
    setting = next((s for s, v in SETTINGS.items() if 5 * v["anchors_per_fixed_patch"] == anchors_out), None)
    if setting is None:
        raise ValueError(f"anchor_generator.proj_all.layers.2.weight has {anchors_out} rows; settings 100 / 300 "
                         f"have {', '.join(str(5 * v['anchors_per_fixed_patch']) for v in SETTINGS.values())}")
    heads = {}
    for key in state:
        match = _HEAD.match(key)
        if match:
            heads.setdefault(match[1], set()).add(int(match[2]))
    if len(heads) != 1:
        raise ValueError("expected decoder.bbox_head.* (ASAG-A) or decoder.head_series.* (ASAG-S) keys, "
                         f"found {sorted(heads) or 'neither'}")
    (kind, indices), = heads.items()
    prefix = "backbone.0.body." if any(k.startswith("backbone.0.body.") for k in state) else "backbone.body."
    blocks = {k[len(prefix):].split(".")[1] for k in state if k.startswith(prefix + "layer3.")}
    bottleneck = prefix + "layer1.0.conv3.weight" in state
    depth = _RESNET_DEPTHS.get((bottleneck, len(blocks)))
    if depth is None:
        raise ValueError(f"{prefix}layer3 has {len(blocks)} {'bottleneck' if bottleneck else 'basic'} blocks: "
                         "not a ResNet-18/34/50/101/152")
    num_heads = len(indices)
    return {
        "model.decoder_type": "adamixer" if kind == "bbox_head" else "sparse_rcnn",
        "model.setting": setting,
        "model.backbone.depth": depth,
        "model.num_classes": int(tensor("rpn.fc_cls.weight").shape[0]),
        "model.hidden_dim": int(tensor("rpn.fc_cls.weight").shape[1]),
        "model.fpn.channels": int(tensor("rpn.fc_cls.weight").shape[1]),
        "model.num_heads_decoder": num_heads,
        "model.dim_feedforward": int(tensor("rpn.tokens_proj.layers.0.weight").shape[0]),
        "model.anchors.compress_hidden": int(tensor("anchor_generator.compress.0.0.weight").shape[0]),
        "model.anchors.compress_dim": int(tensor("anchor_generator.P6.weight").shape[0]),
        "model.num_attention_heads": int(tensor("rpn.iof_tau").shape[0]),
        **({"model.test_head": "main"} if num_heads == 1 else {}),
    }


def keep_one_head(state: "OrderedDict[str, torch.Tensor]", head: str) -> "OrderedDict[str, torch.Tensor]":
    """Keeps only decoder head ``head`` (``aux_k`` or ``main``), moved to slot 0 with its embedding row."""
    indices = sorted({int(m[2]) for m in map(_HEAD.match, state) if m})
    names = [f"aux_{k}" for k in range(len(indices) - 1)] + ["main"]
    if head not in names:
        raise ValueError(f"keep_head={head!r}: the checkpoint's heads are {names}")
    index = names.index(head)
    out = OrderedDict()
    for key, value in state.items():
        match = _HEAD.match(key)
        if match:
            if int(match[2]) == index:
                out[f"decoder.{match[1]}.0.{match[3]}"] = value
        elif key == "decoder.decoder_embedding.weight":
            out[key] = value[index:index + 1].clone()
        else:
            out[key] = value
    return out


def convert_state_dict(state: Mapping[str, torch.Tensor], source: str = "checkpoint",
                       keep_head: Optional[str] = None) -> ConversionResult:
    """Maps an official ASAG state_dict onto sparsedet's names and checks every shape.

    Returns:
        ``ConversionResult`` whose state_dict loads with strict=True into
        ``build_model(BASE_CONFIG, result.config_overrides)`` (e.g. plus ``model.test_head=...``).

    Raises:
        ValueError: not an official ASAG checkpoint; keys that map nowhere, are missing, or have
            other shapes than the inferred model's (listed); ``keep_head`` not in the file.
    """
    if not looks_like_asag(state):
        raise ValueError(f"{source}: not an official ASAG checkpoint (expected backbone.0.body.*, neck.*, "
                         f"anchor_generator.*, rpn.*, decoder.* keys); it looks like {describe_layout(state)}")
    mapped, unmapped = OrderedDict(), []
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        new = official_to_sparsedet_key(key)
        if new is None:
            unmapped.append(key)
        else:
            mapped[new] = value
    notes = []
    if keep_head is not None:
        mapped = keep_one_head(mapped, keep_head)
        notes.append(f"kept only head {keep_head} (now head 0, model.num_heads_decoder=1, model.test_head=main)")
    try:
        overrides = infer_overrides(mapped)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from err
    mapped["anchor_generator.train_steps"] = torch.tensor(TRAINED_STEPS, dtype=torch.int64)
    expected = _model_shapes(overrides, source)
    unmapped += [k for k in mapped if k not in expected]
    missing = [k for k in expected if k not in mapped]
    wrong = [f"{k}: file {tuple(v.shape)}, model {expected[k]}" for k, v in mapped.items()
             if k in expected and tuple(v.shape) != expected[k]]
    if unmapped or missing or wrong:
        lines = [f"{source}: does not convert cleanly to sparsedet ASAG ({overrides}):"]
        for items, what in ((unmapped, "in the file with no place in the model"),
                            (missing, "of the model missing from the file"),
                            (wrong, "with a different shape than the model's")):
            if items:
                lines.append(f"  {len(items)} key(s) {what}:")
                lines.append(summarize_keys(items) if what != "with a different shape than the model's"
                             else "\n".join(f"    - {w}" for w in items[:15]))
        raise ValueError("\n".join(lines))
    converted = OrderedDict((k, mapped[k]) for k in expected)
    decoder = "ASAG-A (AdaMixer)" if overrides["model.decoder_type"] == "adamixer" else "ASAG-S (Sparse R-CNN)"
    report = "\n".join([
        f"{source}: official {decoder} checkpoint, {len(state)} tensors -> {len(converted)} sparsedet keys",
        f"  architecture: R-{overrides['model.backbone.depth']}, setting {overrides['model.setting']}, "
        f"C={overrides['model.num_classes']}, {overrides['model.num_heads_decoder']} decoder head(s)",
        "  overrides: " + " ".join(f"{k}={v}" for k, v in overrides.items()),
        f"  build with {BASE_CONFIG} + these overrides; choose the evaluated head with model.test_head "
        "(spec: aux_2 for most checkpoints, main for ASAG_A_r50_3x_100)",
    ] + [f"  note: {n}" for n in notes])
    return ConversionResult(converted, overrides, report)


def _model_shapes(overrides: dict, source: str) -> "OrderedDict[str, tuple]":
    try:
        with torch.device("meta"):
            model = build_model(BASE_CONFIG, {**overrides, "model.backbone.weights": None})
    except (ValueError, AssertionError, RuntimeError) as err:
        raise ValueError(f"{source}: the architecture read off the tensors ({overrides}) cannot be built: {err}") from err
    return OrderedDict((k, tuple(v.shape)) for k, v in model.state_dict().items())
