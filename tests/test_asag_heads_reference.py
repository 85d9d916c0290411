"""ASAG heads against functional references written from the spec (§1.5, §3.1, §3.2).

Each reference reads the raw tensors of a state dict **by their official key names** (spec §6.4 -
§6.6) and recomputes the head step by step with torchvision's ``MultiScaleRoIAlign`` and explicit
per-head attention, so a wrong key, flatten order, residual or normalisation order in the modules
shows up as a mismatch. Tiny widths keep it fast.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import MultiScaleRoIAlign

from sparsedet.layers.box_ops import box_cxcywh_to_xyxy
from sparsedet.models.asag.adamixer import AdaMixerStage
from sparsedet.models.asag.iof_attention import padded_query_mask
from sparsedet.models.asag.relation_block import RelationBlock
from sparsedet.models.asag.sparse_stage import SparseStage

pytestmark = pytest.mark.usefixtures("single_thread")

D, C, HEADS = 32, 5, 8
STRIDES = (4, 8, 16, 32)
SIZES = torch.tensor([[64, 96], [50, 70]])          # un-padded (h, w); padded batch 64 x 96
VALID = torch.tensor([[True, True, True, False, False], [True, True, True, True, True]])


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(2, D, 64 // s, 96 // s, generator=g) for s in STRIDES]
    anchors = torch.zeros(2, 5, 4)
    for b, (h, w) in enumerate(SIZES.tolist()):
        ctr = torch.rand(5, 2, generator=g) * torch.tensor([w, h])
        wh = 3 + torch.rand(5, 2, generator=g) * torch.tensor([w, h]) * 0.6
        anchors[b] = torch.cat([ctr, wh], 1)
        anchors[b, ~VALID[b]] = torch.tensor([w / 2, h / 2, w, h])
    return feats, anchors


def randomized_state(module: torch.nn.Module, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return {k: v.clone() for k, v in module.state_dict().items()}


# --- functional pieces, by official key -------------------------------------------------------

def lin(s, key, x):
    return F.linear(x, s[key + ".weight"], s.get(key + ".bias"))


def ln(s, key, x):
    return F.layer_norm(x, (x.shape[-1],), s[key + ".weight"], s[key + ".bias"])


def tower(s, prefix, depth, x):
    for i in range(depth):
        x = F.gelu(ln(s, f"{prefix}.{3 * i + 1}", lin(s, f"{prefix}.{3 * i}", x)))
    return x


def pool(feats, boxes_xyxy):
    names = ["p2", "p3", "p4", "p5"]
    pooler = MultiScaleRoIAlign(names, 7, 2)
    return pooler(dict(zip(names, feats)), list(boxes_xyxy), [tuple(hw) for hw in SIZES.tolist()])


def spec_xyzr(anchors_px):
    """§1.5 step 3, from pixel cxcywh."""
    w, h = anchors_px[..., 2], anchors_px[..., 3]
    z = 0.5 * torch.log2(w * h / 16 + 1e-7)
    r = 0.5 * torch.log2(h / (w + 1e-7) + 1e-7)
    return torch.stack([anchors_px[..., 0] / 4, anchors_px[..., 1] / 4, z, r], -1)


def xyzr_wh(xyzr):
    return 2 ** (xyzr[..., 2] - xyzr[..., 3]), 2 ** (xyzr[..., 2] + xyzr[..., 3])


def spec_pe(xyzr):
    """§1.5 step 4: 64/4 = D/4 features per coordinate, sin on even / cos on odd, concatenated."""
    n = D // 4
    out = []
    for c, scale in enumerate((1000.0, 1000.0, 1.0, 1.0)):
        v = xyzr[..., c:c + 1] / scale
        i = torch.arange(n)
        angle = v / 10000 ** (2 * (i // 2) / n)
        out.append(torch.where(i % 2 == 0, torch.sin(angle), torch.cos(angle)))
    return torch.cat(out, -1)


def attention(s, prefix, x, bias, valid):
    """Multi-head attention with an additive (B, H, Q, Q) bias and the padded-query mask."""
    batch, q, d = x.shape
    hd = d // HEADS
    qkv = F.linear(x, s[prefix + ".in_proj_weight"], s[prefix + ".in_proj_bias"])
    qs, ks, vs = (t.reshape(batch, q, HEADS, hd).transpose(1, 2) for t in qkv.chunk(3, -1))
    logits = qs @ ks.transpose(-1, -2) / math.sqrt(hd) + bias
    blocked = valid[:, :, None] & ~valid[:, None, :]
    logits = logits.masked_fill(blocked[:, None], float("-inf"))
    out = (torch.softmax(logits, -1) @ vs).transpose(1, 2).reshape(batch, q, d)
    return lin(s, prefix + ".out_proj", out)


def iof_attention(s, prefix, tau_key, content, xyzr, valid):
    w, h = xyzr_wh(xyzr)
    x1, y1, x2, y2 = xyzr[..., 0] - w / 2, xyzr[..., 1] - h / 2, xyzr[..., 0] + w / 2, xyzr[..., 1] + h / 2
    iw = (torch.min(x2[:, :, None], x2[:, None]) - torch.max(x1[:, :, None], x1[:, None])).clamp(min=0)
    ih = (torch.min(y2[:, :, None], y2[:, None]) - torch.max(y1[:, :, None], y1[:, None])).clamp(min=0)
    iof = iw * ih / (w * h)[:, :, None]
    bias = s[tau_key].view(1, -1, 1, 1) * torch.log(iof + 1e-7)[:, None]
    x = content + spec_pe(xyzr)
    return attention(s, prefix, x, bias, valid) + x


def refine(xyzr, delta):
    return torch.cat([xyzr[..., :2] + delta[..., :2] * 2 ** xyzr[..., 2:3], xyzr[..., 2:] + delta[..., 2:]], -1)


def normalized_cxcywh(xyzr):
    w, h = xyzr_wh(xyzr)
    img_w, img_h = SIZES[:, 1, None].float(), SIZES[:, 0, None].float()
    return torch.stack([xyzr[..., 0] * 4 / img_w, xyzr[..., 1] * 4 / img_h, w * 4 / img_w, h * 4 / img_h], -1)


# --- references ---------------------------------------------------------------------------------

def reference_relation_block(s, feats, anchors):
    batch, q = anchors.shape[:2]
    rois = pool(feats, box_cxcywh_to_xyxy(anchors))                         # (B*Q, D, 7, 7)
    content = ln(s, "tokens_norm1", lin(s, "roi", rois.reshape(batch, q, D * 49)))  # channel-major
    xyzr = spec_xyzr(anchors)
    x = ln(s, "tokens_norm3", iof_attention(s, "attn", "iof_tau", content, xyzr, VALID))
    x = ln(s, "tokens_norm2", x + lin(s, "tokens_proj.layers.1", F.gelu(lin(s, "tokens_proj.layers.0", x))))
    logits = lin(s, "fc_cls", tower(s, "cls_fcs", 1, x))
    new_xyzr = refine(xyzr, lin(s, "fc_reg", tower(s, "reg_fcs", 3, x)))
    return {"logits": logits, "boxes": normalized_cxcywh(new_xyzr), "content": x, "xyzr": new_xyzr}


def reference_adamixer(s, feats, content, xyzr, groups=4, points=8, out_points=16):
    batch, q, _ = content.shape
    c = D // groups
    x = ln(s, "attention_norm", iof_attention(s, "attention", "iof_tau", content, xyzr, VALID))
    # 3-D sampling: offsets (point-major, point n = g * P + p), level weights, per-group grid_sample.
    off = lin(s, "sampling_n_mixing.sampling_offset_generator.0", x).view(batch, q, groups, points, 3)
    w, h = xyzr_wh(xyzr)
    px = (xyzr[..., 0, None, None] + off[..., 0] * w[..., None, None]) * 4
    py = (xyzr[..., 1, None, None] + off[..., 1] * h[..., None, None]) * 4
    pz = xyzr[..., 2, None, None] + off[..., 2]
    level_w = torch.softmax(torch.stack([-(pz - l) ** 2 / 2.0 for l in range(4)], -1), -1)
    sampled = torch.zeros(batch, q, groups, points, c)
    for level, (feat, stride) in enumerate(zip(feats, STRIDES)):
        height, width = feat.shape[-2:]
        for grp in range(groups):
            gx = 2 * px[:, :, grp] / (width * stride) - 1
            gy = 2 * py[:, :, grp] / (height * stride) - 1
            grid = torch.stack([gx, gy], -1)
            val = F.grid_sample(feat[:, grp * c:(grp + 1) * c], grid, align_corners=False)   # (B, c, Q, P)
            sampled[:, :, grp] += val.permute(0, 2, 3, 1) * level_w[:, :, grp, :, level, None]
    # Adaptive mixing.
    params = lin(s, "sampling_n_mixing.adaptive_mixing.parameter_generator.0", x).view(batch, q, groups, -1)
    m = params[..., :c * c].reshape(batch, q, groups, c, c)
    sm = params[..., c * c:].reshape(batch, q, groups, out_points, points)
    y = torch.einsum("bqgpc,bqgcd->bqgpd", sampled, m)
    y = F.gelu(F.layer_norm(y, y.shape[-2:]))
    y = torch.einsum("bqgop,bqgpd->bqgod", sm, y)
    y = F.gelu(F.layer_norm(y, y.shape[-2:]))
    x = ln(s, "sampling_n_mixing.norm", x + lin(s, "sampling_n_mixing.adaptive_mixing.out_proj", y.flatten(2)))
    x = ln(s, "ffn_norm", x + lin(s, "ffn.layers.1", F.gelu(lin(s, "ffn.layers.0", x))))
    logits = lin(s, "fc_cls", tower(s, "cls_fcs", 1, x))
    new_xyzr = refine(xyzr, lin(s, "fc_reg", tower(s, "reg_fcs", 3, x)))
    return {"logits": logits, "boxes": normalized_cxcywh(new_xyzr), "content": x}


def reference_sparse_stage(s, feats, content, boxes, dim_dynamic=8):
    batch, q, _ = content.shape
    whwh = torch.stack([SIZES[:, 1], SIZES[:, 0], SIZES[:, 1], SIZES[:, 0]], -1).float()[:, None]
    rois = pool(feats, box_cxcywh_to_xyxy(boxes) * whwh)
    x = ln(s, "norm1", content + attention(s, "self_attn", content, torch.zeros(1), VALID))   # no PE, no IoF
    params = lin(s, "inst_interact.dynamic_layer", x).reshape(batch * q, -1)
    w1 = params[:, :D * dim_dynamic].view(-1, D, dim_dynamic)
    w2 = params[:, D * dim_dynamic:].view(-1, dim_dynamic, D)
    f = rois.flatten(2).transpose(1, 2)                                     # (B*Q, 49, D)
    f = F.relu(ln(s, "inst_interact.norm1", f @ w1))
    f = F.relu(ln(s, "inst_interact.norm2", f @ w2))
    f = F.relu(ln(s, "inst_interact.norm3", lin(s, "inst_interact.out_layer", f.flatten(1))))  # spatial-major
    x = ln(s, "norm2", x + f.view(batch, q, D))
    x = ln(s, "norm3", x + lin(s, "linear2", F.gelu(lin(s, "linear1", x))))
    logits = lin(s, "class_logits", tower(s, "cls_module", 1, x))
    d = lin(s, "bboxes_delta", tower(s, "reg_module", 3, x))
    cx = boxes[..., 0] + d[..., 0] / 2 * boxes[..., 2]
    cy = boxes[..., 1] + d[..., 1] / 2 * boxes[..., 3]
    clamp = math.log(100000.0 / 16)
    w = boxes[..., 2] * torch.exp(d[..., 2].clamp(max=clamp))
    h = boxes[..., 3] * torch.exp(d[..., 3].clamp(max=clamp))
    return {"logits": logits, "boxes": torch.stack([cx, cy, w, h], -1), "content": x}


def assert_valid_close(got, expected, keys):
    for key in keys:
        torch.testing.assert_close(got[key][VALID], expected[key][VALID], atol=2e-4, rtol=2e-4, msg=key)


# --- tests ----------------------------------------------------------------------------------------

def test_relation_block_matches_spec_reference():
    block = RelationBlock(C, d_model=D, dim_feedforward=48).eval()
    s = randomized_state(block, 1)
    feats, anchors = inputs(1)
    with torch.no_grad():
        got = block(feats, anchors, SIZES, VALID)
        expected = reference_relation_block(s, feats, anchors)
    assert_valid_close(got, expected, ("logits", "boxes", "content", "xyzr"))


def test_adamixer_stage_matches_spec_reference():
    stage = AdaMixerStage(C, D, dim_feedforward=48, in_points=8, out_points=16, num_groups=4).eval()
    s = randomized_state(stage, 2)
    feats, anchors = inputs(2)
    g = torch.Generator().manual_seed(3)
    content = torch.randn(2, 5, D, generator=g)
    xyzr = spec_xyzr(anchors)
    with torch.no_grad():
        got = stage(feats, content, xyzr, SIZES, padded_query_mask(VALID, HEADS))
        expected = reference_adamixer(s, feats, content, xyzr)
    assert_valid_close(got, expected, ("logits", "boxes", "content"))


def test_sparse_stage_matches_spec_reference():
    stage = SparseStage(C, D, dim_feedforward=48, dim_dynamic=8).eval()
    s = randomized_state(stage, 4)
    feats, anchors = inputs(4)
    g = torch.Generator().manual_seed(5)
    content = torch.randn(2, 5, D, generator=g)
    whwh = torch.stack([SIZES[:, 1], SIZES[:, 0], SIZES[:, 1], SIZES[:, 0]], -1).float()[:, None]
    boxes = anchors / whwh
    with torch.no_grad():
        got = stage(feats, content, boxes, SIZES, padded_query_mask(VALID, HEADS))
        expected = reference_sparse_stage(s, feats, content, boxes)
    assert_valid_close(got, expected, ("logits", "boxes", "content"))
