"""Multi-scale deformable attention (layers/deformable_attention.py) and the deformable encoder and
decoder layers: against a slow reference with explicit bilinear interpolation, gradcheck, hand-checked
shapes and the bad-input errors."""
from __future__ import annotations

import math

import pytest
import torch

from sparsedet.layers.deformable_attention import MSDeformAttn, flatten_levels, ms_deform_attn_core
from sparsedet.layers.deformable_transformer import (DeformableDecoderLayer, DeformableEncoderLayer,
                                                     encoder_reference_points, level_padding_mask, valid_ratios)


def bilinear_zero_padded(image: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """image (d, H, W) read at (x, y) in [0, 1] map units, align_corners=False: pixel centres at
    (i + 0.5) / W; outside pixels are zeros. Written from the definition, one corner at a time."""
    d, h, w = image.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(d, dtype=image.dtype)
    for xi, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
        for yi, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
            if 0 <= xi < w and 0 <= yi < h:
                out += wx * wy * image[:, yi, xi]
    return out


def slow_reference(value, shapes, locations, weights):
    """Loops over batch, queries, heads, levels and points."""
    batch, _, heads, dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    out = torch.zeros(batch, queries, heads * dim, dtype=value.dtype)
    start = 0
    starts = []
    for h, w in shapes:
        starts.append(start)
        start += h * w
    for b in range(batch):
        for q in range(queries):
            for m in range(heads):
                acc = torch.zeros(dim, dtype=value.dtype)
                for lvl, (h, w) in enumerate(shapes):
                    image = value[b, starts[lvl]:starts[lvl] + h * w, m].T.reshape(dim, h, w)
                    for p in range(points):
                        x, y = locations[b, q, m, lvl, p].tolist()
                        acc += weights[b, q, m, lvl, p] * bilinear_zero_padded(image, x, y)
                out[b, q, m * dim:(m + 1) * dim] = acc
    return out


def random_case(seed, shapes, batch=2, queries=5, heads=2, dim=3, points=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    total = sum(h * w for h, w in shapes)
    value = torch.randn(batch, total, heads, dim, generator=g, dtype=dtype)
    # Locations from -0.2 to 1.2: inside, on the border and outside the map.
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2, generator=g, dtype=dtype) * 1.4 - 0.2
    locations[0, 0, 0, 0, 0] = torch.tensor([0.0, 1.0], dtype=dtype)            # exact corners
    locations[0, 0, 0, 0, 1] = torch.tensor([1.0, 0.0], dtype=dtype)
    locations[-1, -1, -1, -1, -1] = torch.tensor([0.5 / shapes[-1][1], 1.0], dtype=dtype)  # a border centre
    weights = torch.rand(batch, queries, heads, len(shapes), points, generator=g, dtype=dtype)
    weights = (weights.flatten(-2).softmax(-1)).view_as(weights)
    spatial = torch.tensor(shapes, dtype=torch.long)
    starts = torch.cat([spatial.new_zeros(1), (spatial[:, 0] * spatial[:, 1]).cumsum(0)[:-1]])
    return value, spatial, starts, locations, weights


@pytest.mark.parametrize("seed,shapes", [(0, [(5, 7), (3, 4), (1, 1)]), (1, [(4, 4)]), (2, [(6, 3), (3, 2), (2, 1), (1, 2)])])
def test_core_equals_slow_reference(seed, shapes):
    value, spatial, starts, locations, weights = random_case(seed, shapes)
    fast = ms_deform_attn_core(value, spatial, starts, locations, weights)
    slow = slow_reference(value, shapes, locations, weights)
    assert fast.shape == slow.shape == (2, 5, 6)
    assert torch.allclose(fast, slow, atol=1e-5)
    # Points outside the map by more than half a pixel read exactly zero.
    far = torch.full_like(locations, 1.5)
    assert torch.equal(ms_deform_attn_core(value, spatial, starts, far, weights), torch.zeros_like(fast))


def test_core_gradcheck_float64():
    value, spatial, starts, locations, weights = random_case(3, [(3, 4), (2, 2)], batch=1, queries=2, heads=2,
                                                             dim=2, points=2, dtype=torch.float64)
    # Away from pixel centres: bilinear interpolation is not differentiable on the grid lines.
    locations = (locations.clamp(-0.1, 1.1) * 0.9 + 0.013).requires_grad_()
    value.requires_grad_()
    weights.requires_grad_()
    assert torch.autograd.gradcheck(lambda v, l, w: ms_deform_attn_core(v, spatial, starts, l, w),
                                    (value, locations, weights), eps=1e-6, atol=1e-5)


def test_module_reference_points_and_boxes():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=2)
    maps = [torch.randn(2, 16, 6, 5), torch.randn(2, 16, 3, 3)]
    value, spatial, starts = flatten_levels(maps)
    assert value.shape == (2, 39, 16) and spatial.tolist() == [[6, 5], [3, 3]] and starts.tolist() == [0, 30]
    query = torch.randn(2, 7, 16)
    points = torch.rand(2, 7, 2, 2)
    locations, weights = attn.sampling(query, points, spatial)
    assert locations.shape == (2, 7, 4, 2, 2, 2) and weights.shape == (2, 7, 4, 2, 2)
    assert torch.allclose(weights.flatten(-2).sum(-1), torch.ones(2, 7, 4))
    # At init the offsets are the bias ring: head 0 looks +x, point p at (p + 1) cells of the level.
    offsets = attn.sampling_offsets.bias.view(4, 2, 2, 2)
    assert torch.allclose(offsets[0, 0, :, 0], torch.tensor([1.0, 2.0])) and torch.allclose(offsets[0, 0, :, 1], torch.zeros(2))
    assert torch.allclose(locations[:, :, 0, 1, 1, 0] - points[:, :, 1, 0], torch.full((2, 7), 2 / 3))  # 2 cells / W=3
    boxes = torch.cat([torch.rand(2, 7, 2, 2), torch.full((2, 7, 2, 2), 0.4)], -1)
    locations, _ = attn.sampling(query, boxes, spatial)
    # Box reference: offset / points * wh * 0.5: point 1 of head 0 -> +2 / 2 * 0.4 * 0.5 = 0.2 in x.
    assert torch.allclose(locations[:, :, 0, 0, 1, 0] - boxes[:, :, 0, 0], torch.full((2, 7), 0.2), atol=1e-6)
    out = attn(query, points, value, spatial, starts)
    assert out.shape == (2, 7, 16)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="n_heads"):
        MSDeformAttn(d_model=30, n_heads=8)
    with pytest.raises(ValueError, match="n_points"):
        MSDeformAttn(d_model=16, n_heads=4, n_points=0)
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=2)
    value, spatial, starts = flatten_levels([torch.randn(1, 16, 4, 4), torch.randn(1, 16, 2, 2)])
    query = torch.randn(1, 3, 16)
    with pytest.raises(ValueError, match="reference"):
        attn(query, torch.rand(1, 3, 2, 3), value, spatial, starts)              # width 3
    with pytest.raises(ValueError, match="n_levels=2"):
        attn(query, torch.rand(1, 3, 3, 2), value, spatial, starts)              # 3 levels of reference
    three = flatten_levels([torch.randn(1, 16, 4, 4), torch.randn(1, 16, 2, 2), torch.randn(1, 16, 1, 1)])
    with pytest.raises(ValueError, match="n_levels=2"):
        attn(query, torch.rand(1, 3, 2, 2), *three)                              # 3 input levels
    with pytest.raises(ValueError, match="spatial_shapes"):
        attn(query, torch.rand(1, 3, 2, 2), value[:, :-1], spatial, starts)     # lengths do not add up
    with pytest.raises(ValueError, match="level_start_index"):
        attn(query, torch.rand(1, 3, 2, 2), value, spatial, starts + 1)
    v, s, st, loc, w = random_case(0, [(3, 3), (2, 2)], heads=2)
    with pytest.raises(ValueError, match="sampling_locations"):
        ms_deform_attn_core(v, s, st, loc[:, :, :1], w[:, :, :1])               # 1 head for a 2-head value
    with pytest.raises(ValueError, match="attention_weights"):
        ms_deform_attn_core(v, s, st, loc, w[..., :1])                          # points differ


