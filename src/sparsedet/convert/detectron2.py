"""Key mapping shared by converters of detectron2-layout checkpoints: ResNet backbone, FPN and top block.

detectron2 names (``backbone.bottom_up.*``, ``backbone.fpn_lateral{k}``, ``backbone.fpn_output{k}``,
``backbone.top_block.p6|p7.*``) <-> sparsedet names (``backbone.body.*`` with torchvision ResNet names,
``backbone.fpn.inner_blocks|layer_blocks.{k - first_stage}.0.*``, ``backbone.fpn.extra_blocks.*``).
``first_fpn_stage`` is the lowest pyramid level k the FPN has (2 for P2-P5, 3 for P3-P7).
"""
from __future__ import annotations

import re
from typing import Mapping, Optional

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

# ResNet (bottleneck?, blocks in res2..res5) -> depth
RESNET_DEPTHS = {
    (False, (2, 2, 2, 2)): 18, (False, (3, 4, 6, 3)): 34,
    (True, (3, 4, 6, 3)): 50, (True, (3, 4, 23, 3)): 101, (True, (3, 8, 36, 3)): 152,
}

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


def resnet_blocks(mapped: Mapping) -> tuple[bool, tuple[int, ...]]:
    """(bottleneck?, blocks in res2..res5) of the ``backbone.body.*`` keys of a converted state_dict."""
    blocks = tuple(len({int(m[1]) for k in mapped if (m := re.match(rf"backbone\.body\.layer{i}\.(\d+)\.", k))})
                   for i in range(1, 5))
    return "backbone.body.layer1.0.conv3.weight" in mapped, blocks


def infer_bottleneck_resnet_depth(mapped: Mapping) -> int:
    """50/101/152 from the converted ``backbone.body.*`` keys; ``ValueError`` for anything else."""
    bottleneck, blocks = resnet_blocks(mapped)
    depth = RESNET_DEPTHS.get((bottleneck, blocks))
    if depth is None or not bottleneck:
        raise ValueError(f"cannot infer a bottleneck ResNet depth (50/101/152, MSRA layout) from {blocks} "
                         f"{'bottleneck' if bottleneck else 'basic'} blocks in res2..res5; is a block missing?")
    return depth
