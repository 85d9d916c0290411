"""Sparse R-CNN (Sun et al., CVPR 2021): learnable proposals refined by a dynamic head, no NMS."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ...config import ConfigError
from ..backbones import build_backbone
from ..criterion import SetCriterion
from ..matcher import HungarianMatcher
from ..preprocess import build_preprocessor, preprocess_inputs, rescale_boxes
from .config import SparseRCNNConfig
from .head import DynamicHead

PROPOSAL_INITS = ("image", "center", "grid", "random")


def initial_proposal_boxes(num_proposals: int, mode: str) -> Tensor:
    """(N, 4) normalised (cx, cy, w, h) proposal boxes for the paper's table-5 initialisations."""
    if mode == "image":
        return torch.tensor([0.5, 0.5, 1.0, 1.0]).repeat(num_proposals, 1)
    if mode == "center":
        return torch.tensor([0.5, 0.5, 0.1, 0.1]).repeat(num_proposals, 1)
    if mode == "grid":
        side = math.ceil(math.sqrt(num_proposals))
        cells = (torch.arange(side, dtype=torch.float32) + 0.5) / side
        cy, cx = torch.meshgrid(cells, cells, indexing="ij")
        size = torch.full((side * side,), 1.0 / side)
        return torch.stack((cx.flatten(), cy.flatten(), size, size), dim=1)[:num_proposals]
    if mode == "random":
        boxes = torch.randn(num_proposals, 4) * 0.2 + 0.5
        return torch.cat((boxes[:, :2].clamp(0, 1), boxes[:, 2:].clamp(0.05, 1)), dim=1)
    raise ConfigError(f"model.proposal_init must be one of {PROPOSAL_INITS}, got {mode!r}")


class SparseRCNN(nn.Module):
    """Sparse R-CNN detector.

    ``model(images, targets)`` in training mode returns a dict of weighted losses.
    ``model(images)`` in eval mode returns per image ``{"boxes" (K, 4) xyxy, "scores" (K,),
    "labels" (K,)}`` in the input tensor's pixels, or in ``original_sizes`` when given.

    Images are RGB ``(3, H, W)`` tensors in 0-255 at network resolution; normalisation, channel
    order and padding happen inside. Targets hold ``boxes`` (M, 4) xyxy in the same pixels and
    ``labels`` (M,) in ``[0, num_classes)``.
    """

    def __init__(self, cfg: SparseRCNNConfig):
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.num_proposals = cfg.num_proposals
        self.preprocess = build_preprocessor(cfg)
        self.backbone = build_backbone(cfg.backbone, cfg.fpn)
        if self.backbone.out_channels != cfg.hidden_dim:
            raise ConfigError(f"model.fpn.channels ({self.backbone.out_channels}) must equal model.hidden_dim ({cfg.hidden_dim})")
        self.init_proposal_features = nn.Embedding(cfg.num_proposals, cfg.hidden_dim)
        self.init_proposal_boxes = nn.Embedding(cfg.num_proposals, 4)
        with torch.no_grad():
            self.init_proposal_boxes.weight.copy_(initial_proposal_boxes(cfg.num_proposals, cfg.proposal_init))
        self.head = DynamicHead(cfg, self.backbone.out_levels)
        loss = cfg.loss
        matcher = HungarianMatcher(loss.class_weight, loss.l1_weight, loss.giou_weight,
                                   "focal" if loss.use_focal else "softmax", loss.focal_alpha, loss.focal_gamma)
        self.criterion = SetCriterion(cfg.num_classes, matcher, loss.class_weight, loss.l1_weight,
                                      loss.giou_weight, loss.use_focal, loss.focal_alpha, loss.focal_gamma,
                                      loss.no_object_weight)

    def forward(self, images: Sequence[Tensor], targets: Optional[Sequence[dict]] = None,
                original_sizes: Optional[Sequence[tuple[int, int]]] = None):
        batch, image_sizes = preprocess_inputs(self, images, targets, original_sizes)
        features = list(self.backbone(batch).values())
        # stack/as_tensor rather than torch.tensor: under ONNX export the sizes are traced tensors.
        whwh = torch.stack([torch.stack([torch.as_tensor(v, dtype=batch.dtype, device=batch.device)
                                         for v in (w, h, w, h)]) for h, w in image_sizes])
        # Normalised (cx, cy, w, h) -> xyxy in each image's own un-padded pixels.
        cxcywh = self.init_proposal_boxes.weight
        xyxy = torch.cat((cxcywh[:, :2] - 0.5 * cxcywh[:, 2:], cxcywh[:, :2] + 0.5 * cxcywh[:, 2:]), dim=1)
        boxes = xyxy[None] * whwh[:, None, :]
        proposal_features = self.init_proposal_features.weight[None].expand(len(images), -1, -1)
        stage_outputs = self.head(features, boxes, proposal_features)

        if self.training:
            supervised = stage_outputs if self.cfg.loss.deep_supervision else stage_outputs[-1:]
            return self.criterion(supervised, [self._prepare_target(t, size) for t, size in zip(targets, whwh)])
        return self.postprocess(stage_outputs[-1], image_sizes, original_sizes)

    @staticmethod
    def _prepare_target(target: dict, image_size_whwh: Tensor) -> dict:
        device = image_size_whwh.device
        return {"boxes": target["boxes"].to(device=device, dtype=torch.float32),
                "labels": target["labels"].to(device=device, dtype=torch.int64),
                "image_size_whwh": image_size_whwh}

    @torch.no_grad()
    def postprocess(self, output: dict, image_sizes: Sequence[tuple[int, int]],
                    original_sizes: Optional[Sequence[tuple[int, int]]] = None) -> list[dict]:
        """Top-N (box, class) pairs over all N*C sigmoid scores per image (focal mode), or each
        proposal's best class (softmax mode). No score threshold, no NMS."""
        logits, boxes = output["pred_logits"], output["pred_boxes"]
        if original_sizes is not None and len(original_sizes) != len(image_sizes):
            raise ValueError(f"got {len(original_sizes)} original_sizes for {len(image_sizes)} images")
        results = []
        for i, (image_logits, image_boxes) in enumerate(zip(logits, boxes)):
            if self.cfg.loss.use_focal:
                scores, flat_index = image_logits.sigmoid().flatten().topk(self.num_proposals)
                labels = flat_index % self.num_classes
                image_boxes = image_boxes[torch.div(flat_index, self.num_classes, rounding_mode="floor")]
            else:
                scores, labels = image_logits.softmax(-1)[:, :-1].max(-1)
            image_boxes = rescale_boxes(image_boxes.float(), image_sizes[i],
                                        None if original_sizes is None else tuple(original_sizes[i]))
            keep = (image_boxes[:, 2] > image_boxes[:, 0]) & (image_boxes[:, 3] > image_boxes[:, 1])
            results.append({"boxes": image_boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return results
