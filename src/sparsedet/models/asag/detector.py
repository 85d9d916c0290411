"""ASAG (Fu et al., ICCV 2023): adaptive sparse anchors + one-decoder-layer sparse detectors.

Pipeline (spec section 1.0): backbone + FPN (P2..P5) -> anchor generator on P3..P5 -> relation
block ("rpn": RoIAlign content queries, one IoF self-attention layer, supervised proposals) ->
four parallel one-layer heads (AdaMixer for ASAG-A, Sparse R-CNN for ASAG-S) fed the same
detached proposals. ASAG-D (``decoder_type: deformable``, spec §3.3, a reconstruction without
official code) swaps the FPN for a deformable encoder (E3..E6, strides 8..64: the generator reads
E3..E5) and the heads for Deformable-DETR decoder layers. Training supervises the anchors, the
proposals and every head; inference returns one head (``model.test_head``).

The anchors of the last forward are kept in ``model.last_anchors`` (a ``GeneratedAnchors``:
``boxes`` (B, Q, 4) pixel cxcywh in the network input, ``scores``, ``valid``, ``levels`` and the
patches per level); in eval the proposals in ``model.last_proposals`` (``logits`` (B, Q, C),
``boxes`` (B, Q, 4) normalised cxcywh).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ...config import ConfigError
from ...layers.box_ops import box_xyxy_to_cxcywh
from ..backbones import build_backbone, build_deformable_backbone
from ..criterion import average_num_boxes
from ..preprocess import build_preprocessor, image_sizes_tensor, preprocess_inputs
from .anchor_generator import AnchorGenerator, GeneratedAnchors
from .anchor_loss import anchor_losses
from .config import SETTINGS, ASAGConfig
from .decoder import ParallelDecoder
from .denoising import DenoisingQueries, denoising_losses
from .postprocess import postprocess
from .relation_block import RelationBlock
from .set_loss import set_losses


class ASAG(nn.Module):
    """ASAG-A / ASAG-S detector.

    ``model(images, targets)`` in training returns a dict of weighted losses; ``model(images)`` in
    eval returns per image ``{"boxes" (K, 4) xyxy, "scores" (K,), "labels" (K,)}`` of the head
    ``model.test_head``, in the input tensor's pixels (or in ``original_sizes`` when given).
    Images are RGB ``(3, H, W)`` 0-255 tensors at network resolution; targets hold ``boxes``
    (M, 4) xyxy pixels and ``labels`` (M,) in ``[0, num_classes)``.
    """

    def __init__(self, cfg: ASAGConfig):
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.deformable = cfg.decoder_type == "deformable"
        if self.deformable:
            if cfg.encoder.num_levels != 4 or tuple(cfg.encoder.in_stages)[0] != 3:
                raise ConfigError(f"ASAG-D needs model.encoder levels at strides 8, 16, 32 (anchors) and 64: "
                                  f"in_stages starting at 3 and num_levels 4, got in_stages "
                                  f"{list(cfg.encoder.in_stages)} and num_levels {cfg.encoder.num_levels}")
        elif tuple(cfg.fpn.out_levels) != (2, 3, 4, 5):
            raise ConfigError(f"model.fpn.out_levels must be [2, 3, 4, 5] for ASAG, got {list(cfg.fpn.out_levels)}")
        self.preprocess = build_preprocessor(cfg)
        self.backbone = (build_deformable_backbone(cfg.backbone, cfg.encoder) if self.deformable
                         else build_backbone(cfg.backbone, cfg.fpn))
        # Feature levels (log2 strides) of the maps the model runs on; the generator reads 8/16/32.
        self.feature_levels = (3, 4, 5, 6) if self.deformable else (2, 3, 4, 5)
        d = self.backbone.out_channels
        if d != cfg.hidden_dim:
            raise ConfigError(f"model.fpn.channels ({d}) must equal model.hidden_dim ({cfg.hidden_dim})")
        self.anchor_generator = AnchorGenerator(cfg, d)
        self.rpn = RelationBlock(cfg.num_classes, d, cfg.num_attention_heads, cfg.dim_feedforward, cfg.activation,
                                 pooler_levels=self.feature_levels)
        self.decoder = ParallelDecoder(cfg.decoder_type, cfg.num_classes, cfg.num_heads_decoder, d,
                                       cfg.num_attention_heads, cfg.dim_feedforward, cfg.activation,
                                       (cfg.adamixer_in_points, cfg.adamixer_out_points, cfg.adamixer_groups),
                                       strides=[2 ** level for level in self.feature_levels], dropout=cfg.dropout,
                                       deformable_points=cfg.deformable_points,
                                       deformable_feedforward=cfg.deformable_feedforward)
        self.test_head_index = cfg.test_head_index()
        self.nms_threshold = (cfg.test_nms_threshold if cfg.test_nms_threshold is not None
                              else SETTINGS[cfg.setting]["nms_threshold"])
        self.denoising = DenoisingQueries(cfg.denoising, cfg.anchors.target_patch_iters, cfg.num_attention_heads) if cfg.denoising.enabled else None
        self.last_anchors: Optional[GeneratedAnchors] = None
        self.last_proposals: Optional[dict] = None

    def benchmark_parts(self) -> list[tuple[str, list[nn.Module]]]:
        """Stages of an inference call for ``sparsedet.benchmark`` (each ends when its last module
        returns; top-k, box scaling and NMS are post-processing). In eval only ``test_head`` runs."""
        return [("preprocess", [self.preprocess]), ("backbone+FPN", [self.backbone]),
                ("selection (anchor generator)", [self.anchor_generator]),
                ("RelationBlock", [self.rpn]), ("decoder (one layer)", [self.decoder])]

    def forward(self, images: Sequence[Tensor], targets: Optional[Sequence[dict]] = None,
                original_sizes: Optional[Sequence[tuple[int, int]]] = None):
        if self.training and self.cfg.fast_inference:
            raise ConfigError("model.fast_inference=true is an inference-only path (early stop and patch cap); "
                              "set model.fast_inference=false for training")
        batch, image_sizes = preprocess_inputs(self, images, targets, original_sizes)
        if self.deformable:   # the encoder masks each image's padding
            maps = self.backbone(batch, image_sizes_tensor(image_sizes, torch.int64, batch.device))
        else:
            maps = self.backbone(batch)
        features = [f.float() for f in maps.values()]
        # Autocast (solver.amp) covers only the backbone and FPN, as in the official code.
        with torch.autocast(batch.device.type, enabled=False):
            return self._forward_heads(features, image_sizes, targets, original_sizes)

    def _forward_heads(self, features, image_sizes, targets, original_sizes):
        device = features[0].device
        sizes = image_sizes_tensor(image_sizes, torch.float32, device)                 # (B, 2) (h, w)
        prepared = [self._prepare_target(t, size) for t, size in zip(targets, image_sizes)] if self.training else None
        stride8 = self.feature_levels.index(3)
        anchors = self.anchor_generator(features[stride8:stride8 + 3], image_sizes, targets if self.training else None,
                                        fast=self.cfg.fast_inference)
        self.last_anchors = _detached(anchors)
        boxes, valid = anchors.boxes, anchors.valid
        blocked, num_dn = None, 0
        if self.denoising is not None and self.training:
            boxes, valid, blocked, num_dn = self.denoising(boxes, valid, prepared, sizes, int(self.anchor_generator.train_steps))
        proposals = self.rpn(features, boxes, sizes, valid, blocked)
        if not self.training:
            self.last_proposals = {"logits": proposals["logits"].detach(), "boxes": proposals["boxes"].detach()}
        heads = None if self.training else [self.test_head_index]
        outputs = self.decoder(features, proposals["content"], self.decoder.initial_boxes(proposals), sizes, valid,
                               heads, blocked)
        if not self.training:
            head = outputs[0]
            return postprocess(head["logits"], head["boxes"], valid, image_sizes, self.cfg.detections_per_image,
                               self.nms_threshold, original_sizes)
        return self._losses(anchors, proposals, outputs, prepared, valid, num_dn)

    def _losses(self, anchors: GeneratedAnchors, proposals: dict, heads: list[dict], targets: list[dict],
                valid: Tensor, num_dn: int) -> dict[str, Tensor]:
        cfg = self.cfg.loss
        num_boxes = average_num_boxes(targets, valid.device)
        sizes_wh = torch.stack([t["size_wh"] for t in targets])
        losses = dict(anchor_losses(anchors.patches, targets, sizes_wh, num_boxes, cfg, self.cfg.anchors.patch_size))
        weights = {"loss_ce": cfg.class_weight, "loss_bbox": cfg.l1_weight, "loss_giou": cfg.giou_weight}
        outputs = [("_rpn", proposals)] + [("" if h["name"] == "main" else "_" + h["name"].split("_")[1], h) for h in heads]
        for dn_index, (suffix, output) in enumerate(outputs):
            logits, boxes = output["logits"][:, num_dn:], output["boxes"][:, num_dn:]
            for key, value in set_losses(logits, boxes, valid[:, num_dn:], targets, num_boxes, cfg).items():
                losses[key + suffix] = value * weights[key]
            if num_dn:
                for key, value in denoising_losses(output["logits"][:, :num_dn], output["boxes"][:, :num_dn],
                                                   self.denoising.last_pairs, targets, cfg).items():
                    losses[f"dn_{key}_{dn_index}"] = value * weights[key]
        return losses

    @staticmethod
    def _prepare_target(target: dict, size_hw: tuple[int, int]) -> dict:
        h, w = size_hw
        boxes = target["boxes"].float()
        whwh = boxes.new_tensor([w, h, w, h])
        return {"boxes": boxes, "labels": target["labels"].long(),
                "boxes_cxcywh": box_xyxy_to_cxcywh(boxes / whwh),
                "size_wh": boxes.new_tensor([w, h])}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` that names the missing decoder heads clearly (a one-head
        checkpoint loaded into a four-head model, or the reverse)."""
        heads_in_file = sorted({int(k.split(".")[2]) for k in state_dict
                                if k.startswith(("decoder.bbox_head.", "decoder.head_series.", "decoder.deformable_head."))})
        if strict and heads_in_file and len(heads_in_file) != self.cfg.num_heads_decoder:
            raise ConfigError(
                f"the checkpoint has {len(heads_in_file)} decoder head(s) but the model is built with "
                f"model.num_heads_decoder={self.cfg.num_heads_decoder} (model.test_head={self.cfg.test_head!r}); "
                f"a one-head checkpoint needs model.num_heads_decoder=1 model.test_head=main")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _detached(anchors: GeneratedAnchors) -> GeneratedAnchors:
    return GeneratedAnchors(anchors.boxes.detach(), anchors.scores.detach(), anchors.valid, anchors.levels,
                            {k: type(v)(v.anchors.detach(), v.crops, v.image_index, v.generated, v.stride)
                             for k, v in anchors.patches.items()})
