"""ASAG query and decoder heads: box encodings, IoF attention, padded-query masking, AdaMixer
sampling and mixing against slow references, parameter counts and keys against spec §3 / §6."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import MultiScaleRoIAlign

from sparsedet.layers import BoxCoder
from sparsedet.layers.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from sparsedet.models.asag.adamixer import AdaMixerStage
from sparsedet.models.asag.adaptive_mixing import AdaptiveMixing
from sparsedet.models.asag.box_encoding import (
    cxcywh_to_xyzr, image_whwh, refine_xyzr, sine_position_encoding, xyxy_to_xyzr, xyzr_to_normalized_cxcywh,
    xyzr_to_xyxy,
)
from sparsedet.models.asag.decoder import ParallelDecoder
from sparsedet.models.asag.iof_attention import (
    iof_attention_bias, iof_self_attention, padded_query_mask, pairwise_iof,
)
from sparsedet.models.asag.relation_block import RelationBlock, asag_roi_pooler
from sparsedet.models.asag.sampling_3d import level_weights, make_sample_points, sampling_3d
from sparsedet.models.asag.sparse_stage import SparseStage

pytestmark = pytest.mark.usefixtures("single_thread")

D, C = 32, 5                  # tiny width and class count for behaviour tests
STRIDES = (4, 8, 16, 32)
PADDED_HW = (64, 96)          # padded batch size (multiple of 32)


def pyramid(batch: int, seed: int = 0, hw=PADDED_HW, channels: int = D) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, hw[0] // s, hw[1] // s, generator=g) for s in STRIDES]


def tiny_decoder(kind: str, num_heads: int = 4) -> ParallelDecoder:
    return ParallelDecoder(kind, C, num_heads=num_heads, content_dim=D, dim_feedforward=48,
                           adamixer_points=(8, 16, 4)).eval()


def tiny_relation_block() -> RelationBlock:
    return RelationBlock(C, d_model=D, dim_feedforward=48).eval()


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial weights everywhere (the official init zeroes the box regressors and the mixing
    generator, which would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


# ---------------------------------------------------------------------------------------------
# Box encodings
# ---------------------------------------------------------------------------------------------

def test_xyzr_hand_values_and_round_trip():
    # A 16 x 16 px box centred at (40, 20): centre (10, 5) in stride-4 units, side 4 = 2^2, square.
    xyzr = cxcywh_to_xyzr(torch.tensor([[40.0, 20.0, 16.0, 16.0]]))
    torch.testing.assert_close(xyzr, torch.tensor([[10.0, 5.0, 2.0, 0.0]]), atol=1e-5, rtol=0)
    # 32 wide x 8 high: geometric mean 16 px = 4 units (z = 2), h / w = 1/4 -> r = -1.
    xyzr = cxcywh_to_xyzr(torch.tensor([[40.0, 20.0, 32.0, 8.0]]))
    torch.testing.assert_close(xyzr, torch.tensor([[10.0, 5.0, 2.0, -1.0]]), atol=1e-5, rtol=0)

    g = torch.Generator().manual_seed(0)
    xyxy = torch.rand(50, 2, generator=g) * 300
    xyxy = torch.cat([xyxy, xyxy + 2 + torch.rand(50, 2, generator=g) * 400], dim=1)
    back = xyzr_to_xyxy(xyxy_to_xyzr(xyxy)) * 4
    torch.testing.assert_close(back, xyxy, atol=1e-2, rtol=1e-4)
    cxcywh = box_xyxy_to_cxcywh(xyxy)
    torch.testing.assert_close(xyzr_to_xyxy(cxcywh_to_xyzr(cxcywh)) * 4, xyxy, atol=1e-2, rtol=1e-4)


def test_xyzr_to_normalized_cxcywh_and_refine():
    sizes = torch.tensor([[100, 200]])                  # h = 100, w = 200
    assert image_whwh(sizes).tolist() == [[[200.0, 100.0, 200.0, 100.0]]]
    xyzr = torch.tensor([[[25.0, 12.5, 3.0, 0.0]]])     # centre (100, 50) px, side 8 units = 32 px
    torch.testing.assert_close(xyzr_to_normalized_cxcywh(xyzr, image_whwh(sizes)),
                               torch.tensor([[[0.5, 0.5, 0.16, 0.32]]]))
    # Centre moves by delta * 2^z (the box side), z and r are shifted.
    new = refine_xyzr(xyzr, torch.tensor([[[0.5, -0.25, 1.0, 0.5]]]))
    torch.testing.assert_close(new, torch.tensor([[[29.0, 10.5, 4.0, 0.5]]]))


def test_sine_position_encoding_matches_definition():
    g = torch.Generator().manual_seed(0)
    xyzr = torch.randn(2, 3, 4, generator=g) * torch.tensor([300.0, 300.0, 3.0, 1.0])
    pe = sine_position_encoding(xyzr, 8)
    assert pe.shape == (2, 3, 32)
    scaled = xyzr / torch.tensor([1000.0, 1000.0, 1.0, 1.0])
    for b in range(2):
        for q in range(3):
            for coord in range(4):
                for i in range(8):
                    angle = scaled[b, q, coord].item() / 10000 ** (2 * (i // 2) / 8)
                    expected = math.sin(angle) if i % 2 == 0 else math.cos(angle)
                    assert pe[b, q, coord * 8 + i].item() == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# IoF attention and the padded-query mask
# ---------------------------------------------------------------------------------------------

def test_iof_hand_boxes_and_bias_values():
    # xyxy in stride-4 units: A = [0, 4] x [0, 4], B = [2, 6] x [0, 4] (half of A), C = [0, 8]^2 covers A and B.
    boxes = torch.tensor([[[0.0, 0.0, 4.0, 4.0], [2.0, 0.0, 6.0, 4.0], [0.0, 0.0, 8.0, 8.0], [20.0, 20.0, 21.0, 21.0]]])
    iof = pairwise_iof(boxes)[0]
    expected = torch.tensor([
        [1.0, 0.5, 1.0, 0.0],
        [0.5, 1.0, 1.0, 0.0],          # B lies inside C
        [0.25, 0.25, 1.0, 0.0],        # |A ∩ C| / |C| = |B ∩ C| / |C| = 16 / 64
        [0.0, 0.0, 0.0, 1.0],
    ])
    torch.testing.assert_close(iof, expected)

    xyzr = xyxy_to_xyzr(boxes * 4)
    tau = torch.tensor([0.0, 1.0, 2.5])
    valid = torch.tensor([[True, True, True, False]])
    bias = iof_attention_bias(xyzr, tau, padded_query_mask(valid, 3))
    assert bias.shape == (3, 4, 4)
    for h in range(3):
        for i in range(4):
            for j in range(4):
                if valid[0, i] and not valid[0, j]:
                    assert bias[h, i, j] == float("-inf")
                else:
                    value = tau[h].item() * math.log(expected[i, j].item() + 1e-7)
                    assert bias[h, i, j].item() == pytest.approx(value, rel=1e-4, abs=1e-4)


def test_padded_query_mask_layout():
    valid = torch.tensor([[True, True, False], [True, True, True], [True, False, False]])
    mask = padded_query_mask(valid, num_heads=2)
    assert mask.shape == (6, 3, 3)
    assert not mask.all(dim=-1).any(), "no row may be fully blocked (NaN softmax)"
    for b in range(3):
        for h in range(2):
            m = mask[b * 2 + h]                       # batch-major, then head
            for i in range(3):
                for j in range(3):
                    assert bool(m[i, j]) == bool(valid[b, i] and not valid[b, j])


def test_iof_self_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    heads, batch, q = 2, 2, 4
    attention = torch.nn.MultiheadAttention(8, heads)
    tau = torch.tensor([0.7, 2.0])
    content = torch.randn(batch, q, 8)
    xyzr = torch.cat([torch.rand(batch, q, 2) * 20, torch.rand(batch, q, 1) * 3, torch.randn(batch, q, 1) * 0.3], -1)
    valid = torch.tensor([[True, True, True, False], [True, True, False, False]])
    got = iof_self_attention(attention, tau, content, xyzr, padded_query_mask(valid, heads))

    x = content + sine_position_encoding(xyzr, 2)
    w_q, w_k, w_v = attention.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attention.in_proj_bias.chunk(3)
    iof = pairwise_iof(xyzr_to_xyxy(xyzr))
    expected = torch.empty_like(content)
    for b in range(batch):
        qs, ks, vs = x[b] @ w_q.T + b_q, x[b] @ w_k.T + b_k, x[b] @ w_v.T + b_v
        per_head = []
        for h in range(heads):
            sl = slice(4 * h, 4 * h + 4)
            logits = qs[:, sl] @ ks[:, sl].T / 2.0 + tau[h] * torch.log(iof[b] + 1e-7)
            logits[valid[b][:, None] & ~valid[b][None, :]] = float("-inf")
            per_head.append(torch.softmax(logits, -1) @ vs[:, sl])
        expected[b] = torch.cat(per_head, -1) @ attention.out_proj.weight.T + attention.out_proj.bias + x[b]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# RoI pooling semantics
# ---------------------------------------------------------------------------------------------

def test_asag_pooler_equals_torchvision_multiscale_roi_align():
    feats = pyramid(2, hw=(512, 640), channels=3)
    g = torch.Generator().manual_seed(3)
    boxes = []
    for _ in range(2):
        xy = torch.rand(30, 2, generator=g) * 400
        wh = torch.exp(torch.rand(30, 2, generator=g) * 6)       # 1 px .. 400 px: every level
        boxes.append(torch.cat([xy, xy + wh], dim=1))
    boxes[0][0] = torch.tensor([10.0, 10.0, 122.0, 122.0])        # sqrt(area) exactly 112: level boundary
    reference = MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], 7, 2)(
        dict(zip(["p2", "p3", "p4", "p5"], feats)), boxes, [(500, 630), (480, 600)])
    torch.testing.assert_close(asag_roi_pooler()(feats, boxes), reference)


# ---------------------------------------------------------------------------------------------
# AdaMixer sampling and mixing against slow references
# ---------------------------------------------------------------------------------------------

def bilinear_zero_padded(image: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """(C, H, W) map sampled at pixel-centre coordinates (x, y) (align_corners=False: pixel k has
    its centre at k + 0.5), zero outside."""
    channels, height, width = image.shape
    u, v = x - 0.5, y - 0.5
    x0, y0 = math.floor(u), math.floor(v)
    out = torch.zeros(channels)
    for yy, wy in ((y0, 1 - (v - y0)), (y0 + 1, v - y0)):
        for xx, wx in ((x0, 1 - (u - x0)), (x0 + 1, u - x0)):
            if 0 <= xx < width and 0 <= yy < height:
                out += wx * wy * image[:, yy, xx]
    return out


def test_level_weights_definition():
    z = torch.tensor([0.0, 1.5, 3.0, -2.0])
    w = level_weights(z, 4, tau=2.0)
    expected = torch.softmax(-(z[:, None] - torch.arange(4.0)) ** 2 / 2.0, dim=-1)
    torch.testing.assert_close(w, expected)
    torch.testing.assert_close(w.sum(-1), torch.ones(4))
    assert w[2].argmax() == 3 and w[3].argmax() == 0


def test_sampling_3d_matches_per_point_bilinear_reference():
    groups, points_per_group, batch, q = 2, 3, 2, 3
    feats = pyramid(batch, seed=4, hw=(64, 96), channels=8)        # 4 channels per group
    g = torch.Generator().manual_seed(5)
    xyzr = torch.cat([torch.rand(batch, q, 1, generator=g) * 24, torch.rand(batch, q, 1, generator=g) * 16,
                      torch.rand(batch, q, 1, generator=g) * 3, torch.randn(batch, q, 1, generator=g) * 0.3], -1)
    offsets = torch.randn(batch, q, groups * points_per_group * 3, generator=g)
    points = make_sample_points(offsets, xyzr)
    got = sampling_3d(points, feats, STRIDES, groups)
    assert got.shape == (batch, q, groups, points_per_group, 4)

    for b in range(batch):
        for i in range(q):
            x, y, z, r = xyzr[b, i].tolist()
            w, h = 2 ** (z - r), 2 ** (z + r)
            for grp in range(groups):
                for p in range(points_per_group):
                    n = grp * points_per_group + p
                    dx, dy, dz = offsets[b, i, 3 * n: 3 * n + 3].tolist()
                    px, py, pz = (x + dx * w) * 4, (y + dy * h) * 4, z + dz     # pixels, level index
                    weights = torch.softmax(torch.tensor([-(pz - l) ** 2 / 2.0 for l in range(4)]), 0)
                    expected = torch.zeros(4)
                    for level, (feat, stride) in enumerate(zip(feats, STRIDES)):
                        channels = feat[b, 4 * grp: 4 * grp + 4]
                        expected += weights[level] * bilinear_zero_padded(channels, px / stride, py / stride)
                    torch.testing.assert_close(got[b, i, grp, p], expected, atol=1e-5, rtol=1e-5)


def test_adaptive_mixing_matches_per_query_reference():
    torch.manual_seed(0)
    mixing = AdaptiveMixing(in_dim=8, in_points=3, out_points=5, num_groups=2, query_dim=6, activation="gelu")
    randomize(mixing)
    sampled, query = torch.randn(2, 3, 2, 3, 4), torch.randn(2, 3, 6)
    got = mixing(sampled, query)
    for b in range(2):
        for i in range(3):
            params = mixing.parameter_generator(query[b, i]).view(2, -1)
            mixed = []
            for grp in range(2):
                m = params[grp, :16].view(4, 4)                  # in x out
                s = params[grp, 16:].view(5, 3)                  # out points x in points
                x = sampled[b, i, grp] @ m
                x = F.gelu((x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-5))
                x = s @ x
                x = F.gelu((x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-5))
                mixed.append(x.flatten())
            expected = query[b, i] + mixing.out_proj(torch.cat(mixed))
            torch.testing.assert_close(got[b, i], expected, atol=1e-5, rtol=1e-5)


def test_sampling_offsets_initialisation():
    stage = AdaMixerStage(C, D, dim_feedforward=48, in_points=8, out_points=16, num_groups=4)
    linear = stage.sampling_n_mixing.sampling_offset_generator[0]
    assert torch.all(linear.weight == 0)
    bias = linear.bias.view(4, 8, 3)
    assert torch.all(bias[..., 2] == -1.0) and bias[..., :2].abs().max() <= 0.5
    assert torch.all(stage.sampling_n_mixing.adaptive_mixing.parameter_generator[0].weight == 0)
    assert torch.all(stage.fc_reg.weight == 0) and torch.all(stage.fc_reg.bias == 0)
    torch.testing.assert_close(stage.fc_cls.bias, torch.full((C,), -math.log(99.0)))
    assert 0 <= stage.iof_tau.min() and stage.iof_tau.max() <= 4


# ---------------------------------------------------------------------------------------------
# Padded queries never change valid ones: one padded batch == separate images
# ---------------------------------------------------------------------------------------------

SIZES = torch.tensor([[64, 96], [50, 70], [60, 80]])       # un-padded (h, w); batch padded to 64 x 96
NUM_VALID = [2, 4, 3]


def padded_anchors() -> tuple[torch.Tensor, torch.Tensor]:
    """(3, 4, 4) pixel cxcywh anchors, each image padded with whole-image boxes, and the valid mask."""
    g = torch.Generator().manual_seed(7)
    q = max(NUM_VALID)
    anchors = torch.zeros(3, q, 4)
    valid = torch.zeros(3, q, dtype=torch.bool)
    for b, (n, (h, w)) in enumerate(zip(NUM_VALID, SIZES.tolist())):
        wh = 4 + torch.rand(n, 2, generator=g) * torch.tensor([w / 2, h / 2])
        ctr = torch.rand(n, 2, generator=g) * torch.tensor([w, h])
        anchors[b, :n] = torch.cat([ctr, wh], 1)
        anchors[b, n:] = torch.tensor([w / 2, h / 2, w, h])
        valid[b, :n] = True
    return anchors, valid


def run_pipeline(block, decoder, feats, anchors, sizes, valid):
    rpn = block(feats, anchors, sizes, valid)
    return rpn, decoder(feats, rpn["content"], decoder.initial_boxes(rpn), sizes, valid)


@pytest.mark.parametrize("kind", ["adamixer", "sparse_rcnn"])
def test_batch_of_three_padded_equals_three_batches_of_one(kind):
    torch.manual_seed(0)
    block, decoder = tiny_relation_block(), tiny_decoder(kind)
    randomize(block, 1)
    randomize(decoder, 2)
    feats = pyramid(3, seed=8)
    anchors, valid = padded_anchors()
    with torch.no_grad():
        rpn, heads = run_pipeline(block, decoder, feats, anchors, SIZES, valid)
        for b, n in enumerate(NUM_VALID):
            single = [f[b:b + 1] for f in feats]
            rpn1, heads1 = run_pipeline(block, decoder, single, anchors[b:b + 1, :n], SIZES[b:b + 1],
                                        valid[b:b + 1, :n])
            for key in ("logits", "boxes", "content", "xyzr"):
                torch.testing.assert_close(rpn[key][b, :n], rpn1[key][0], atol=1e-5, rtol=1e-5)
            for out, out1 in zip(heads, heads1):
                for key in ("logits", "boxes", "content"):
                    torch.testing.assert_close(out[key][b, :n], out1[key][0], atol=1e-5, rtol=1e-5)
    # The padded queries themselves produce finite values (their rows are left open).
    assert all(torch.isfinite(out["logits"]).all() and torch.isfinite(out["boxes"]).all() for out in heads)


@pytest.mark.parametrize("kind", ["adamixer", "sparse_rcnn"])
def test_padded_query_content_cannot_leak(kind):
    """Changing a padded query's box changes nothing for the valid queries."""
    block, decoder = tiny_relation_block(), tiny_decoder(kind, num_heads=1)
    randomize(block, 3)
    randomize(decoder, 4)
    feats = pyramid(3, seed=9)
    anchors, valid = padded_anchors()
    moved = anchors.clone()
    moved[0, 2:] = torch.tensor([20.0, 20.0, 30.0, 12.0])   # image 0's padded rows now overlap its anchors
    with torch.no_grad():
        _, a = run_pipeline(block, decoder, feats, anchors, SIZES, valid)
        _, b = run_pipeline(block, decoder, feats, moved, SIZES, valid)
    torch.testing.assert_close(a[0]["logits"][valid], b[0]["logits"][valid], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[0]["logits"][0, 2:], b[0]["logits"][0, 2:])


