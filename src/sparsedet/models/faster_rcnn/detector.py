"""Faster R-CNN with FPN whose RPN carries a query branch, so that the RPN's high-resolution levels can
be evaluated with Cascade Sparse Query at test time (spec §5.2, paper table 9). The second stage is
torchvision's ``RoIHeads`` (``MultiScaleRoIAlign`` + ``TwoMLPHead`` + ``FastRCNNPredictor``), unchanged but for
the non-finite guard in front of its pooler (``GuardedMultiScaleRoIAlign``)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads

from ...layers.anchors import AnchorGenerator
from ...layers.box_coder import BoxCoder
from ...layers.pooler import GuardedMultiScaleRoIAlign
from ..backbones import build_backbone
from ..csq import cascade_sparse_query
from ..dense.iou_matcher import IoUMatcher
from ..dense.losses import query_loss
from ..preprocess import build_preprocessor, preprocess_inputs, rescale_boxes
from ..querydet.query_targets import query_targets
from .config import FasterRCNNConfig, check_faster_rcnn_config
from .proposals import RPNLevelOutputs, select_proposals
from .rpn import label_rpn_anchors, rpn_losses
from .rpn_head import RPNHead


class FasterRCNN(nn.Module):
    """Faster R-CNN (FPN) with a query branch in the RPN.

    Training: ``{"loss_rpn_cls", "loss_rpn_loc", "loss_query" (with query levels), "loss_cls",
    "loss_box_reg"}`` (weighted; the last two are torchvision's ``fastrcnn_loss``). Inference:
    ``model(images, original_sizes=None)`` -> per image ``{"boxes" (N, 4), "scores" (N,), "labels" (N,)}``
    with labels in [0, K). With ``model.csq.enabled`` the RPN runs densely from ``csq.start_level`` up
    and sparsely (query cascade) below it; the proposals of both go to the unchanged RoI heads.

    Attributes:
        levels: RPN levels (= ``fpn.out_levels``); anchor_generator, rpn_head (``RPNHead``), roi_heads.
        last_stats: after each inference, ``{"num_proposals": [per image], "proposals_per_level":
            [per image {level: count}], "csq": CSQOutput.stats() or None}`` — how many proposals reached
            the second stage and from which level (the paper notes CSQ also reduces the RoIs).
        last_csq: the ``CSQOutput`` of the last CSQ inference.
    """

    def __init__(self, cfg: FasterRCNNConfig):
        super().__init__()
        check_faster_rcnn_config(cfg)
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.levels = tuple(int(lvl) for lvl in cfg.fpn.out_levels)
        self.preprocess = build_preprocessor(cfg)
        self.backbone = build_backbone(cfg.backbone, cfg.fpn)
        rpn = cfg.rpn
        self.anchor_generator = AnchorGenerator(self.levels, [(float(s),) for s in rpn.anchor_sizes],
                                                rpn.aspect_ratios, rpn.anchor_offset)
        self.query_levels = tuple(int(lvl) for lvl in cfg.query.levels)
        self.rpn_head = RPNHead(self.backbone.out_channels, self.anchor_generator.num_anchors, rpn.num_convs,
                                with_query=bool(self.query_levels), predictor_kernel_size=rpn.predictor_kernel_size)
        self.rpn_box_coder = BoxCoder(rpn.box_weights, rpn.box_scale_clamp)
        self.rpn_matcher = IoUMatcher(rpn.iou_thresholds, allow_low_quality_matches=True)
        self.rpn_sampler = BalancedPositiveNegativeSampler(rpn.batch_size_per_image, rpn.positive_fraction)
        roi = cfg.roi_heads
        channels = self.backbone.out_channels
        self.roi_heads = RoIHeads(
            box_roi_pool=GuardedMultiScaleRoIAlign([f"p{lvl}" for lvl in roi.in_levels], roi.pooler_resolution,
                                            roi.sampling_ratio),
            box_head=TwoMLPHead(channels * roi.pooler_resolution ** 2, roi.representation_size),
            box_predictor=FastRCNNPredictor(roi.representation_size, cfg.num_classes + 1),
            fg_iou_thresh=roi.iou_threshold, bg_iou_thresh=roi.iou_threshold,
            batch_size_per_image=roi.batch_size_per_image, positive_fraction=roi.positive_fraction,
            bbox_reg_weights=tuple(roi.box_weights), score_thresh=roi.score_threshold,
            nms_thresh=roi.nms_threshold, detections_per_img=roi.max_detections)
        self.last_stats: Optional[dict] = None
        self.last_csq = None

    # ------------------------------------------------------------------ entry point

    def forward(self, images: Sequence[Tensor], targets: Optional[Sequence[dict]] = None,
                original_sizes: Optional[Sequence[tuple[int, int]]] = None):
        batch, image_sizes = preprocess_inputs(self, images, targets, original_sizes)
        features = self.backbone(batch)
        if self.training:
            return self.compute_losses(features, targets, image_sizes)
        per_image_levels = self._csq_rpn_levels(features) if self.cfg.csq.enabled else self.dense_rpn_levels(features)
        proposals = self.proposals(per_image_levels, image_sizes)
        detections, _ = self.roi_heads(self._roi_features(features), [p[0] for p in proposals], list(image_sizes))
        self.last_stats = {
            "num_proposals": [int(p[0].shape[0]) for p in proposals],
            "proposals_per_level": [{lvl: int((p[2] == lvl).sum()) for lvl in self.levels} for p in proposals],
            "csq": self.last_csq.stats() if self.cfg.csq.enabled and self.last_csq is not None else None,
        }
        out = []
        for i, det in enumerate(detections):
            boxes = rescale_boxes(det["boxes"], tuple(image_sizes[i]),
                                  None if original_sizes is None else tuple(original_sizes[i]))
            nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            # torchvision's class 0 is background: our labels are 0-based foreground classes.
            out.append({"boxes": boxes[nonempty], "scores": det["scores"][nonempty], "labels": det["labels"][nonempty] - 1})
        return out

    def _roi_features(self, features: Mapping[str, Tensor]) -> "OrderedDict[str, Tensor]":
        return OrderedDict((f"p{lvl}", features[f"p{lvl}"]) for lvl in self.cfg.roi_heads.in_levels)

    # ------------------------------------------------------------------ training

    def compute_losses(self, features: Mapping[str, Tensor], targets: Sequence[dict],
                       image_sizes: Sequence[tuple[int, int]]) -> dict[str, Tensor]:
        level_features = [features[f"p{lvl}"] for lvl in self.levels]
        objectness, deltas, query = self.rpn_head(level_features)
        anchors = [self.anchor_generator.grid_anchors(lvl, *f.shape[-2:]) for lvl, f in zip(self.levels, level_features)]
        labels, gt_deltas = label_rpn_anchors(torch.cat(anchors), targets, self.rpn_matcher, self.rpn_sampler,
                                              self.rpn_box_coder)
        rpn = self.cfg.rpn
        raw = rpn_losses(torch.cat(objectness, dim=1), torch.cat(deltas, dim=1), labels, gt_deltas,
                         rpn.batch_size_per_image, rpn.smooth_l1_beta)
        losses = {"loss_rpn_cls": raw["loss_rpn_cls"] * rpn.cls_loss_weight,
                  "loss_rpn_loc": raw["loss_rpn_loc"] * rpn.box_loss_weight}
        if self.query_levels:
            q = self.cfg.query
            logits, level_targets = [], []
            for lvl, bound, scale in zip(self.query_levels, q.small_object_bounds, q.radius_scale):
                logit = query[self.levels.index(lvl)]                                  # (B, H, W)
                logits.append(logit)
                level_targets.append(query_targets([t["boxes"].to(logit.device) for t in targets], logit.shape[-2],
                                                   logit.shape[-1], 2 ** lvl, float(bound), q.radius_mode, float(scale)))
            losses["loss_query"] = query_loss(logits, level_targets, q.loss_weight, q.focal_alpha, q.focal_gamma)
        # Proposals carry no gradient to the RPN (as detectron2 / torchvision).
        with torch.no_grad():
            per_image = self._per_image_levels([o.detach() for o in objectness], [d.detach() for d in deltas],
                                               anchors, self.levels)
            proposals = [p[0] for p in self.proposals(per_image, image_sizes)]
        roi_targets = [{"boxes": t["boxes"].to(torch.float32), "labels": t["labels"].to(torch.int64) + 1} for t in targets]
        _, roi_losses = self.roi_heads(self._roi_features(features), proposals, list(image_sizes), roi_targets)
        losses["loss_cls"] = roi_losses["loss_classifier"]
        losses["loss_box_reg"] = roi_losses["loss_box_reg"]
        return losses

    # ------------------------------------------------------------------ proposals

    @staticmethod
    def _per_image_levels(objectness, deltas, anchors, levels) -> list[list[RPNLevelOutputs]]:
        num_images = objectness[0].shape[0]
        return [[RPNLevelOutputs(o[b], d[b], a, lvl) for o, d, a, lvl in zip(objectness, deltas, anchors, levels)]
                for b in range(num_images)]

    def dense_rpn_levels(self, features: Mapping[str, Tensor], levels: Optional[Sequence[int]] = None) -> list[list[RPNLevelOutputs]]:
        """Runs the RPN densely on ``levels`` (default all); per image, one ``RPNLevelOutputs`` per level."""
        levels = self.levels if levels is None else tuple(levels)
        level_features = [features[f"p{lvl}"] for lvl in levels]
        objectness, deltas, _ = self.rpn_head(level_features)
        anchors = [self.anchor_generator.grid_anchors(lvl, *f.shape[-2:]) for lvl, f in zip(levels, level_features)]
        return self._per_image_levels(objectness, deltas, anchors, levels)

    def proposals(self, per_image_levels: Sequence[Sequence[RPNLevelOutputs]],
                  image_sizes: Sequence[tuple[int, int]]) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per image ``select_proposals``: (boxes (P, 4), objectness (P,), level (P,))."""
        rpn = self.cfg.rpn
        pre = rpn.pre_nms_topk_train if self.training else rpn.pre_nms_topk_test
        post = rpn.post_nms_topk_train if self.training else rpn.post_nms_topk_test
        return [select_proposals(levels, self.rpn_box_coder, image_sizes[i], pre, post, rpn.nms_threshold,
                                 rpn.min_box_size) for i, levels in enumerate(per_image_levels)]

    def _csq_rpn_levels(self, features: Mapping[str, Tensor]) -> list[list[RPNLevelOutputs]]:
        """Cascade Sparse Query in the RPN: per image, [sparse levels below ``csq.start_level``, coarse to
        fine, with the anchors of the queried children only] + [dense levels from ``start_level`` up].

        The dense pass over ``start_level`` .. top already yields the start level's query logits, which
        are handed to the driver (no second query pass there). The driver gets the RPN through two
        ``TowerView``s of the shared trunk: the query predictor and the (objectness, deltas) pair.
        """
        csq = self.cfg.csq
        dense_levels = [lvl for lvl in self.levels if lvl >= csq.start_level]
        sparse = sorted((lvl for lvl in self.levels if lvl < csq.start_level), reverse=True)
        level_features = [features[f"p{lvl}"] for lvl in dense_levels]
        objectness, deltas, query = self.rpn_head(level_features)
        anchors = [self.anchor_generator.grid_anchors(lvl, *f.shape[-2:]) for lvl, f in zip(dense_levels, level_features)]
        dense = self._per_image_levels(objectness, deltas, anchors, dense_levels)
        output = cascade_sparse_query({lvl: features[f"p{lvl}"] for lvl in [csq.start_level] + sparse},
                                      self.rpn_head.query_view, [self.rpn_head.value_view], sparse,
                                      start_query_logits=query[dense_levels.index(csq.start_level)],
                                      **csq.driver_kwargs())
        self.last_csq = output
        batch = level_features[0].shape[0]
        sparse_per_image: list[list[RPNLevelOutputs]] = [[] for _ in range(batch)]
        for lv in output.levels:
            obj, dl = lv.values[0]                                   # (n, A), (n, 4A)
            # Channel a (objectness) and a * 4 + d (deltas): rows child-major, anchor-minor, the order
            # of anchors_at.
            obj, dl = obj.reshape(-1), dl.reshape(-1, 4)
            anc = self.anchor_generator.anchors_at(lv.level, lv.positions[:, 1], lv.positions[:, 2])
            image_of_row = lv.positions[:, 0].repeat_interleave(self.anchor_generator.num_anchors)
            for b in range(batch):
                rows = (image_of_row == b).nonzero().squeeze(1)
                if rows.numel():
                    sparse_per_image[b].append(RPNLevelOutputs(obj[rows], dl[rows], anc[rows], lv.level))
        return [s + d for s, d in zip(sparse_per_image, dense)]
