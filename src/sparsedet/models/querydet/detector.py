"""QueryDet (Yang et al., CVPR 2022): RetinaNet on P2..P7 with re-balanced level losses and a query
head that predicts where the small objects are (spec §2), so that inference can run the
high-resolution levels sparsely (Cascade Sparse Query, spec §3, ``sparsedet.models.csq``)."""
from __future__ import annotations

from typing import Mapping, Sequence

from torch import Tensor

from ...layers.conv_tower import ConvTower
from ..csq import anchor_level_outputs, cascade_sparse_query
from ..dense.detector import DenseDetector
from ..dense.head import init_query_tower
from ..dense.losses import query_loss
from ..dense.postprocess import LevelOutputs
from .config import QueryDetConfig, check_querydet_config
from .query_targets import query_targets


class QueryDet(DenseDetector):
    """QueryDet detector.

    Training (always dense): ``{"loss_cls", "loss_box_reg", "loss_query"}`` (``loss_query`` only
    when ``model.query.levels`` is non-empty). Inference: dense on every level (spec §2.4), or
    with ``model.csq.enabled`` the query cascade from ``model.csq.start_level`` down
    (``_csq_inference``). Same call contract as ``DenseDetector``.

    Attributes (besides ``DenseDetector``'s):
        query_levels: levels the query head runs on in training, e.g. (3, 4).
        query_head: ``ConvTower`` with one 1-channel predictor, shared by the query levels (None
            when there are no query levels).
    """

    def __init__(self, cfg: QueryDetConfig):
        check_querydet_config(cfg)
        super().__init__(cfg)
        self.query_levels = tuple(int(lvl) for lvl in cfg.query.levels)
        self.query_head = None
        if self.query_levels:
            # A third tower beside the class and box towers (not a branch of either), spec §2.1.
            self.query_head = ConvTower(self.backbone.out_channels, cfg.query.num_convs, (1,))
            init_query_tower(self.query_head)
        self.last_csq = None  # CSQOutput of the last CSQ inference (sparsedet.models.csq)

    def compute_losses(self, features: Mapping[str, Tensor], targets: Sequence[dict],
                       image_sizes: Sequence[tuple[int, int]]) -> dict[str, Tensor]:
        losses = super().compute_losses(features, targets, image_sizes)
        if self.query_head is None:
            return losses
        q = self.cfg.query
        logits, level_targets = [], []
        for lvl, bound, scale in zip(self.query_levels, q.small_object_bounds, q.radius_scale):
            feature = features[f"p{lvl}"]
            logits.append(self.query_head(feature)[0])                         # (B, 1, H, W)
            boxes = [t["boxes"].to(feature.device) for t in targets]
            level_targets.append(query_targets(boxes, feature.shape[-2], feature.shape[-1], 2 ** lvl,
                                               float(bound), q.radius_mode, float(scale)))
        losses["loss_query"] = query_loss(logits, level_targets, q.loss_weight, q.focal_alpha, q.focal_gamma)
        return losses

    def inference_levels(self, features: Mapping[str, Tensor], image_sizes: Sequence[tuple[int, int]]) -> list[list[LevelOutputs]]:
        if self.cfg.csq.enabled:
            return self._csq_inference(features, image_sizes)
        return self.dense_levels(features)

    def _csq_inference(self, features: Mapping[str, Tensor], image_sizes: Sequence[tuple[int, int]]) -> list[list[LevelOutputs]]:
        """Cascade Sparse Query: per image, the levels to post-process (spec §3.5: sparse levels
        below ``cfg.csq.start_level`` with only their queried positions, then the dense levels
        from ``start_level`` up, as ``self.dense_levels(features, levels)`` gives them).

        Implemented by ``sparsedet.models.csq`` (the cascade driver); the run's ``CSQOutput``
        (queried positions, query maps, ``.stats()``) is kept in ``self.last_csq``.
        """
        # --- Cascade Sparse Query wiring (sparsedet.models.csq) ---
        csq = self.cfg.csq
        sparse = sorted((lvl for lvl in self.levels if lvl < csq.start_level), reverse=True)  # P3, P2
        output = cascade_sparse_query(
            {lvl: features[f"p{lvl}"] for lvl in [csq.start_level] + sparse},
            self.query_head, [self.head.cls_tower, self.head.box_tower], sparse,
            start_level=csq.start_level, threshold=csq.threshold, context=csq.context, method=csq.method)
        self.last_csq = output
        batch = features[f"p{csq.start_level}"].shape[0]
        sparse_levels = anchor_level_outputs(output, self.anchor_generator, self.num_classes, batch)
        dense = self.dense_levels(features, [lvl for lvl in self.levels if lvl >= csq.start_level])
        return [[LevelOutputs(*lv) for lv in s] + d for s, d in zip(sparse_levels, dense)]
