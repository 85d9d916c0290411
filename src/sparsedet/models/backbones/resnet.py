"""ResNet-18/50/101 bodies returning C2..C5, with FrozenBN and ``freeze_at``.

Two layouts of the same network:
* ``torchvision`` ("stride in 3x3", ResNet v1.5): the stride-2 of each stage's first bottleneck is
  in its 3x3 conv. RGB input, ImageNet mean/std in 0-255 units.
* ``caffe`` ("stride in 1x1", MSRA): the stride-2 is in the first 1x1 conv. BGR input, mean only
  (std 1). Used by detectron2's ``R-50.pkl`` MSRA weights (QueryDet, RetinaNet).
"""
from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn
from torchvision.models import resnet

from ...layers.frozen_batch_norm import FrozenBatchNorm2d

RESNET_BUILDERS = {18: resnet.resnet18, 34: resnet.resnet34, 50: resnet.resnet50,
                   101: resnet.resnet101, 152: resnet.resnet152}


class FrozenStatsBatchNorm2d(FrozenBatchNorm2d):
    """FrozenBatchNorm2d whose running statistics stay fixed but whose affine ``weight`` and
    ``bias`` are trainable parameters (the norm layer of DETR-family code such as ASAG's; the same
    state_dict keys as ``FrozenBatchNorm2d``)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__(num_features, eps)
        weight, bias = self.weight, self.bias
        del self.weight, self.bias          # buffers -> parameters
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)


class ResNetBody(nn.Module):
    """ResNet without its classifier. ``forward`` returns ``{"c2": ..., "c5": ...}`` (strides 4..32).

    Parameter names are torchvision's (``conv1``, ``bn1``, ``layer1`` .. ``layer4``), so torchvision
    ImageNet checkpoints load directly.
    """

    def __init__(self, depth: int = 50, layout: str = "torchvision", frozen_bn: bool = True,
                 freeze_at: int = 2, trainable_bn_affine: bool = False):
        super().__init__()
        if depth not in RESNET_BUILDERS:
            raise ValueError(f"backbone.depth must be one of {sorted(RESNET_BUILDERS)}, got {depth}")
        if layout not in ("torchvision", "caffe"):
            raise ValueError(f"backbone.layout must be 'torchvision' or 'caffe', got {layout!r}")
        norm_layer = ((FrozenStatsBatchNorm2d if trainable_bn_affine else FrozenBatchNorm2d)
                      if frozen_bn else nn.BatchNorm2d)
        net = RESNET_BUILDERS[depth](weights=None, norm_layer=norm_layer)
        if layout == "caffe":
            _move_stride_to_1x1(net)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        block = self.layer4[-1]
        last = block.conv3 if hasattr(block, "conv3") else block.conv2
        width = last.out_channels
        self.out_channels = {"c2": width // 8, "c3": width // 4, "c4": width // 2, "c5": width}
        self.freeze(freeze_at)

    def freeze(self, freeze_at: int) -> None:
        """Stops gradients to the stem (``freeze_at >= 1``) and to res2..res{freeze_at}."""
        stages = [nn.ModuleList([self.conv1, self.bn1]), self.layer1, self.layer2, self.layer3, self.layer4]
        if not 0 <= freeze_at <= len(stages):
            raise ValueError(f"backbone.freeze_at must be in 0..5, got {freeze_at}")
        for stage in stages[:freeze_at]:
            for p in stage.parameters():
                p.requires_grad_(False)

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = OrderedDict()
        for name, layer in zip(("c2", "c3", "c4", "c5"), (self.layer1, self.layer2, self.layer3, self.layer4)):
            x = layer(x)
            out[name] = x
        return out


def _move_stride_to_1x1(net: resnet.ResNet) -> None:
    for layer in (net.layer2, net.layer3, net.layer4):
        first = layer[0]
        if not isinstance(first, resnet.Bottleneck):
            raise ValueError("backbone.layout 'caffe' needs a bottleneck ResNet (depth 50, 101 or 152)")
        first.conv1.stride, first.conv2.stride = first.conv2.stride, (1, 1)
