"""TSP-FCOS (tsp.md §2): an FCOS head picks features of interest, a pre-norm transformer encoder
refines them, and set-prediction heads classify and regress every FoI."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ...layers.transformer import TransformerEncoder
from ..backbones import build_backbone
from ..fcos.config import default_regression_ranges
from ..fcos.targets import centerness_targets, fcos_assignment, level_points
from ..preprocess import build_preprocessor, preprocess_inputs
from .fcos_config import TSPFCOSConfig, check_tsp_fcos_config
from .fcos_head import TSPFCOSHead
from .fcos_detr_loss import tsp_fcos_detr_losses
from .fcos_losses import foi_classifier_loss, tsp_fcos_losses
from .fcos_position import all_positions, level_padding_masks, location_encoding
from .fcos_postprocess import tsp_fcos_detections
from .foi_selection import foi_scores, random_keep, select_top_fois


class TSPFCOS(nn.Module):
    """TSP-FCOS detector.

    Training: ``model(images, targets)`` -> ``{"loss_fcos_local_cls", "loss_fcos_cls", "loss_fcos_loc",
    "loss_fcos_ctr"}``. Inference: ``model(images, original_sizes=None)`` -> per image ``{"boxes" (N, 4)
    xyxy, "scores" (N,), "labels" (N,)}``. Images are RGB (3, H, W) 0-255; targets ``boxes`` (M, 4) xyxy
    pixels, ``labels`` (M,) in [0, K).

    Module names follow the official checkpoints (``fcos_head``, ``transformer_encoder``,
    ``pyramid_position_embedding``, ``enc_proj``, ``post_enc_proj_norm``, ``cls_logits``, ``bbox_pred``,
    ``ctrness``, ``scales``), so ``sparsedet.convert`` maps them one-to-one.

    Attributes:
        levels: FPN levels, e.g. (3, 4, 5, 6, 7); strides 2^level.
        last_selection: after an inference call, per image ``{"points" (n, 2) xy input pixels,
            "levels" (n,), "scores" (n,) FoI scores}`` of the FoIs that entered the encoder (for
            ``--explain``), and ``"image_sizes"``.
    """

    def __init__(self, cfg: TSPFCOSConfig):
        super().__init__()
        check_tsp_fcos_config(cfg)
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.levels = tuple(int(lvl) for lvl in cfg.fpn.out_levels)
        self.strides = tuple(2 ** lvl for lvl in self.levels)
        ranges = cfg.targets.regression_ranges or default_regression_ranges(self.levels)
        self.regression_ranges = tuple((float(lo), float(hi)) for lo, hi in ranges)
        self.preprocess = build_preprocessor(cfg)
        self.backbone = build_backbone(cfg.backbone, cfg.fpn)
        channels, d_model = self.backbone.out_channels, cfg.transformer.d_model
        self.fcos_head = TSPFCOSHead(channels, cfg.num_classes, cfg.head.num_convs, cfg.head.num_groups,
                                     cfg.head.prior_prob)
        t = cfg.transformer
        self.transformer_encoder = TransformerEncoder(d_model, t.nhead, t.num_layers, t.dim_feedforward, t.dropout)
        self.pyramid_position_embedding = nn.Parameter(torch.ones(len(self.levels), d_model))
        self.enc_proj = nn.Linear(2 * channels, d_model)
        self.post_enc_proj_norm = nn.LayerNorm(d_model)
        self.cls_logits = nn.Linear(d_model, cfg.num_classes)
        self.bbox_pred = nn.Linear(d_model, 4)
        self.ctrness = nn.Linear(d_model, 1)
        self.scales = nn.Parameter(torch.ones(len(self.levels)))
        nn.init.normal_(self.cls_logits.weight, std=0.01)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - cfg.head.prior_prob) / cfg.head.prior_prob))
        nn.init.normal_(self.ctrness.weight, std=0.01)
        nn.init.constant_(self.ctrness.bias, 0.0)
        self.last_selection: Optional[dict] = None

    def benchmark_parts(self) -> list[tuple[str, list[nn.Module]]]:
        """Stages of an inference call for ``sparsedet.benchmark`` (each ends when its last module
        returns; what follows the encoder, i.e. the output heads, decoding and NMS, is post-processing)."""
        return [("preprocess", [self.preprocess]), ("backbone+FPN", [self.backbone]),
                ("head (FCOS head)", [self.fcos_head]),
                ("selection (FoI top-k, gather, projection)", [self.enc_proj, self.post_enc_proj_norm]),
                ("encoder (transformer)", [self.transformer_encoder])]

    # ------------------------------------------------------------------ forward
    def forward(self, images: Sequence[Tensor], targets: Optional[Sequence[dict]] = None,
                original_sizes: Optional[Sequence[tuple[int, int]]] = None):
        batch, image_sizes = preprocess_inputs(self, images, targets, original_sizes)
        features = self.backbone(batch)
        maps = [features[f"p{lvl}"] for lvl in self.levels]
        cls_feats, box_feats, foi_logits = self.fcos_head(maps)
        shapes = [tuple(m.shape[-2:]) for m in maps]
        device = batch.device
        # Every location of every level, level-major then row-major (tsp.md §2.2).
        points = [level_points(h, w, s, device) for (h, w), s in zip(shapes, self.strides)]
        level_of = torch.cat([torch.full((h * w,), i, dtype=torch.int64, device=device)
                              for i, (h, w) in enumerate(shapes)])
        tokens = torch.cat([torch.cat((c, b), dim=1).flatten(2) for c, b in zip(cls_feats, box_feats)],
                           dim=2).transpose(1, 2)                                            # (B, L, 2C)
        logits_all = torch.cat([x.flatten(2) for x in foi_logits], dim=2).transpose(1, 2)   # (B, L, K)
        positions = None
        if self.cfg.position_encoding == "sine":
            masks = level_padding_masks(image_sizes, tuple(batch.shape[-2:]), shapes, device)
            positions = all_positions(masks)                                                 # (B, L, 2)

        assignment = self._assign(points, targets) if self.training else None
        positive = (assignment[0] < self.num_classes) if assignment is not None and self.cfg.foi.lift_positives else None
        index = select_top_fois(foi_scores(logits_all, positive), self.cfg.foi.num_foi, self.cfg.foi.clamp_to_locations)
        if self.training and self.cfg.foi.keep_min < 1.0:
            index = index[:, random_keep(index.shape[1], self.cfg.foi.keep_min, device=device)]
        logits, ltrb, centerness = self._encode(tokens, positions, index, level_of)
        points = torch.cat(points)
        if self.training and self.cfg.loss.set_loss == "detr":
            return self._detr_losses(logits_all, logits, ltrb, centerness, index, level_of, points, assignment,
                                     targets, image_sizes)
        if self.training:
            return self._losses(logits_all, logits, ltrb, centerness, index, assignment)
        return self._detections(logits, ltrb, index, level_of, points, image_sizes, original_sizes, logits_all)

    def _decode(self, ltrb: Tensor, index: Tensor, level_of: Tensor, points: Tensor) -> Tensor:
        """(k, 4) ltrb in stride units of the FoIs ``index`` (k,) -> (k, 4) xyxy input pixels (tsp.md §2.6)."""
        strides = torch.tensor(self.strides, dtype=torch.float32, device=ltrb.device)
        xy = points[index]
        d = ltrb.float() * strides[level_of[index]][:, None]
        return torch.stack((xy[:, 0] - d[:, 0], xy[:, 1] - d[:, 1], xy[:, 0] + d[:, 2], xy[:, 1] + d[:, 3]), dim=1)

    def _encode(self, tokens: Tensor, positions: Optional[Tensor], index: Tensor, level_of: Tensor):
        """Gathers the FoIs (B, k) and runs projection, encoder and heads. ``positions`` (B, L, 2) are
        the normalised (y, x) of every location (None: no positional encoding); only the selected
        FoIs' are encoded.

        Returns: class logits (B, k, K), ltrb (B, k, 4) in stride units, centerness logits (B, k)."""
        gather = lambda x: torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))
        x = self.post_enc_proj_norm(self.enc_proj(gather(tokens)))
        pos = (location_encoding(gather(positions), level_of[index], self.pyramid_position_embedding)
               if positions is not None else None)
        memory = self.transformer_encoder(x, pos)
        logits = self.cls_logits(memory)
        ltrb = torch.relu(self.bbox_pred(memory)) * self.scales[level_of[index]][..., None]
        return logits, ltrb, self.ctrness(memory).squeeze(-1)

    # ------------------------------------------------------------------ training
    def _assign(self, points: list[Tensor], targets: Sequence[dict]) -> tuple[Tensor, Tensor, Tensor, int]:
        """FCOS assignment of every location of every image (tsp.md §2.3).

        Returns: labels (B, L) (K = background), ltrb (B, L, 4) in stride units, batch-global GT
        index (B, L) (-1 = none), number of GTs in the batch."""
        strides = torch.cat([torch.full((p.shape[0],), float(s), device=p.device) for p, s in zip(points, self.strides)])
        labels, ltrb, gt_index, offset = [], [], [], 0
        for target in targets:
            classes, distances, gt = fcos_assignment(points, self.strides, self.regression_ranges, target["boxes"],
                                                     target["labels"], self.num_classes,
                                                     self.cfg.targets.center_sampling_radius)
            labels.append(classes)
            ltrb.append(distances / strides[:, None])
            gt_index.append(torch.where(gt >= 0, gt + offset, gt))
            offset += int(target["boxes"].shape[0])
        return torch.stack(labels), torch.stack(ltrb), torch.stack(gt_index), offset

    def _losses(self, logits_all: Tensor, logits: Tensor, ltrb: Tensor, centerness: Tensor, index: Tensor,
                assignment) -> dict[str, Tensor]:
        labels, target_ltrb, gt_index, num_gt = assignment
        pick = lambda x: torch.gather(x, 1, index if x.dim() == 2 else index[..., None].expand(-1, -1, x.shape[-1]))
        sel_labels, sel_ltrb, sel_gt = pick(labels).flatten(), pick(target_ltrb).flatten(0, 1), pick(gt_index).flatten()
        eligible = sel_labels < self.num_classes
        ctr = torch.zeros(sel_labels.shape, device=ltrb.device)
        ctr[eligible] = centerness_targets(sel_ltrb[eligible])
        loss = self.cfg.loss
        return tsp_fcos_losses(logits_all.flatten(0, 1), labels.flatten(), logits.flatten(0, 1), ltrb.flatten(0, 1),
                               centerness.flatten(), sel_labels, sel_ltrb, ctr, sel_gt, num_gt,
                               loss.focal_alpha, loss.focal_gamma, loss.set_loss, loss.duplicate_weight,
                               loss.match_giou_weight, loss.class_normaliser)

    def _detr_losses(self, logits_all, logits, ltrb, centerness, index, level_of, points, assignment, targets,
                     image_sizes) -> dict[str, Tensor]:
        """``model.loss.set_loss=detr``: the FoI classifier loss plus the DETR-like baseline."""
        loss = self.cfg.loss
        boxes = torch.stack([self._decode(ltrb[b], index[b], level_of, points) for b in range(len(index))])
        losses = {"loss_fcos_local_cls": foi_classifier_loss(logits_all.flatten(0, 1), assignment[0].flatten(),
                                                             loss.focal_alpha, loss.focal_gamma)}
        losses.update(tsp_fcos_detr_losses(logits, boxes, centerness, points[index], targets, image_sizes,
                                           no_object_weight=loss.duplicate_weight))
        return losses

    # ------------------------------------------------------------------ inference
    def _detections(self, logits: Tensor, ltrb: Tensor, index: Tensor, level_of: Tensor, points: Tensor,
                    image_sizes, original_sizes, logits_all: Tensor) -> list[dict]:
        test = self.cfg.test
        results, selection = [], []
        for b in range(index.shape[0]):
            level = level_of[index[b]]
            xy = points[index[b]]
            boxes = self._decode(ltrb[b], index[b], level_of, points)
            results.append(tsp_fcos_detections(logits[b], boxes, level, len(self.levels), test.topk_candidates,
                                               test.score_threshold, test.nms_threshold, test.max_detections,
                                               image_sizes[b], None if original_sizes is None else tuple(original_sizes[b])))
            selection.append({"points": xy, "levels": level,
                              "scores": logits_all[b, index[b]].float().sigmoid().max(dim=-1).values})
        self.last_selection = {"images": selection, "image_sizes": list(image_sizes)}
        return results
