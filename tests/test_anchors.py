"""Anchors against detectron2 DefaultAnchorGenerator's definition (spec §1.2), written out here."""
from __future__ import annotations

import math

import pytest
import torch

from sparsedet.layers.anchors import AnchorGenerator, cell_anchors, octave_sizes


def test_p2_cell_anchors_match_spec_example():
    cells = cell_anchors(octave_sizes(16, 3), (0.5, 1.0, 2.0))
    assert cells.shape == (9, 4)
    expected = torch.tensor([[-11.3137, -5.6569, 11.3137, 5.6569], [-8.0, -8.0, 8.0, 8.0],
                             [-5.6569, -11.3137, 5.6569, 11.3137]])
    torch.testing.assert_close(cells[:3], expected, atol=1e-4, rtol=0)
    # Size-major, ratio-minor: rows 3..5 are size 16 * 2^(1/3) = 20.159 with ratios 0.5, 1, 2.
    assert cells[4, 2].item() == pytest.approx(20.159 / 2, abs=1e-3)
    areas = (cells[:, 2] - cells[:, 0]) * (cells[:, 3] - cells[:, 1])
    for i, size in enumerate(octave_sizes(16, 3)):
        torch.testing.assert_close(areas[3 * i:3 * i + 3], torch.full((3,), size ** 2))
    ratios = (cells[:, 3] - cells[:, 1]) / (cells[:, 2] - cells[:, 0])
    torch.testing.assert_close(ratios, torch.tensor([0.5, 1.0, 2.0] * 3))


def test_sizes_table():
    for base, expected in ((16, (16, 20.159, 25.398)), (64, (64, 80.635, 101.594)), (512, (512, 645.080, 812.749))):
        assert octave_sizes(base, 3) == pytest.approx(expected, abs=1e-3)


def test_grid_order_offset_zero_and_count():
    gen = AnchorGenerator((2, 3), [octave_sizes(16, 3), octave_sizes(32, 3)])
    assert gen.num_anchors == 9
    h, w = 3, 5
    anchors = gen.grid_anchors(3, h, w)
    assert anchors.shape == (h * w * 9, 4)
    cells = gen.cell_anchors(3)
    for y in range(h):
        for x in range(w):
            for a in range(9):
                centre = torch.tensor([x * 8.0, y * 8.0, x * 8.0, y * 8.0])  # offset 0
                torch.testing.assert_close(anchors[(y * w + x) * 9 + a], cells[a] + centre)
    # No rounding anywhere (torchvision rounds the cell anchors).
    assert not torch.equal(anchors, anchors.round())
    assert [a.shape[0] for a in gen([(4, 6), (2, 3)])] == [4 * 6 * 9, 2 * 3 * 9]


def test_offset_half():
    gen = AnchorGenerator((3,), [(32,)], (1.0,), offset=0.5)
    anchors = gen.grid_anchors(3, 2, 2)
    torch.testing.assert_close(anchors[3], torch.tensor([12.0 - 16, 12.0 - 16, 12.0 + 16, 12.0 + 16]))


def test_anchors_at_positions_equal_dense_rows():
    gen = AnchorGenerator((4,), [octave_sizes(64, 3)])
    h, w = 7, 9
    dense = gen.grid_anchors(4, h, w).view(h * w, 9, 4)
    ys = torch.tensor([0, 6, 3, 3, 5])
    xs = torch.tensor([8, 0, 4, 5, 2])
    sparse = gen.anchors_at(4, ys, xs)
    assert sparse.shape == (5 * 9, 4)
    torch.testing.assert_close(sparse, dense[ys * w + xs].reshape(-1, 4), rtol=0, atol=0)
    assert gen.anchors_at(4, ys[:0], xs[:0]).shape == (0, 4)


def test_not_in_state_dict_and_unknown_level():
    gen = AnchorGenerator((3, 4), [(32,), (64,)])
    assert len(gen.state_dict()) == 0
    with pytest.raises(KeyError, match="P5"):
        gen.grid_anchors(5, 2, 2)
    assert math.isclose(gen.cell_anchors(4)[1, 2].item(), 32.0)
