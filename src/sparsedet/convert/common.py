"""Pieces every checkpoint converter shares: the result type, readable key lists, layout guesses."""
from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch


@dataclass
class ConversionResult:
    """What a converter returns.

    Attributes:
        state_dict: tensors under sparsedet's names, in our model's ``state_dict()`` order.
        config_overrides: dotted overrides (``{"model.num_proposals": 300, ...}``) that, applied to
            the converter's base config, build a model this state_dict loads into with strict=True.
        report: a few human-readable lines: source, layout, key counts, inferred config, notes.
        base_config: the bundled config the overrides apply to (``None``: the caller knows it).
    """

    state_dict: "OrderedDict[str, torch.Tensor]"
    config_overrides: dict
    report: str = ""
    base_config: "str | None" = None


def _render_numbers(values: Iterable[int]) -> str:
    values = sorted(set(values))
    if len(values) > 2 and values == list(range(values[0], values[-1] + 1)):
        return f"{{{values[0]}..{values[-1]}}}"
    return "{" + ",".join(map(str, values)) + "}"


def summarize_keys(keys: Iterable[str], max_lines: int = 15, indent: str = "    - ") -> str:
    """Lists keys one per line, folding keys that differ only in numeric path parts.

    ``head.head_series.0.norm1.weight`` ... ``head.head_series.5.norm1.weight`` becomes
    ``head.head_series.{0..5}.norm1.weight``. A folded line is only written in brace form when it
    names exactly the keys given; otherwise it uses ``*`` and states the count.
    """
    groups: "OrderedDict[str, list[tuple[int, ...]]]" = OrderedDict()
    for key in keys:
        parts = key.split(".")
        pattern = ".".join("#" if p.isdigit() else p for p in parts)
        groups.setdefault(pattern, []).append(tuple(int(p) for p in parts if p.isdigit()))
    lines = []
    for pattern, numbers in groups.items():
        if len(numbers) == 1:
            slots = iter(map(str, numbers[0]))
        else:
            per_slot = [sorted({n[i] for n in numbers}) for i in range(len(numbers[0]))]
            if math.prod(len(s) for s in per_slot) == len(set(numbers)):
                slots = iter(_render_numbers(s) if len(s) > 1 else str(s[0]) for s in per_slot)
            else:
                slots = iter(["*"] * len(per_slot))
        line = re.sub("#", lambda _: next(slots), pattern)
        lines.append(line if "*" not in line else f"{line} ({len(numbers)} keys)")
    shown = [indent + line for line in lines[:max_lines]]
    if len(lines) > max_lines:
        rest = sum(len(groups[p]) for p in list(groups)[max_lines:])
        shown.append(f"{indent}... and {len(lines) - max_lines} more groups ({rest} keys)")
    return "\n".join(shown)


# (test on the key set, description). Checked in order; the first hit describes the file.
_LAYOUT_SIGNS = [
    (lambda ks: _has(ks, "backbone.body.") and _has(ks, "head.head_series."),
     "a Sparse R-CNN state_dict already in sparsedet layout (`backbone.body.*`, e.g. written by "
     "convert_checkpoint); it needs no conversion: load it with sparsedet.load() or load_state_dict()"),
    (lambda ks: _has(ks, "backbone.body.") and (_has(ks, "rpn.") or _has(ks, "roi_heads.")),
     "a torchvision Faster/Mask R-CNN state_dict (`rpn.*`, `roi_heads.*` keys)"),
    (lambda ks: _has(ks, "proposal_generator.") or _has(ks, "roi_heads."),
     "a detectron2 two-stage R-CNN checkpoint (`proposal_generator.*` / `roi_heads.*` keys)"),
    (lambda ks: _has(ks, "query_head.") or _has(ks, "det_head."),
     "a QueryDet checkpoint (`query_head.*` keys)"),
    (lambda ks: _has(ks, "head.cls_score") or _has(ks, "head.cls_subnet") or _has(ks, "head.classification_head"),
     "a RetinaNet-style dense detector checkpoint (`head.cls_score` / `head.cls_subnet` keys)"),
    (lambda ks: _has(ks, "transformer.") or _has(ks, "class_embed."),
     "a DETR-family checkpoint (`transformer.*` keys)"),
    (lambda ks: _has(ks, "fc.weight") or (_has(ks, "res2.") and not _has(ks, "head.")),
     "an ImageNet backbone checkpoint (classifier or bare ResNet keys); use it as "
     "model.backbone.weights instead"),
]


def _has(keys: Iterable[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def describe_layout(state: Mapping[str, object]) -> str:
    """A short guess of what kind of checkpoint ``state`` is, for error messages."""
    keys = list(state)
    for test, description in _LAYOUT_SIGNS:
        if test(keys):
            return description
    sample = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
    return f"an unrecognised layout ({len(keys)} keys: {sample})"
