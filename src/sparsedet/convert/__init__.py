"""Official checkpoint converters.

``convert_checkpoint("sparse_rcnn", "r50_100pro_3x_model.pth", "converted.pth")`` maps every
tensor of an official checkpoint onto sparsedet's names, infers the architecture from the shapes,
checks the result against a model built with that architecture, and optionally writes the bare
converted state_dict. New architectures register a ``(state_dict, source) -> ConversionResult``
function in ``CONVERTERS``.
"""
from __future__ import annotations

import os
from typing import Callable, Mapping, Optional, Union

from ..checkpoint import extract_state_dict, read_weights_file, save_atomic
from . import asag, querydet, sparse_rcnn, tsp_rcnn
from .tsp_fcos import convert_tsp_fcos, is_tsp_fcos
from .common import ConversionResult
from .sparse_rcnn import infer_overrides, looks_official

CONVERTERS: "dict[str, Callable[[Mapping, str], ConversionResult]]" = {
    "sparse_rcnn": sparse_rcnn.convert_state_dict,
    "querydet": querydet.convert_querydet,
    "retinanet": querydet.convert_retinanet,
    "tsp_fcos": convert_tsp_fcos,
    "tsp_rcnn": tsp_rcnn.convert_tsp_rcnn,
    "asag": asag.convert_state_dict,
}


def convert_checkpoint(arch: str, src: Union[str, os.PathLike, Mapping],
                       dst: Optional[Union[str, os.PathLike]] = None, **options) -> ConversionResult:
    """Converts an official checkpoint to sparsedet layout.

    Args:
        arch: converter name, one of ``CONVERTERS`` (``sparse_rcnn``, ``querydet``, ``retinanet``,
            ``tsp_fcos``, ``tsp_rcnn``, ``asag``).
        src: a ``.pth`` (bare state_dict or ``{"model": state_dict, ...}``) or detectron2 ``.pkl``
            (numpy arrays) file, or an already-loaded dict of the same.
        dst: if given, the bare converted state_dict is written there atomically; it loads with
            ``build_model("sparse_rcnn/r50_fpn_100pro_3x", result.config_overrides)
            .load_state_dict(torch.load(dst, weights_only=True))``.

    Returns:
        ``ConversionResult(state_dict, config_overrides, report)``.

    Raises:
        ValueError: unknown ``arch``; a file of another architecture (or already converted); keys
            that do not map, are missing, or have other shapes than the inferred model's.
        FileNotFoundError: ``src`` does not exist.
    """
    if arch not in CONVERTERS:
        raise ValueError(f"unknown architecture {arch!r} for checkpoint conversion; known: {', '.join(sorted(CONVERTERS))}")
    if isinstance(src, Mapping):
        source = "<in-memory state_dict>"
        state = extract_state_dict(src, source)
    else:
        source = str(src)
        state = extract_state_dict(read_weights_file(src), source)
    result = CONVERTERS[arch](state, source, **options)
    if dst is not None:
        save_atomic(result.state_dict, dst)
        result.report += f"\n  written to {dst}"
    return result


def official_architecture(state: Mapping[str, object]) -> Optional[str]:
    """The converter name for an official (detectron2-layout) state_dict, or None when ``state``
    is not in an official layout (e.g. already sparsedet's)."""
    if asag.looks_like_asag(state):
        return "asag"
    if not looks_official(state):
        return None
    if is_tsp_fcos(state):
        return "tsp_fcos"
    if any(k.startswith("proposal_generator.rpn_head.obj_bn_list.") for k in state):
        return "tsp_rcnn"
    if any(k.startswith(("det_head.", "query_head.")) for k in state):
        return "querydet"
    if any(k.startswith("head.cls_subnet.") for k in state):
        return "retinanet"
    return "sparse_rcnn"


__all__ = ["CONVERTERS", "official_architecture", "ConversionResult", "convert_checkpoint", "infer_overrides", "looks_official"]