# ---------------------------------------------------------------------------------------------
# Decoder and stages
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["adamixer", "sparse_rcnn"])
def test_decoder_heads_are_parallel_and_selectable(kind):
    block, decoder = tiny_relation_block(), tiny_decoder(kind)
    randomize(decoder, 5)
    feats = pyramid(3, seed=10)
    anchors, valid = padded_anchors()
    with torch.no_grad():
        rpn, every = run_pipeline(block, decoder, feats, anchors, SIZES, valid)
        init = rpn["xyzr"] if kind == "adamixer" else rpn["boxes"]
        only = decoder(feats, rpn["content"], init, SIZES, valid, heads=[2])
        # Head k equals its stage applied directly to (content + embedding k) and the same boxes.
        direct = decoder.heads[1](feats, rpn["content"] + decoder.decoder_embedding.weight[1], init, SIZES,
                                  padded_query_mask(valid, 8))
    assert [o["name"] for o in every] == ["aux_0", "aux_1", "aux_2", "main"]
    assert [o["head"] for o in only] == [2] and only[0]["name"] == "aux_2"
    torch.testing.assert_close(only[0]["logits"], every[2]["logits"])
    torch.testing.assert_close(direct["boxes"], every[1]["boxes"])
    assert not torch.allclose(every[0]["logits"], every[3]["logits"])


