"""Optional denoising queries (DN-DETR style, spec section 2.6; off by default).

In training, ``num_queries`` noised copies of the ground-truth boxes are put in front of the
anchors (the image's boxes repeated ``num_queries // M`` times, the rest whole-image fillers; all
fillers when M = 0 or M > num_queries). They get RoIAlign content like anchors. Each copy is paired
with its ground-truth box (no matching) and trained with the same weighted losses.
Attention: matching queries never see dn queries, dn groups do not see each other, fillers do not
see real dn queries, and no valid query sees a padded anchor.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ...layers.box_ops import box_cxcywh_to_xyxy, box_iou, elementwise_generalized_box_iou
from .config import ASAGLossConfig, DenoisingConfig
from .query_weighting import area_weight, negative_weight, positive_weight


class DenoisingQueries(nn.Module):
    """``forward(anchors (B, Q, 4) pixel cxcywh, valid (B, Q), targets, sizes (B, 2) (h, w), step)``
    -> ``(anchors (B, N+Q, 4), valid (B, N+Q), blocked (B*heads, N+Q, N+Q) bool, N)``; the dn
    pairing of the call is kept in ``last_pairs``: per image ``(dn_index, target_index)``."""

    def __init__(self, cfg: DenoisingConfig, iters_per_epoch: int, num_attention_heads: int = 8):
        super().__init__()
        self.cfg = cfg
        self.iters_per_epoch = max(1, iters_per_epoch)
        self.num_attention_heads = num_attention_heads
        self.last_pairs: list[tuple[Tensor, Tensor]] = []

    def noise_scale(self, step: int) -> float:
        if self.cfg.fix_noise_scale:
            return self.cfg.noise_scale
        return max(0.0, 2 * self.cfg.noise_scale - 0.04 * (step // self.iters_per_epoch))

    def forward(self, anchors: Tensor, valid: Tensor, targets: Sequence[dict], sizes: Tensor, step: int):
        n = self.cfg.num_queries
        batch, q = valid.shape
        device = anchors.device
        scale = self.noise_scale(step)
        dn_boxes, pairs, groups = [], [], []
        for b, target in enumerate(targets):
            gt = target["boxes_cxcywh"].to(device)
            m = len(gt)
            boxes = torch.tensor([[0.5, 0.5, 1.0, 1.0]], device=device).repeat(n, 1)
            group = torch.full((n,), -1, dtype=torch.int64, device=device)     # -1 = filler
            if 0 < m <= n:
                repeats = n // m
                boxes[:repeats * m] = gt.repeat(repeats, 1)
                group[:repeats * m] = torch.arange(repeats, device=device).repeat_interleave(m)
                pairs.append((torch.arange(repeats * m, device=device), torch.arange(m, device=device).repeat(repeats)))
            else:
                pairs.append((torch.empty(0, dtype=torch.int64, device=device),) * 2)
            real = group >= 0
            noise = torch.rand(n, 4, device=device) * 2 - 1
            shift = torch.cat((boxes[:, 2:] / 2, boxes[:, 2:]), dim=1) * noise * scale
            boxes = torch.where(real[:, None], (boxes + shift).clamp(0, 1), boxes)
            h, w = sizes[b].tolist()
            dn_boxes.append(boxes * boxes.new_tensor([w, h, w, h]))
            groups.append(group)
        self.last_pairs = pairs
        all_anchors = torch.cat((torch.stack(dn_boxes), anchors), dim=1)
        all_valid = torch.cat((torch.ones(batch, n, dtype=torch.bool, device=device), valid), dim=1)
        blocked = torch.stack([self._mask(g, v) for g, v in zip(groups, valid)])
        blocked = blocked.repeat_interleave(self.num_attention_heads, dim=0)
        return all_anchors, all_valid, blocked, n

    @staticmethod
    def _mask(group: Tensor, valid: Tensor) -> Tensor:
        """(N+Q, N+Q) bool, True = blocked, for one image."""
        n, q = len(group), len(valid)
        total = n + q
        blocked = torch.zeros(total, total, dtype=torch.bool, device=valid.device)
        blocked[n:, :n] = True                                           # matching queries never see dn
        real = group >= 0
        other_group = group[:, None] != group[None, :]
        blocked[:n, :n] = (real[:, None] & other_group) | (~real[:, None] & real[None, :])
        padded = torch.cat((torch.zeros(n, dtype=torch.bool, device=valid.device), ~valid))
        rows_valid = torch.cat((torch.ones(n, dtype=torch.bool, device=valid.device), valid))
        blocked |= rows_valid[:, None] & padded[None, :]
        blocked[~rows_valid] = False                                     # padded rows stay open (no NaN)
        return blocked


def denoising_losses(logits: Tensor, boxes: Tensor, pairs: Sequence[tuple[Tensor, Tensor]],
                     targets: Sequence[dict], cfg: ASAGLossConfig) -> dict[str, Tensor]:
    """Unweighted ``loss_ce``, ``loss_bbox``, ``loss_giou`` of the dn queries of one output, with
    the fixed pairing, normalised by N * B. Classification covers the real (non-filler) dn queries.

    Args:
        logits: (B, N, C); boxes: (B, N, 4) normalised cxcywh.
    """
    batch, n = logits.shape[:2]
    norm = float(n * batch)
    b_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(pairs)])
    q_idx = torch.cat([q for q, _ in pairs])
    labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, pairs)])
    tgt = torch.cat([t["boxes_cxcywh"][j] for t, (_, j) in zip(targets, pairs)]).to(boxes)
    pred = boxes[b_idx, q_idx]
    pair_logits = logits[b_idx, q_idx, labels]
    with torch.no_grad():
        weight = area_weight(tgt, cfg.area_weight)
        iou = box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(tgt)).diagonal() if len(tgt) else tgt.new_zeros(0)
        score = pair_logits.sigmoid()
        w_pos = positive_weight(score, iou, cfg.gamma1, cfg.gamma2) if cfg.query_weighting else torch.ones_like(iou)
        w_neg = negative_weight(score, iou, cfg.gamma1, cfg.gamma2) if cfg.query_weighting else torch.zeros_like(iou)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    real = logits[b_idx, q_idx]                                                  # (K, C)
    negative = bce(real, torch.zeros_like(real), reduction="none") * real.sigmoid() ** 2
    positive = (w_pos * bce(pair_logits, torch.ones_like(pair_logits), reduction="none")
                + w_neg * bce(pair_logits, torch.zeros_like(pair_logits), reduction="none")) * weight
    rows = torch.arange(len(labels), device=logits.device)
    loss_ce = (negative.sum() - negative[rows, labels].sum() + positive.sum()) / norm
    loss_bbox = ((pred - tgt).abs().sum(-1) * w_pos * weight).sum() / norm
    giou = elementwise_generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(tgt))
    loss_giou = ((1 - giou) * w_pos * weight).sum() / norm
    if len(labels) == 0:
        zero = logits.sum() * 0 + boxes.sum() * 0
        return {"loss_ce": zero, "loss_bbox": zero, "loss_giou": zero}
    return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}