def test_padding_helpers_hand_case():
    sizes = torch.tensor([[20, 30], [16, 16]])
    mask = level_padding_mask(sizes, (3, 4), 8)                                  # padded 24 x 32 at stride 8
    assert (~mask[0]).sum() == 3 * 4                                             # 20/8 -> 3 rows, 30/8 -> 4 cols
    assert (~mask[1]).sum(0).tolist() == [2, 2, 0, 0] and (~mask[1]).sum(1).tolist() == [2, 2, 0]
    assert torch.allclose(valid_ratios(mask), torch.tensor([[1.0, 1.0], [0.5, 2 / 3]]))
    ref = encoder_reference_points([(3, 4), (1, 2)], torch.stack([valid_ratios(mask)] * 2, 1))
    assert ref.shape == (2, 14, 2, 2)
    # First cell centre of image 1: (0.5 / 4, 0.5 / 3) of the padded map on its own level.
    assert torch.allclose(ref[1, 0, 0], torch.tensor([0.125, 0.5 / 3]))


def test_encoder_and_decoder_layers_shapes():
    torch.manual_seed(0)
    maps = [torch.randn(2, 32, 8, 10), torch.randn(2, 32, 4, 5), torch.randn(2, 32, 2, 3), torch.randn(2, 32, 1, 2)]
    tokens, spatial, starts = flatten_levels(maps)
    assert tokens.shape == (2, 80 + 20 + 6 + 2, 32)
    ref = encoder_reference_points(spatial.tolist(), torch.ones(2, 4, 2))
    encoder = DeformableEncoderLayer(32, 64, 0.0, "relu", n_levels=4, n_heads=8, n_points=4).eval()
    out = encoder(tokens, torch.zeros_like(tokens), ref, spatial, starts)
    assert out.shape == tokens.shape
    # Post-norm: every token leaves LayerNorm'd (mean 0, var 1 before the affine at init).
    assert torch.allclose(out.mean(-1), torch.zeros(2, 108), atol=1e-5)
    decoder = DeformableDecoderLayer(32, 64, 0.0, "relu", n_levels=4, n_heads=8, n_points=4).eval()
    boxes = torch.rand(2, 6, 1, 4).expand(2, 6, 4, 4) * 0.5 + 0.25
    tgt = torch.randn(2, 6, 32)
    valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    blocked = (valid[:, :, None] & ~valid[:, None, :]).repeat_interleave(8, 0)
    out = decoder(tgt, torch.zeros_like(tgt), boxes, out, spatial, starts, None, blocked)
    assert out.shape == (2, 6, 32) and torch.isfinite(out).all()
    # Padded queries do not change the valid ones.
    alone = decoder(tgt[1:, :4], torch.zeros(1, 4, 32), boxes[1:, :4],
                    encoder(tokens, torch.zeros_like(tokens), ref, spatial, starts)[1:], spatial, starts)
    assert torch.allclose(out[1, :4], alone[0], atol=1e-5)