@pytest.mark.parametrize("kind", ["adamixer", "sparse_rcnn"])
def test_no_query_at_all_gives_empty_outputs(kind):
    block, decoder = tiny_relation_block(), tiny_decoder(kind, num_heads=2)
    with torch.no_grad():
        rpn, heads = run_pipeline(block, decoder, pyramid(3), torch.zeros(3, 0, 4), SIZES,
                                  torch.zeros(3, 0, dtype=torch.bool))
    assert rpn["logits"].shape == (3, 0, C) and rpn["xyzr"].shape == (3, 0, 4)
    assert [(h["logits"].shape, h["boxes"].shape) for h in heads] == [((3, 0, C), (3, 0, 4))] * 2


def test_decoder_bad_inputs_name_the_key():
    with pytest.raises(ValueError, match="model.decoder_type"):
        ParallelDecoder("transformer", C)
    with pytest.raises(ValueError, match="model.activation"):
        ParallelDecoder("adamixer", C, content_dim=D, dim_feedforward=48, activation="tanh",
                        adamixer_points=(8, 16, 4))
    adamixer = tiny_decoder("adamixer", num_heads=1)
    anchors, valid = padded_anchors()
    xyzr = cxcywh_to_xyzr(anchors)
    with pytest.raises(ValueError, match="expects 4 feature maps"):
        adamixer(pyramid(3)[:3], torch.zeros(3, 4, D), xyzr, SIZES, valid)
    decoder = tiny_decoder("sparse_rcnn", num_heads=2)
    with pytest.raises(ValueError, match="head 3 does not exist.*aux_0, main"):
        decoder(pyramid(3), torch.zeros(3, 4, D), torch.rand(3, 4, 4), SIZES, valid, heads=[3])


