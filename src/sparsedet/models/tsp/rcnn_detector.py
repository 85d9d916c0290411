"""TSP-RCNN (Sun et al., ICCV 2021, spec §3): an RPN selects up to 700 proposals, their RoI features
and 8-number box encodings go through a pre-norm transformer encoder (no decoder), and a softmax
classifier + class-specific box MLP predict the detections; trained with the restricted set loss.
Optional 2-stage cascade (App. D) and DETR-loss baseline (fig. 6) are config switches."""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.ops import batched_nms, clip_boxes_to_image

from ...layers.anchors import AnchorGenerator
from ...layers.box_coder import BoxCoder
from ...layers.pooler import MultiLevelRoIAlign
from ..backbones import build_backbone
from ..dense.iou_matcher import IoUMatcher
from ..faster_rcnn.proposals import RPNLevelOutputs, select_proposals
from ..faster_rcnn.rpn import label_rpn_anchors, rpn_losses
from ..preprocess import build_preprocessor, image_sizes_tensor, preprocess_inputs, rescale_boxes
from .rcnn_box_encoding import box_position_encoding
from .rcnn_box_head import TSPRCNNBoxHead, TSPRCNNPredictor
from .rcnn_config import TSPRCNNConfig, check_tsp_rcnn_config, stage_settings
from .rcnn_losses import class_deltas, detr_losses, tsp_losses
from .rcnn_proposal_sampling import LabelledProposals, label_proposals, sample_training_proposals
from .rcnn_rpn_head import TSPRPNHead


