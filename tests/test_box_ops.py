"""Box conversions, element-wise GIoU and the delta box coder."""
from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import generalized_box_iou

from sparsedet.layers import BoxCoder
from sparsedet.layers.box_ops import (
    box_cxcywh_to_xyxy,
    box_xyxy_to_cxcywh,
    elementwise_generalized_box_iou,
    image_size_whwh,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def random_boxes(n: int, generator: torch.Generator, scale: float = 100.0) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=generator) * scale
    wh = torch.rand(n, 2, generator=generator) * scale + 1.0
    return torch.cat((xy, xy + wh), dim=1)


def test_cxcywh_xyxy_known_values_and_round_trip():
    cxcywh = torch.tensor([[0.5, 0.5, 1.0, 1.0], [10.0, 20.0, 4.0, 6.0]])
    xyxy = box_cxcywh_to_xyxy(cxcywh)
    assert torch.equal(xyxy, torch.tensor([[0.0, 0.0, 1.0, 1.0], [8.0, 17.0, 12.0, 23.0]]))
    assert torch.equal(box_xyxy_to_cxcywh(xyxy), cxcywh)

    g = torch.Generator().manual_seed(0)
    boxes = random_boxes(50, g).view(5, 10, 4)  # arbitrary leading dims
    torch.testing.assert_close(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(boxes)), boxes)
    assert box_xyxy_to_cxcywh(boxes).shape == (5, 10, 4)


def test_elementwise_giou_equals_diagonal_of_pairwise():
    g = torch.Generator().manual_seed(0)
    a, b = random_boxes(40, g), random_boxes(40, g)
    b[:5] = a[:5]  # identical pairs -> 1
    b[5:10] = a[5:10] + 500  # disjoint pairs -> negative
    expected = generalized_box_iou(a, b).diagonal()
    got = elementwise_generalized_box_iou(a, b)
    assert got.shape == (40,)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[:5], torch.ones(5))
    assert (got[5:10] < 0).all()


def test_elementwise_giou_hand_computed():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 4.0, 3.0]])
    # intersection 1x1 = 1; areas 4 and 6; union 9; enclosing box (0,0,4,3) = 12.
    expected = 1 / 9 - (12 - 9) / 12
    got = elementwise_generalized_box_iou(a, b)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    # symmetric
    assert elementwise_generalized_box_iou(b, a).item() == pytest.approx(expected, abs=1e-6)
    # disjoint: iou 0, enclosing (0,0,10,10)=100, union 4+4=8 -> -(92/100)
    c = torch.tensor([[8.0, 8.0, 10.0, 10.0]])
    assert elementwise_generalized_box_iou(a, c).item() == pytest.approx(-0.92, abs=1e-6)


def test_elementwise_giou_has_gradients():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]], requires_grad=True)
    b = torch.tensor([[1.0, 1.0, 4.0, 3.0]])
    elementwise_generalized_box_iou(a, b).sum().backward()
    assert a.grad is not None and torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0


def test_image_size_whwh():
    assert torch.equal(image_size_whwh(64, 96), torch.tensor([96.0, 64.0, 96.0, 64.0]))