def test_gradients_reach_content_but_not_initial_boxes():
    block, decoder = tiny_relation_block().train(), tiny_decoder("adamixer", num_heads=2).train()
    randomize(block, 6)
    feats = [f.requires_grad_() for f in pyramid(3, seed=11)]
    anchors, valid = padded_anchors()
    rpn, heads = run_pipeline(block, decoder, feats, anchors, SIZES, valid)
    assert not rpn["xyzr"].requires_grad
    sum(h["logits"].sum() + h["boxes"].sum() for h in heads).backward()
    assert block.roi.weight.grad.abs().sum() > 0, "decoder losses train the relation block through the content"
    assert decoder.decoder_embedding.weight.grad.abs().sum() > 0
    assert feats[0].grad.abs().sum() > 0


def test_sparse_stage_decodes_normalized_cxcywh_like_the_pixel_coder():
    coder = BoxCoder((2.0, 2.0, 1.0, 1.0), math.log(100000.0 / 16))
    g = torch.Generator().manual_seed(12)
    ref = torch.cat([torch.rand(20, 2, generator=g), 0.05 + torch.rand(20, 2, generator=g) * 0.5], 1)
    deltas = torch.randn(20, 4, generator=g)
    deltas[0, 2] = 50.0                                         # clamped at log(1e5 / 16)
    got = coder.decode_cxcywh(deltas, ref)
    via_xyxy = box_xyxy_to_cxcywh(coder.decode(deltas, box_cxcywh_to_xyxy(ref)))
    # (Row 0's huge box loses precision through xyxy; the direct cxcywh decode does not.)
    torch.testing.assert_close(got[1:], via_xyxy[1:], atol=1e-5, rtol=1e-5)
    assert got[0, 0].item() == pytest.approx(ref[0, 0].item() + deltas[0, 0].item() / 2 * ref[0, 2].item(), abs=1e-6)
    assert got[0, 2].item() == pytest.approx(ref[0, 2].item() * 100000.0 / 16, rel=1e-5)
    # cx' = cx + dx / 2 * w
    assert got[1, 0].item() == pytest.approx(ref[1, 0].item() + deltas[1, 0].item() / 2 * ref[1, 2].item(), abs=1e-6)


