"""Multi-level RoIAlign: level rule and parity with torchvision's roi_align per level."""
from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import roi_align

from sparsedet.layers import MultiLevelRoIAlign

pytestmark = pytest.mark.usefixtures("single_thread")


def square(cx: float, cy: float, side: float) -> list[float]:
    return [cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]


def expected_level(box) -> int:
    size = math.sqrt((box[2] - box[0]) * (box[3] - box[1]))
    return min(max(math.floor(4 + math.log2(size / 224 + 1e-8)), 2), 5)


def test_level_assignment_hand_made_boxes():
    pooler = MultiLevelRoIAlign()
    boxes = torch.tensor([
        square(100, 100, 224),  # P4 (canonical)
        square(100, 100, 112),  # P3
        square(0, 0, 1000),     # P5
        square(50, 50, 10),     # P2 (clamped up from ~-0.5)
        square(50, 50, 448),    # P5
        square(50, 50, 223),    # just below 224 -> P3
        square(50, 50, 111),    # just below 112 -> P2
        [0.0, 0.0, 224 * 4.0, 224 / 4.0],  # sqrt(area) = 224 -> P4 (area, not side)
        square(0, 0, 5000),     # clamped to P5
        [10.0, 10.0, 10.0, 10.0],  # zero area -> P2
    ])
    levels = pooler.assign_levels(boxes) + 2
    assert levels.tolist() == [4, 3, 5, 2, 5, 3, 2, 4, 5, 2]
    assert levels.tolist() == [expected_level(b) for b in boxes.tolist()]


def test_level_assignment_other_levels():
    pooler = MultiLevelRoIAlign(levels=(3, 4, 5, 6, 7))
    boxes = torch.tensor([square(0, 0, 10), square(0, 0, 224), square(0, 0, 2000)])
    assert (pooler.assign_levels(boxes) + 3).tolist() == [3, 4, 7]
    with pytest.raises(ValueError, match="consecutive"):
        MultiLevelRoIAlign(levels=(2, 3, 5))


def make_pyramid(batch: int, height: int, width: int, channels: int = 5):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, channels, height // 2 ** lvl, width // 2 ** lvl, generator=g) for lvl in (2, 3, 4, 5)]


def test_matches_torchvision_roi_align_per_level_image_major():
    feats = make_pyramid(2, 256, 320)
    boxes = [
        torch.tensor([square(60, 70, 12), square(150, 100, 120), square(100, 100, 250), square(160, 128, 600),
                      [3.3, 7.1, 40.2, 35.9]]),
        torch.tensor([square(200, 60, 300), square(30, 30, 20), [10.5, 20.25, 130.0, 150.75]]),
    ]
    pooler = MultiLevelRoIAlign((2, 3, 4, 5), output_size=7, sampling_ratio=2)
    out = pooler(feats, boxes)
    assert out.shape == (8, 5, 7, 7)
    all_boxes = torch.cat(boxes)
    levels = [expected_level(b) for b in all_boxes.tolist()]
    assert set(levels) == {2, 3, 4, 5}  # every level is exercised
    image_of = [0] * 5 + [1] * 3
    for k, (box, level, image) in enumerate(zip(all_boxes, levels, image_of)):
        roi = torch.cat((torch.tensor([float(image)]), box))[None]
        ref = roi_align(feats[level - 2], roi, (7, 7), spatial_scale=1 / 2 ** level, sampling_ratio=2, aligned=True)
        torch.testing.assert_close(out[k], ref[0], rtol=1e-5, atol=1e-6)
        # and not the unaligned variant (torchvision's MultiScaleRoIAlign default)
        unaligned = roi_align(feats[level - 2], roi, (7, 7), spatial_scale=1 / 2 ** level, sampling_ratio=2,
                              aligned=False)
        assert not torch.allclose(out[k], unaligned[0], atol=1e-4)


def test_output_size_sampling_ratio_and_empty_image():
    feats = make_pyramid(2, 128, 128, channels=3)
    boxes = [torch.zeros(0, 4), torch.tensor([square(64, 64, 100), square(64, 64, 20)])]
    pooler = MultiLevelRoIAlign(output_size=5, sampling_ratio=0)
    out = pooler(feats, boxes)
    assert out.shape == (2, 3, 5, 5)
    roi = torch.tensor([[1.0] + square(64, 64, 20)])
    ref = roi_align(feats[0], roi, (5, 5), spatial_scale=1 / 4, sampling_ratio=0, aligned=True)
    torch.testing.assert_close(out[1], ref[0])
    with pytest.raises(ValueError, match="expects 4 feature maps"):
        pooler(feats[:3], boxes)