class _ScaleGradient(torch.autograd.Function):
    """Identity forward, gradient x ``scale`` backward (detectron2 cascade: RoI features get 1 / N stages)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def pad_per_image(rows: Tensor, counts: Sequence[int]) -> tuple[Tensor, Tensor]:
    """(N, F) image-major rows -> (B, S_max, F) zero-padded and the (B, S_max) key padding mask
    (True = padding). An image without rows keeps slot 0 unmasked (a zero token nobody reads), so the
    attention of its padded queries never sees only masked keys (that would give NaN).

    One image with rows needs no padding: it takes a path without Python counts, so that an ONNX
    trace keeps its row count (data-dependent after the RPN's NMS) symbolic."""
    if len(counts) == 1 and (torch.jit.is_tracing() or counts[0] > 0):
        return rows[None], torch.zeros((1, rows.shape[0]), dtype=torch.bool, device=rows.device)
    chunks = list(rows.split(list(counts)))
    width = max(max(counts), 1)
    padded = pad_sequence(chunks, batch_first=True)
    if padded.shape[1] < width:
        padded = torch.cat((padded, padded.new_zeros((padded.shape[0], width - padded.shape[1], *padded.shape[2:]))), 1)
    slots = torch.arange(width, device=rows.device)
    mask = slots[None, :] >= torch.as_tensor(list(counts), device=rows.device)[:, None]
    mask[:, 0] &= torch.as_tensor([c > 0 for c in counts], device=rows.device)
    return padded, mask


class TSPRCNN(nn.Module):
    """TSP-RCNN detector.

    Training: ``model(images, targets)`` -> ``{"loss_rpn_cls", "loss_rpn_loc" (x rpn.box_loss_weight),
    "loss_obj", "loss_box_reg"}`` (cascade: the last two per stage, suffixed ``_stage{k}``). Inference:
    ``model(images, original_sizes=None)`` -> per image ``{"boxes" (K, 4), "scores" (K,), "labels" (K,)}``
    after class-wise NMS, in the input tensor's pixels or ``original_sizes``.

    Images are RGB (3, H, W) 0-255 tensors at network resolution (BGR flip and normalisation inside).

    Attributes:
        last_rois: after each inference, per image ``{"boxes" (S, 4), "scores" (S,)}``: the proposals
            that entered the encoder (input pixels) and their RPN objectness probability (``--explain``).
    """

    def __init__(self, cfg: TSPRCNNConfig):
        super().__init__()
        check_tsp_rcnn_config(cfg)
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.preprocess = build_preprocessor(cfg)
        self.backbone = build_backbone(cfg.backbone, cfg.fpn)
        channels = self.backbone.out_channels
        rpn, roi = cfg.rpn, cfg.roi_heads
        self.rpn_levels = tuple(int(lvl) for lvl in rpn.levels)
        self.anchor_generator = AnchorGenerator(self.rpn_levels, rpn.resolved_anchor_sizes(), rpn.aspect_ratios,
                                                rpn.anchor_offset)
        self.rpn_head = TSPRPNHead(channels, self.anchor_generator.num_anchors, len(self.rpn_levels), rpn.num_convs)
        self.rpn_box_coder = BoxCoder(rpn.box_weights, rpn.box_scale_clamp)
        self.rpn_matcher = IoUMatcher(rpn.iou_thresholds, allow_low_quality_matches=True)
        self.rpn_sampler = BalancedPositiveNegativeSampler(rpn.batch_size_per_image, rpn.positive_fraction)
        self.roi_levels = tuple(int(lvl) for lvl in roi.in_levels)
        self.pooler = MultiLevelRoIAlign(self.roi_levels, roi.pooler_resolution, roi.sampling_ratio, aligned=True)
        self.stages = stage_settings(cfg)
        self.box_coders = [BoxCoder(weights, roi.box_scale_clamp) for _, weights in self.stages]

        def head() -> TSPRCNNBoxHead:
            return TSPRCNNBoxHead(channels * roi.pooler_resolution ** 2, roi.d_model, roi.num_fc, roi.fc_dim,
                                  roi.num_heads, roi.num_layers, roi.dim_feedforward, roi.dropout,
                                  with_position=roi.position_encoding != "none")

        def predictor() -> TSPRCNNPredictor:
            return TSPRCNNPredictor(roi.d_model, cfg.num_classes, roi.cls_agnostic_bbox_reg)

        if len(self.stages) == 1:
            self.box_head, self.box_predictor = head(), predictor()
        else:  # official cascade names: roi_heads.box_head.{stage}.*
            self.box_head = nn.ModuleList(head() for _ in self.stages)
            self.box_predictor = nn.ModuleList(predictor() for _ in self.stages)
        self.last_rois: Optional[list[dict]] = None

    def benchmark_parts(self) -> list[tuple[str, list[nn.Module]]]:
        """Stages of an inference call for ``sparsedet.benchmark`` (each ends when its last module
        returns; the predictor, box decoding and NMS are post-processing). With the cascade a part
        ends at its last stage's call, so the earlier stages' encoders count to the selection part."""
        heads = list(self.box_head) if isinstance(self.box_head, nn.ModuleList) else [self.box_head]
        return [("preprocess", [self.preprocess]), ("backbone+FPN", [self.backbone]),
                ("head (RPN head)", [self.rpn_head]),
                ("selection (proposals + RoI pooling)", [self.pooler]),
                ("encoder (projection + transformer)", heads)]

    # ------------------------------------------------------------------ entry point

    def forward(self, images: Sequence[Tensor], targets: Optional[Sequence[dict]] = None,
                original_sizes: Optional[Sequence[tuple[int, int]]] = None):
        batch, image_sizes = preprocess_inputs(self, images, targets, original_sizes)
        features = self.backbone(batch)
        rpn_features = [features[f"p{lvl}"] for lvl in self.rpn_levels]
        objectness, deltas = self.rpn_head(rpn_features)
        anchors = [self.anchor_generator.grid_anchors(lvl, *f.shape[-2:]) for lvl, f in zip(self.rpn_levels, rpn_features)]
        proposals = self.rpn_proposals(objectness, deltas, anchors, image_sizes)
        roi_features = [features[f"p{lvl}"] for lvl in self.roi_levels]
        if self.training:
            losses = self.rpn_losses(objectness, deltas, anchors, targets)
            losses.update(self.box_head_losses(roi_features, proposals, targets, image_sizes))
            return losses
        return self.detect(roi_features, proposals, image_sizes, original_sizes)

    # ------------------------------------------------------------------ RPN

    @torch.no_grad()
    def rpn_proposals(self, objectness: Sequence[Tensor], deltas: Sequence[Tensor], anchors: Sequence[Tensor],
                      image_sizes: Sequence[tuple[int, int]]) -> list[tuple[Tensor, Tensor]]:
        """Per image (boxes (P, 4), objectness logits (P,)), P <= ``rpn.num_proposals``: per level top-k,
        decode, clip, per-level NMS 0.7, best over all levels (spec §3.2). No gradient (train and test)."""
        rpn = self.cfg.rpn
        pre = rpn.pre_nms_topk_train if self.training else rpn.pre_nms_topk_test
        out = []
        for b, size in enumerate(image_sizes):
            levels = [RPNLevelOutputs(o[b].detach(), d[b].detach(), a, lvl)
                      for o, d, a, lvl in zip(objectness, deltas, anchors, self.rpn_levels)]
            boxes, scores, _ = select_proposals(levels, self.rpn_box_coder, size, pre, rpn.num_proposals,
                                                rpn.nms_threshold, rpn.min_box_size)
            out.append((boxes, scores))
        return out

    def rpn_losses(self, objectness: Sequence[Tensor], deltas: Sequence[Tensor], anchors: Sequence[Tensor],
                   targets: Sequence[dict]) -> dict[str, Tensor]:
        rpn = self.cfg.rpn
        labels, gt_deltas = label_rpn_anchors(torch.cat(anchors), targets, self.rpn_matcher, self.rpn_sampler,
                                              self.rpn_box_coder)
        losses = rpn_losses(torch.cat(objectness, dim=1), torch.cat(deltas, dim=1), labels, gt_deltas,
                            rpn.batch_size_per_image, rpn.smooth_l1_beta)
        losses["loss_rpn_loc"] = losses["loss_rpn_loc"] * rpn.box_loss_weight
        return losses

    # ------------------------------------------------------------------ box head

    def run_stage(self, stage: int, roi_features: Sequence[Tensor], boxes: Sequence[Tensor],
                  image_sizes: Sequence[tuple[int, int]], previous: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One box-head stage on per-image proposal ``boxes`` (S_i, 4).

        Returns:
            logits (N, C + 1), deltas (N, 4C) or (N, 4) (N = sum S_i, image-major), the (B, S_max, d)
            encoder output and its (B, S_max) padding mask.
        """
        cascade = isinstance(self.box_head, nn.ModuleList)
        head = self.box_head[stage] if cascade else self.box_head
        predictor = self.box_predictor[stage] if cascade else self.box_predictor
        counts = [b.shape[0] for b in boxes]
        pooled = self.pooler(roi_features, boxes).flatten(1)                       # (N, C * S * S)
        if cascade and self.training:
            pooled = _ScaleGradient.apply(pooled, 1.0 / len(self.stages))
        tokens, mask = pad_per_image(pooled, counts)
        position = None
        mode = self.cfg.roi_heads.position_encoding
        if mode != "none":
            padded_boxes, _ = pad_per_image(torch.cat(list(boxes)).to(tokens.dtype), counts)
            sizes = image_sizes_tensor(image_sizes, tokens.dtype, tokens.device)
            position = box_position_encoding(padded_boxes, sizes, self.cfg.roi_heads.d_model, mode)
        encoded = head(tokens, position, mask, previous)
        valid = torch.cat([torch.arange(encoded.shape[1], device=encoded.device) < c for c in counts]).view(mask.shape)
        logits, deltas = predictor(encoded[valid])
        return logits, deltas, encoded, mask

    def refine(self, stage: int, deltas: Tensor, boxes: Sequence[Tensor], image_sizes) -> list[Tensor]:
        """The next cascade stage's proposals: this stage's class-agnostic boxes, detached and clipped."""
        decoded = self.box_coders[stage].decode(deltas.detach(), torch.cat(list(boxes)))
        return [clip_boxes_to_image(b, tuple(size)) for b, size in zip(decoded.split([x.shape[0] for x in boxes]), image_sizes)]

    def box_head_losses(self, roi_features: Sequence[Tensor], proposals: Sequence[tuple[Tensor, Tensor]],
                        targets: Sequence[dict], image_sizes: Sequence[tuple[int, int]]) -> dict[str, Tensor]:
        """Training of the box head(s): sample the RPN proposals (spec §3.3), then per stage label (stage 0:
        sampling's labels; later stages: re-matched at their IoU, or inherited), run the stage and take its
        ``tsp`` (or ``detr``) losses; the next stage starts from this stage's detached, clipped boxes."""
        roi, C = self.cfg.roi_heads, self.num_classes
        gt = [(t["boxes"].to(proposals[0][0].device, torch.float32), t["labels"].to(proposals[0][0].device, torch.int64))
              for t in targets]
        labelled = [sample_training_proposals(p[0], boxes, labels, C, self.stages[0][0], roi.batch_size_per_image,
                                              roi.positive_fraction, roi.keep_ratio_min, keep_ratio_max=roi.keep_ratio_max,
                                              strict=roi.iou_comparison == "above")
                    for p, (boxes, labels) in zip(proposals, gt)]
        losses: dict[str, Tensor] = {}
        previous = None
        boxes = [lp.boxes for lp in labelled]
        for stage, (iou_threshold, _) in enumerate(self.stages):
            if stage > 0 and not self.cfg.cascade.inherit_match:
                labelled = [label_proposals(b, gb, gl, C, iou_threshold, roi.iou_comparison == "above")
                            for b, (gb, gl) in zip(boxes, gt)]
            elif stage > 0:
                labelled = [LabelledProposals(b, *lp[1:]) for b, lp in zip(boxes, labelled)]
            logits, deltas, encoded, mask = self.run_stage(stage, roi_features, boxes, image_sizes, previous)
            if self.cfg.loss.type == "detr":
                stage_losses = detr_losses(logits.split([len(b) for b in boxes]), deltas.split([len(b) for b in boxes]),
                                           boxes, targets, self.box_coders[stage], self.cfg.loss)
            else:
                offsets, total = [], 0
                for boxes_i, _ in gt:
                    offsets.append(total)
                    total += boxes_i.shape[0]
                gt_indices = torch.cat([lp.gt_indices + off for lp, off in zip(labelled, offsets)])
                stage_losses, _ = tsp_losses(logits, deltas, torch.cat(boxes), torch.cat([lp.gt_classes for lp in labelled]),
                                             torch.cat([lp.gt_boxes for lp in labelled]), gt_indices,
                                             self.box_coders[stage], self.cfg.loss)
            suffix = f"_stage{stage}" if len(self.stages) > 1 else ""
            losses.update({k + suffix: v for k, v in stage_losses.items()})
            if stage + 1 < len(self.stages):
                boxes = self.refine(stage, deltas, boxes, image_sizes)
                previous = encoded
        return losses

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def detect(self, roi_features: Sequence[Tensor], proposals: Sequence[tuple[Tensor, Tensor]],
               image_sizes: Sequence[tuple[int, int]], original_sizes=None) -> list[dict]:
        """All proposals (no drop) through every stage; the last stage's softmax scores (background
        dropped) and boxes, clipped, score > threshold, class-wise NMS, top ``max_detections`` (spec §3.8)."""
        roi = self.cfg.roi_heads
        boxes = [p[0] for p in proposals]
        self.last_rois = [{"boxes": p[0], "scores": p[1].sigmoid()} for p in proposals]
        previous = None
        for stage in range(len(self.stages)):
            logits, deltas, previous, _ = self.run_stage(stage, roi_features, boxes, image_sizes, previous)
            if stage + 1 < len(self.stages):
                boxes = self.refine(stage, deltas, boxes, image_sizes)
        counts = [b.shape[0] for b in boxes]
        results = []
        coder = self.box_coders[-1]
        for i, (lg, dl, props) in enumerate(zip(logits.split(counts), deltas.split(counts), boxes)):
            scores = lg.float().softmax(dim=1)[:, :-1]                                     # (S, C)
            per_class = dl.float().view(dl.shape[0], dl.shape[1] // 4, 4)                   # (S, C or 1, 4)
            decoded = coder.decode(per_class, props.float()[:, None, :].expand_as(per_class))
            decoded = clip_boxes_to_image(decoded.reshape(-1, 4), tuple(image_sizes[i])).view(per_class.shape)
            decoded = decoded.expand(-1, self.num_classes, -1)
            valid = torch.isfinite(decoded).all(dim=2) & torch.isfinite(scores) & (scores > roi.score_threshold)
            rows, classes = valid.nonzero(as_tuple=True)
            det_boxes, det_scores = decoded[rows, classes], scores[rows, classes]
            keep = batched_nms(det_boxes, det_scores, classes, roi.nms_threshold)[:roi.max_detections]
            out_size = original_sizes[i] if original_sizes is not None else None
            det_boxes = rescale_boxes(det_boxes[keep], image_sizes[i], out_size)
            nonempty = (det_boxes[:, 2] > det_boxes[:, 0]) & (det_boxes[:, 3] > det_boxes[:, 1])
            results.append({"boxes": det_boxes[nonempty], "scores": det_scores[keep][nonempty],
                            "labels": classes[keep][nonempty]})
        return results