def test_sparse_stage_uses_gelu_and_keeps_dynamic_conv_relu():
    stage = SparseStage(C, D, dim_feedforward=48, dim_dynamic=8)
    assert isinstance(stage.activation, torch.nn.GELU)
    assert isinstance(stage.cls_module[2], torch.nn.GELU) and isinstance(stage.reg_module[8], torch.nn.GELU)
    assert isinstance(stage.inst_interact.activation, torch.nn.ReLU)
    assert torch.all(stage.bboxes_delta.weight == 0)


# ---------------------------------------------------------------------------------------------
# Sizes and state-dict keys of the full-size modules (spec §3, §6.4-§6.6, C = 80)
# ---------------------------------------------------------------------------------------------

def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_match_spec():
    assert count(AdaMixerStage(80)) == 18_510_300
    assert count(SparseStage(80)) == 13_235_412
    assert count(RelationBlock(80)) == 4_812_892
    one_head = ParallelDecoder("sparse_rcnn", 80, num_heads=1)
    assert count(one_head) == 13_235_412 + 256


SPEC_RPN_SHAPES = {
    "iof_tau": (8,), "roi.weight": (256, 12544), "roi.bias": (256,), "tokens_norm1.weight": (256,),
    "tokens_norm1.bias": (256,), "tokens_proj.layers.0.weight": (2048, 256), "tokens_proj.layers.0.bias": (2048,),
    "tokens_proj.layers.1.weight": (256, 2048), "tokens_proj.layers.1.bias": (256,), "tokens_norm2.weight": (256,),
    "tokens_norm2.bias": (256,), "attn.in_proj_weight": (768, 256), "attn.in_proj_bias": (768,),
    "attn.out_proj.weight": (256, 256), "attn.out_proj.bias": (256,), "tokens_norm3.weight": (256,),
    "tokens_norm3.bias": (256,), "cls_fcs.0.weight": (256, 256), "cls_fcs.1.weight": (256,),
    "cls_fcs.1.bias": (256,), "fc_cls.weight": (80, 256), "fc_cls.bias": (80,), "fc_reg.weight": (4, 256),
    "fc_reg.bias": (4,),
    **{f"reg_fcs.{i}.weight": (256, 256) for i in (0, 3, 6)},
    **{f"reg_fcs.{i}.{n}": (256,) for i in (1, 4, 7) for n in ("weight", "bias")},
}


