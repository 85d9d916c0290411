"""``DenseDetector``: the anchor-based one-stage detector that RetinaNet and QueryDet share.

Pipeline: pre-process -> backbone + FPN -> shared class / box towers on every detection level ->
(training) IoU matching of all levels' anchors jointly, focal + smooth-L1 losses; (inference)
per-level top-k and decode, then one score threshold and one class-aware NMS per image.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import box_iou

from ...layers.anchors import AnchorGenerator, octave_sizes
from ...layers.box_coder import BoxCoder
from ..backbones import build_backbone
from ..preprocess import build_preprocessor, preprocess_inputs
from .config import check_dense_config
from .head import RetinaNetHead
from .iou_matcher import BACKGROUND, IGNORE, IoUMatcher
from .losses import ForegroundNormalizer, dense_detection_losses
from .postprocess import LevelOutputs, postprocess_image


class DenseDetector(nn.Module):
    """Anchor-based dense detector (RetinaNet architecture) on the levels ``cfg.fpn.out_levels``.

    ``model(images, targets)`` in training mode returns ``{"loss_cls", "loss_box_reg"}`` (weighted,
    summed by the trainer). ``model(images)`` in eval mode returns per image ``{"boxes" (K, 4)
    xyxy, "scores" (K,), "labels" (K,)}`` in the input tensor's pixels, or in ``original_sizes``.

    Images are RGB ``(3, H, W)`` tensors in 0-255; targets hold ``boxes`` (M, 4) xyxy pixels and
    ``labels`` (M,) in ``[0, num_classes)``, or ``num_classes`` for a box trained as background.

    Attributes used by subclasses and by Cascade Sparse Query:
        levels: detection levels, e.g. (3, 4, 5, 6, 7).
        head: ``RetinaNetHead`` (``head.cls_tower`` / ``head.box_tower`` are ``ConvTower``s).
        anchor_generator: ``AnchorGenerator`` (``grid_anchors(level, H, W)``,
            ``anchors_at(level, ys, xs)``).
        box_coder: ``BoxCoder`` used to encode targets and decode predictions.
    """

    # A target label equal to num_classes is a box trained as background (VisDrone "others" in the
    # official QueryDet/RetinaNet code): anchors matched to it get an all-zero class target and no
    # box loss, and the QueryDet query targets still count it.
    accepts_background_boxes = True

    def __init__(self, cfg):
        super().__init__()
        check_dense_config(cfg)
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.levels = tuple(int(lvl) for lvl in cfg.fpn.out_levels)
        self.preprocess = build_preprocessor(cfg)
        self.backbone = build_backbone(cfg.backbone, cfg.fpn)
        anchors = cfg.anchors
        self.anchor_generator = AnchorGenerator(
            self.levels, [octave_sizes(size, anchors.scales_per_octave) for size in anchors.sizes],
            anchors.aspect_ratios, anchors.offset)
        self.num_anchors = self.anchor_generator.num_anchors
        self.head = RetinaNetHead(self.backbone.out_channels, self.num_anchors, cfg.num_classes,
                                  cfg.head.num_convs, cfg.head.prior_prob)
        self.box_coder = BoxCoder(cfg.box_weights, cfg.box_scale_clamp)
        self.matcher = IoUMatcher(cfg.matcher.thresholds, cfg.matcher.allow_low_quality_matches)
        self.loss_normalizer = ForegroundNormalizer(cfg.loss.normalizer_init, cfg.loss.normalizer_momentum)
        self.level_loss_weights = tuple(float(w) for w in (cfg.loss.level_loss_weights or (1.0,) * len(self.levels)))

    # ------------------------------------------------------------------ entry point

    def forward(self, images: Sequence[Tensor], targets: Optional[Sequence[dict]] = None,
                original_sizes: Optional[Sequence[tuple[int, int]]] = None):
        batch, image_sizes = preprocess_inputs(self, images, targets, original_sizes)
        features = self.backbone(batch)
        if self.training:
            return self.compute_losses(features, targets, image_sizes)
        per_image_levels = self.inference_levels(features, image_sizes)
        return self.postprocess(per_image_levels, image_sizes, original_sizes)

    # ------------------------------------------------------------------ training

    def compute_losses(self, features: Mapping[str, Tensor], targets: Sequence[dict],
                       image_sizes: Sequence[tuple[int, int]]) -> dict[str, Tensor]:
        """Detection losses over all levels (subclasses add theirs). ``features``: ``{"p3": ...}``."""
        level_features = [features[f"p{lvl}"] for lvl in self.levels]
        # (B, H, W, A, C) views of the conv outputs: the focal loss reads the class logits in place
        # (a P3 class map is the largest tensor of the step; no copy to rows, none in backward).
        logits, deltas = self.head(level_features, flatten=False)
        anchors = self.anchor_generator([tuple(f.shape[-2:]) for f in level_features])
        gt_classes, gt_deltas = self.label_anchors(torch.cat(anchors), targets)  # (B, R), (B, R, 4)
        num_foreground = ((gt_classes >= 0) & (gt_classes < self.num_classes)).sum()
        normalizer = self.loss_normalizer.update(num_foreground)
        sizes = [a.shape[0] for a in anchors]
        return dense_detection_losses(
            logits,
            [x.reshape(-1, 4) for x in deltas],
            [c.reshape(x.shape[:-1]) for c, x in zip(gt_classes.split(sizes, dim=1), logits)],
            [x.reshape(-1, 4) for x in gt_deltas.split(sizes, dim=1)],
            self.level_loss_weights, normalizer,
            self.cfg.loss.focal_alpha, self.cfg.loss.focal_gamma, self.cfg.loss.smooth_l1_beta)

    @torch.no_grad()
    def label_anchors(self, anchors: Tensor, targets: Sequence[dict]) -> tuple[Tensor, Tensor]:
        """Matches the anchors of all levels jointly against each image's GT boxes.

        Args:
            anchors: (R, 4) all levels' anchors, concatenated in level order.
            targets: per image ``{"boxes": (M, 4), "labels": (M,)}``.

        Returns:
            gt_classes: (B, R) int64: class for foreground, ``num_classes`` for background, -1 ignored.
            gt_deltas: (B, R, 4) box regression targets (zeros where there is no GT).
        """
        all_classes, all_deltas = [], []
        for target in targets:
            boxes = target["boxes"].to(device=anchors.device, dtype=torch.float32)
            labels = target["labels"].to(device=anchors.device, dtype=torch.int64)
            matches, match_labels = self.matcher(box_iou(boxes, anchors))
            if boxes.shape[0] == 0:
                classes = torch.full_like(matches, self.num_classes)
                deltas = torch.zeros_like(anchors)
            else:
                classes = labels[matches]              # a new tensor: safe to edit below
                deltas = self.box_coder.encode(anchors, boxes[matches])
            classes[match_labels == BACKGROUND] = self.num_classes
            classes[match_labels == IGNORE] = -1
            all_classes.append(classes)
            all_deltas.append(deltas)
        return torch.stack(all_classes), torch.stack(all_deltas)

    # ------------------------------------------------------------------ inference

    def dense_levels(self, features: Mapping[str, Tensor], levels: Optional[Sequence[int]] = None) -> list[list[LevelOutputs]]:
        """Runs the det head densely on ``levels`` (default: all) and returns, per image, one
        ``LevelOutputs(logits (H*W*A, K), deltas (H*W*A, 4), anchors (H*W*A, 4))`` per level."""
        levels = self.levels if levels is None else tuple(levels)
        level_features = [features[f"p{lvl}"] for lvl in levels]
        logits, deltas = self.head(level_features)
        # Cached grids: post-processing only reads (index_select) them.
        anchors = [self.anchor_generator.grid_anchors(lvl, *f.shape[-2:], cache=True)
                   for lvl, f in zip(levels, level_features)]
        num_images = level_features[0].shape[0]
        return [[LevelOutputs(lg[i], dl[i], an) for lg, dl, an in zip(logits, deltas, anchors)]
                for i in range(num_images)]

    def inference_levels(self, features: Mapping[str, Tensor], image_sizes: Sequence[tuple[int, int]]) -> list[list[LevelOutputs]]:
        """Per image, the list of levels to post-process. Dense here; QueryDet's CSQ overrides."""
        return self.dense_levels(features)

    @torch.no_grad()
    def postprocess(self, per_image_levels: Sequence[Sequence[LevelOutputs]], image_sizes: Sequence[tuple[int, int]],
                    original_sizes: Optional[Sequence[tuple[int, int]]] = None) -> list[dict]:
        test = self.cfg.test
        return [postprocess_image(levels, self.box_coder, test.topk_candidates, test.score_threshold,
                                  test.nms_threshold, test.max_detections, image_sizes[i],
                                  None if original_sizes is None else tuple(original_sizes[i]))
                for i, levels in enumerate(per_image_levels)]
