"""FCOS and QueryDet-FCOS (spec §5.1, paper table 8): an anchor-free dense detector whose fine levels can
be evaluated with Cascade Sparse Query (``sparsedet.models.csq``), exactly like QueryDet's RetinaNet."""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from ...layers.conv_tower import ConvTower
from ..backbones import build_backbone
from ..csq import cascade_sparse_query
from ..dense.head import init_query_tower
from ..dense.losses import query_loss
from ..preprocess import build_preprocessor, preprocess_inputs
from ..querydet.query_targets import query_targets
from .config import FCOSConfig, check_fcos_config, default_regression_ranges
from .head import FCOSHead
from .losses import fcos_losses
from .postprocess import FCOSLevelOutputs, fcos_postprocess_image
from .targets import fcos_targets, level_points, points_at


class FCOS(nn.Module):
    """FCOS detector; with P2 and a query head it is QueryDet-FCOS (same class, different config).

    Training (always dense): ``{"loss_cls", "loss_box_reg", "loss_centerness"}`` plus ``"loss_query"``
    when ``model.query.levels`` is non-empty. Inference: ``model(images, original_sizes=None)`` -> per
    image ``{"boxes" (N, 4) xyxy, "scores" (N,), "labels" (N,)}``; dense on every level, or with
    ``model.csq.enabled`` the query cascade below ``model.csq.start_level`` (``_csq_inference``).
    Images are RGB (3, H, W) 0-255; targets ``boxes`` (M, 4) xyxy pixels, ``labels`` (M,) in [0, K).

    Attributes:
        levels: detection levels, e.g. (2, 3, 4, 5, 6, 7); strides: 2^level.
        head: ``FCOSHead`` (``cls_tower``, ``box_tower`` with predictors (ltrb, centerness)).
        query_levels, query_head: as QueryDet (a separate ``ConvTower`` with one 1-channel predictor,
            shared by the query levels; None without query levels).
        regression_ranges: per level (low, high) in pixels.
        last_csq: the ``CSQOutput`` of the last CSQ inference (``.stats()``: queries, active sites).
    """

    def __init__(self, cfg: FCOSConfig):
        super().__init__()
        check_fcos_config(cfg)
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.levels = tuple(int(lvl) for lvl in cfg.fpn.out_levels)
        self.strides = tuple(2 ** lvl for lvl in self.levels)
        self.preprocess = build_preprocessor(cfg)
        self.backbone = build_backbone(cfg.backbone, cfg.fpn)
        self.head = FCOSHead(self.backbone.out_channels, cfg.num_classes, self.strides, cfg.head.num_convs,
                             cfg.head.prior_prob, cfg.head.box_activation, cfg.head.norm_groups)
        ranges = cfg.targets.regression_ranges or default_regression_ranges(self.levels)
        self.regression_ranges = tuple((float(lo), float(hi)) for lo, hi in ranges)
        self.level_loss_weights = tuple(float(w) for w in (cfg.loss.level_loss_weights or (1.0,) * len(self.levels)))
        self.query_levels = tuple(int(lvl) for lvl in cfg.query.levels)
        self.query_head = None
        if self.query_levels:
            # QueryDet's query head: its own tower beside the class and box towers (spec §2.1).
            self.query_head = ConvTower(self.backbone.out_channels, cfg.query.num_convs, (1,))
            init_query_tower(self.query_head)
        self.last_csq = None

    # ------------------------------------------------------------------ entry point

    def forward(self, images: Sequence[Tensor], targets: Optional[Sequence[dict]] = None,
                original_sizes: Optional[Sequence[tuple[int, int]]] = None):
        batch, image_sizes = preprocess_inputs(self, images, targets, original_sizes)
        features = self.backbone(batch)
        if self.training:
            return self.compute_losses(features, targets)
        per_image_levels = self._csq_inference(features) if self.cfg.csq.enabled else self.dense_levels(features)
        test = self.cfg.test
        return [fcos_postprocess_image(levels, test.topk_candidates, test.score_threshold, test.nms_threshold,
                                       test.max_detections, image_sizes[i],
                                       None if original_sizes is None else tuple(original_sizes[i]))
                for i, levels in enumerate(per_image_levels)]

    # ------------------------------------------------------------------ training

    def level_points(self, features: Sequence[Tensor]) -> list[Tensor]:
        """Per level, the (H_l * W_l, 2) points of that level's map."""
        return [level_points(f.shape[-2], f.shape[-1], s, f.device) for f, s in zip(features, self.strides)]

    def compute_losses(self, features: Mapping[str, Tensor], targets: Sequence[dict]) -> dict[str, Tensor]:
        level_features = [features[f"p{lvl}"] for lvl in self.levels]
        logits, ltrb, centerness = self.head(level_features)
        points = self.level_points(level_features)
        per_image = [fcos_targets(points, self.strides, self.regression_ranges, t["boxes"], t["labels"],
                                  self.num_classes, self.cfg.targets.center_sampling_radius) for t in targets]
        # Per level, the batch's rows image-major, matching (B, R_l, .) predictions flattened.
        gt_classes = [torch.cat([img[0][i] for img in per_image]) for i in range(len(self.levels))]
        gt_ltrb = [torch.cat([img[1][i] for img in per_image]) for i in range(len(self.levels))]
        loss = self.cfg.loss
        losses = fcos_losses([x.reshape(-1, self.num_classes) for x in logits], [x.reshape(-1, 4) for x in ltrb],
                             [x.reshape(-1) for x in centerness], gt_classes, gt_ltrb, self.level_loss_weights,
                             loss.focal_alpha, loss.focal_gamma, loss.box_loss)
        if self.query_head is not None:
            losses["loss_query"] = self._query_loss(features, targets)
        return losses

    def _query_loss(self, features: Mapping[str, Tensor], targets: Sequence[dict]) -> Tensor:
        """QueryDet's query loss on the query levels (spec §2.2-2.3): the same targets and focal loss."""
        q = self.cfg.query
        logits, level_targets = [], []
        for lvl, bound, scale in zip(self.query_levels, q.small_object_bounds, q.radius_scale):
            feature = features[f"p{lvl}"]
            logits.append(self.query_head(feature)[0])
            level_targets.append(query_targets([t["boxes"].to(feature.device) for t in targets], feature.shape[-2],
                                               feature.shape[-1], 2 ** lvl, float(bound), q.radius_mode, float(scale)))
        return query_loss(logits, level_targets, q.loss_weight, q.focal_alpha, q.focal_gamma)

    # ------------------------------------------------------------------ inference

    def dense_levels(self, features: Mapping[str, Tensor], levels: Optional[Sequence[int]] = None) -> list[list[FCOSLevelOutputs]]:
        """Runs the head densely on ``levels`` (default all); per image, one ``FCOSLevelOutputs`` per level."""
        levels = self.levels if levels is None else tuple(levels)
        index = [self.levels.index(lvl) for lvl in levels]
        level_features = [features[f"p{lvl}"] for lvl in levels]
        out = []
        for i, f in zip(index, level_features):
            (cls,) = self.head.cls_tower(f)
            box, ctr = self.head.box_tower(f)
            points = level_points(f.shape[-2], f.shape[-1], self.strides[i], f.device)
            out.append((cls.flatten(2).transpose(1, 2), self.head.box_distances(box.flatten(2).transpose(1, 2), i),
                        ctr.flatten(1), points))
        num_images = level_features[0].shape[0]
        return [[FCOSLevelOutputs(cls[b], d[b], c[b], p) for cls, d, c, p in out] for b in range(num_images)]

    def _csq_inference(self, features: Mapping[str, Tensor]) -> list[list[FCOSLevelOutputs]]:
        """Cascade Sparse Query: per image, [sparse levels below ``start_level`` (queried children only,
        coarse to fine)] + [dense levels from ``start_level`` up] (spec §3.5).

        The generic driver evaluates the class tower and the box tower (both predictors) at the children;
        their raw box outputs go through the same ``box_distances`` as the dense path and are decoded at
        the children's points."""
        csq = self.cfg.csq
        sparse = sorted((lvl for lvl in self.levels if lvl < csq.start_level), reverse=True)
        output = cascade_sparse_query({lvl: features[f"p{lvl}"] for lvl in [csq.start_level] + sparse},
                                      self.query_head, [self.head.cls_tower, self.head.box_tower], sparse,
                                      **csq.driver_kwargs())
        self.last_csq = output
        batch = features[f"p{csq.start_level}"].shape[0]
        per_image: list[list[FCOSLevelOutputs]] = [[] for _ in range(batch)]
        for lv in output.levels:
            i = self.levels.index(lv.level)
            (cls,), (box, ctr) = lv.values
            ltrb = self.head.box_distances(box, i)
            points = points_at(lv.positions[:, 1], lv.positions[:, 2], self.strides[i])
            for b in range(batch):
                rows = (lv.positions[:, 0] == b).nonzero().squeeze(1)
                if rows.numel():
                    per_image[b].append(FCOSLevelOutputs(cls[rows], ltrb[rows], ctr[rows, 0], points[rows]))
        dense = self.dense_levels(features, [lvl for lvl in self.levels if lvl >= csq.start_level])
        return [s + d for s, d in zip(per_image, dense)]