def test_relation_block_keys_and_shapes_are_official():
    state = RelationBlock(80).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == SPEC_RPN_SHAPES


def test_adamixer_stage_keys_are_official():
    shapes = {k: tuple(v.shape) for k, v in AdaMixerStage(80).state_dict().items()}
    expected = {
        "iof_tau": (8,), "attention.in_proj_weight": (768, 256), "attention.in_proj_bias": (768,),
        "attention.out_proj.weight": (256, 256), "attention.out_proj.bias": (256,),
        "attention_norm.weight": (256,), "attention_norm.bias": (256,),
        "ffn.layers.0.weight": (2048, 256), "ffn.layers.0.bias": (2048,), "ffn.layers.1.weight": (256, 2048),
        "ffn.layers.1.bias": (256,), "ffn_norm.weight": (256,), "ffn_norm.bias": (256,),
        "cls_fcs.0.weight": (256, 256), "cls_fcs.1.weight": (256,), "cls_fcs.1.bias": (256,),
        "fc_cls.weight": (80, 256), "fc_cls.bias": (80,), "fc_reg.weight": (4, 256), "fc_reg.bias": (4,),
        **{f"reg_fcs.{i}.weight": (256, 256) for i in (0, 3, 6)},
        **{f"reg_fcs.{i}.{n}": (256,) for i in (1, 4, 7) for n in ("weight", "bias")},
        "sampling_n_mixing.sampling_offset_generator.0.weight": (384, 256),
        "sampling_n_mixing.sampling_offset_generator.0.bias": (384,),
        "sampling_n_mixing.norm.weight": (256,), "sampling_n_mixing.norm.bias": (256,),
        "sampling_n_mixing.adaptive_mixing.parameter_generator.0.weight": (32768, 256),
        "sampling_n_mixing.adaptive_mixing.parameter_generator.0.bias": (32768,),
        "sampling_n_mixing.adaptive_mixing.out_proj.weight": (256, 32768),
        "sampling_n_mixing.adaptive_mixing.out_proj.bias": (256,),
    }
    assert shapes == expected