@pytest.mark.parametrize("weights", [(2.0, 2.0, 1.0, 1.0), (1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_box_coder_round_trip(weights):
    coder = BoxCoder(weights)
    g = torch.Generator().manual_seed(0)
    ref, tgt = random_boxes(64, g), random_boxes(64, g)
    deltas = coder.encode(ref, tgt)
    torch.testing.assert_close(coder.decode(deltas, ref), tgt, rtol=1e-5, atol=1e-3)
    # encode(decode(d)) = d for moderate deltas
    d = torch.randn(64, 4, generator=g)
    torch.testing.assert_close(coder.encode(ref, coder.decode(d, ref)), d, rtol=1e-4, atol=1e-4)


def test_box_coder_weights_hand_values():
    ref = torch.tensor([[0.0, 0.0, 10.0, 20.0]])  # cx 5, cy 10, w 10, h 20
    tgt = torch.tensor([[5.0, 10.0, 25.0, 30.0]])  # cx 15, cy 20, w 20, h 20
    d = BoxCoder((2.0, 2.0, 1.0, 1.0)).encode(ref, tgt)
    torch.testing.assert_close(d, torch.tensor([[2.0, 1.0, math.log(2.0), 0.0]]))
    d = BoxCoder((10.0, 5.0, 3.0, 1.0)).encode(ref, tgt)
    torch.testing.assert_close(d, torch.tensor([[10.0, 2.5, 3 * math.log(2.0), 0.0]]))
    # zero deltas decode to the reference, whatever the weights
    for w in [(2.0, 2.0, 1.0, 1.0), (10.0, 5.0, 3.0, 1.0)]:
        torch.testing.assert_close(BoxCoder(w).decode(torch.zeros(1, 4), ref), ref)


def test_box_coder_default_is_sparse_rcnn():
    coder = BoxCoder()
    assert coder.weights == (2.0, 2.0, 1.0, 1.0)
    assert coder.scale_clamp == pytest.approx(math.log(100000.0 / 16))
    assert coder.scale_clamp == pytest.approx(8.7403367, abs=1e-6)
    with pytest.raises(ValueError, match="4 values"):
        BoxCoder((1.0, 1.0, 1.0))


def test_box_coder_upper_clamp_only():
    coder = BoxCoder((2.0, 2.0, 1.0, 1.0))
    ref = torch.tensor([[0.0, 0.0, 16.0, 16.0]], dtype=torch.float64)
    big = coder.decode(torch.tensor([[0.0, 0.0, 20.0, 30.0]], dtype=torch.float64), ref)
    width, height = big[0, 2] - big[0, 0], big[0, 3] - big[0, 1]
    # clamped at log(1e5 / 16): a 16 px box grows to at most 1e5 px
    assert width.item() == pytest.approx(100000.0, rel=1e-9)
    assert height.item() == pytest.approx(100000.0, rel=1e-9)
    # centre unchanged
    assert ((big[0, 0] + big[0, 2]) / 2).item() == pytest.approx(8.0)
    # the clamp applies to delta / weight: with ww = 5, a delta of 40 (8 after the weight) is not clamped
    coder5 = BoxCoder((1.0, 1.0, 5.0, 5.0))
    out = coder5.decode(torch.tensor([[0.0, 0.0, 40.0, 50.0]], dtype=torch.float64), ref)
    assert (out[0, 2] - out[0, 0]).item() == pytest.approx(16 * math.exp(8.0), rel=1e-9)
    assert (out[0, 3] - out[0, 1]).item() == pytest.approx(100000.0, rel=1e-9)
    # no lower clamp: a very negative delta gives a tiny but positive box
    small = coder.decode(torch.tensor([[0.0, 0.0, -20.0, -15.0]], dtype=torch.float64), ref)
    assert (small[0, 2] - small[0, 0]).item() == pytest.approx(16 * math.exp(-20.0), rel=1e-9)
    assert (small[0, 3] - small[0, 1]).item() == pytest.approx(16 * math.exp(-15.0), rel=1e-9)
    # boxes are not clipped: a shift far outside the reference stays there
    shifted = coder.decode(torch.tensor([[200.0, -200.0, 0.0, 0.0]], dtype=torch.float64), ref)
    torch.testing.assert_close(shifted, torch.tensor([[1600.0, -1600.0, 1616.0, -1584.0]], dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_box_coder_decodes_in_deltas_dtype(dtype):
    coder = BoxCoder()
    ref = torch.tensor([[0.0, 0.0, 10.0, 20.0]], dtype=torch.float32)
    out = coder.decode(torch.zeros(1, 4, dtype=dtype), ref)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref)
    # broadcasting over leading dims
    out = coder.decode(torch.zeros(2, 3, 4), torch.tensor([0.0, 0.0, 10.0, 20.0]).expand(2, 3, 4))
    assert out.shape == (2, 3, 4)


def test_class_aware_nms_equals_a_per_class_loop():
    """One nms call on shifted boxes = NMS run class by class (negative coordinates included)."""
    from torchvision.ops import batched_nms, nms

    from sparsedet.layers.box_ops import class_aware_nms

    g = torch.Generator().manual_seed(0)
    for n, classes in ((300, 80), (2000, 5), (50, 1)):
        xy = torch.rand(n, 2, generator=g) * 600 - 100            # some boxes start left of / above 0
        wh = torch.rand(n, 2, generator=g) * 120 + 2
        boxes = torch.cat([xy, xy + wh], 1)
        scores = torch.rand(n, generator=g)
        labels = torch.randint(0, classes, (n,), generator=g)
        keep = []
        for c in labels.unique():
            idx = (labels == c).nonzero().squeeze(1)
            keep += idx[nms(boxes[idx], scores[idx], 0.5)].tolist()
        expected = torch.tensor(keep)[scores[keep].argsort(descending=True)]
        got = class_aware_nms(boxes, scores, labels, 0.5)
        assert torch.equal(got, expected)
        assert torch.equal(got, batched_nms(boxes, scores, labels, 0.5))
    assert class_aware_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5).shape == (0,)
