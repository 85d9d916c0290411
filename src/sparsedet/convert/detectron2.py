"""Key mapping shared by converters of detectron2-layout checkpoints: ResNet backbone, FPN and top block.

detectron2 names (``backbone.bottom_up.*``, ``backbone.fpn_lateral{k}``, ``backbone.fpn_output{k}``,
``backbone.top_block.p6|p7.*``) <-> sparsedet names (``backbone.body.*`` with torchvision ResNet names,
``backbone.fpn.inner_blocks|layer_blocks.{k - first_stage}.0.*``, ``backbone.fpn.extra_blocks.*``).
``first_fpn_stage`` is the lowest pyramid level k the FPN has (2 for P2-P5, 3 for P3-P7).
"""
from __future__ import annotations

import re
from typing import Optional

from ..models.backbones.build import detectron2_resnet_key

BACKBONE_PREFIX = "backbone.bottom_up."

# sparsedet ResNet names -> detectron2 names; only used to name missing keys in error messages.
_TO_D2_RESNET = [
    (r"^conv1\.", "stem.conv1."),
    (r"^bn1\.", "stem.conv1.norm."),
    (r"^layer(\d)\.(\d+)\.downsample\.0\.", lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut."),
    (r"^layer(\d)\.(\d+)\.downsample\.1\.", lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut.norm."),
    (r"^layer(\d)\.(\d+)\.conv(\d)\.", lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}."),
    (r"^layer(\d)\.(\d+)\.bn(\d)\.", lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm."),
]

_FPN = re.compile(r"^backbone\.fpn_(lateral|output)(\d)\.(weight|bias)$")
_OUR_FPN = re.compile(r"^backbone\.fpn\.(inner|layer)_blocks\.(\d+)\.0\.(weight|bias)$")
_TOP = re.compile(r"^backbone\.top_block\.(p6|p7)\.(conv|bn)\.(.+)$")
_OUR_TOP = re.compile(r"^backbone\.fpn\.extra_blocks\.(.+)$")


def backbone_to_sparsedet_key(key: str, first_fpn_stage: int) -> Optional[str]:
    """Our name for a detectron2 backbone/FPN/top-block key; None when ``key`` is none of those
    (or names a ResNet part or FPN level we do not have)."""
    if key.startswith(BACKBONE_PREFIX):
        rest = key[len(BACKBONE_PREFIX):]
        new = detectron2_resnet_key(rest)
        return None if new == rest else "backbone.body." + new
    match = _FPN.match(key)
    if match:
        kind = "inner_blocks" if match[1] == "lateral" else "layer_blocks"
        index = int(match[2]) - first_fpn_stage
        return None if index < 0 else f"backbone.fpn.{kind}.{index}.0.{match[3]}"
    match = _TOP.match(key)
    if match:
        return f"backbone.fpn.extra_blocks.{match[1]}.{match[2]}.{match[3]}"
    return None


def backbone_to_official_key(key: str, first_fpn_stage: int) -> Optional[str]:
    """Inverse of ``backbone_to_sparsedet_key``; None when ``key`` is not a backbone/FPN/top-block key.
    A ``backbone.body.*`` key no rule covers comes back unchanged."""
    if key.startswith("backbone.body."):
        rest = key[len("backbone.body."):]
        for pattern, repl in _TO_D2_RESNET:
            new, count = re.subn(pattern, repl, rest)
            if count:
                return BACKBONE_PREFIX + new
        return key
    match = _OUR_FPN.match(key)
    if match:
        kind = "lateral" if match[1] == "inner" else "output"
        return f"backbone.fpn_{kind}{int(match[2]) + first_fpn_stage}.{match[3]}"
    match = _OUR_TOP.match(key)
    if match:
        return f"backbone.top_block.{match[1]}"
    return None