def test_sparse_stage_keys_are_official():
    shapes = {k: tuple(v.shape) for k, v in SparseStage(80).state_dict().items()}
    expected = {
        "self_attn.in_proj_weight": (768, 256), "self_attn.in_proj_bias": (768,),
        "self_attn.out_proj.weight": (256, 256), "self_attn.out_proj.bias": (256,),
        "inst_interact.dynamic_layer.weight": (32768, 256), "inst_interact.dynamic_layer.bias": (32768,),
        "inst_interact.norm1.weight": (64,), "inst_interact.norm1.bias": (64,),
        "inst_interact.norm2.weight": (256,), "inst_interact.norm2.bias": (256,),
        "inst_interact.out_layer.weight": (256, 12544), "inst_interact.out_layer.bias": (256,),
        "inst_interact.norm3.weight": (256,), "inst_interact.norm3.bias": (256,),
        "linear1.weight": (2048, 256), "linear1.bias": (2048,), "linear2.weight": (256, 2048), "linear2.bias": (256,),
        **{f"norm{i}.{n}": (256,) for i in (1, 2, 3) for n in ("weight", "bias")},
        "cls_module.0.weight": (256, 256), "cls_module.1.weight": (256,), "cls_module.1.bias": (256,),
        **{f"reg_module.{i}.weight": (256, 256) for i in (0, 3, 6)},
        **{f"reg_module.{i}.{n}": (256,) for i in (1, 4, 7) for n in ("weight", "bias")},
        "class_logits.weight": (80, 256), "class_logits.bias": (80,),
        "bboxes_delta.weight": (4, 256), "bboxes_delta.bias": (4,),
    }
    assert shapes == expected


def test_decoder_attribute_names_are_official():
    a = ParallelDecoder("adamixer", C, num_heads=2, content_dim=D, dim_feedforward=48, adamixer_points=(8, 16, 4))
    s = tiny_decoder("sparse_rcnn", num_heads=2)
    assert a.decoder_embedding.weight.shape == (2, D)
    assert any(k.startswith("bbox_head.1.") for k in a.state_dict())
    assert any(k.startswith("head_series.1.") for k in s.state_dict())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["adamixer", "sparse_rcnn"])
def test_cuda_matches_cpu(kind):
    block, decoder = tiny_relation_block(), tiny_decoder(kind, num_heads=2)
    randomize(block, 13)
    randomize(decoder, 14)
    feats = pyramid(3, seed=15)
    anchors, valid = padded_anchors()
    with torch.no_grad():
        rpn, heads = run_pipeline(block, decoder, feats, anchors, SIZES, valid)
        block, decoder = block.cuda(), decoder.cuda()
        rpn_gpu, heads_gpu = run_pipeline(block, decoder, [f.cuda() for f in feats], anchors.cuda(), SIZES.cuda(),
                                          valid.cuda())
    torch.testing.assert_close(rpn_gpu["boxes"].cpu()[valid], rpn["boxes"][valid], atol=1e-4, rtol=1e-4)
    for h, h_gpu in zip(heads, heads_gpu):
        torch.testing.assert_close(h_gpu["logits"].cpu()[valid], h["logits"][valid], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(h_gpu["boxes"].cpu()[valid], h["boxes"][valid], atol=1e-4, rtol=1e-4)
