"""Fewer operators in dense inference, same numbers: one decode over all levels, cached grid anchors."""
from __future__ import annotations

import math

import pytest
import torch

from sparsedet.layers.anchors import AnchorGenerator, octave_sizes
from sparsedet.layers.box_coder import BoxCoder
from sparsedet.models.dense import LevelOutputs, level_candidates, merge_detections, postprocess_image

pytestmark = pytest.mark.usefixtures("single_thread")


def random_levels(seed: int, rows=(40, 0, 25, 7), classes: int = 4) -> list[LevelOutputs]:
    g = torch.Generator().manual_seed(seed)
    levels = []
    for n in rows:
        xy = torch.rand(n, 2, generator=g) * 80
        anchors = torch.cat((xy, xy + 4 + torch.rand(n, 2, generator=g) * 30), 1)
        levels.append(LevelOutputs(torch.randn(n, classes, generator=g) * 3, torch.randn(n, 4, generator=g), anchors))
    return levels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_decode_over_all_levels_is_bitwise_the_per_level_path(seed):
    coder = BoxCoder((1, 1, 1, 1), math.log(1000 / 16))
    levels = random_levels(seed)
    args = dict(score_threshold=0.2, nms_threshold=0.6, max_detections=30, image_size=(90, 100),
                original_size=(45, 50))
    out = postprocess_image(levels, coder, 12, **args)
    per_level = [level_candidates(level, coder, 12) for level in levels]
    expected = merge_detections(per_level, **args)
    assert out["boxes"].shape[0] > 3
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(out[key], expected[key]), key


def test_postprocess_launches_one_decode():
    from torch.profiler import ProfilerActivity, profile
    coder = BoxCoder((1, 1, 1, 1), math.log(1000 / 16))
    levels = random_levels(3, rows=(30, 30, 30, 30, 30, 30))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        postprocess_image(levels, coder, 10, 0.05, 0.5, 100, (90, 100))
    exps = [e for e in prof.events() if e.name == "aten::exp"]
    assert len(exps) == 2          # w and h of one decode, not 2 per level


def generator() -> AnchorGenerator:
    return AnchorGenerator((3, 4), [octave_sizes(32, 3), octave_sizes(64, 3)])


def test_cached_grid_anchors_equal_fresh_ones_and_are_reused():
    gen = generator()
    fresh = gen.grid_anchors(3, 5, 7)
    with torch.inference_mode():
        cached = gen.grid_anchors(3, 5, 7, cache=True)
    assert torch.equal(cached, fresh) and not cached.is_inference()
    assert gen.grid_anchors(3, 5, 7, cache=True) is cached
    assert gen.grid_anchors(3, 5, 7) is not cached                      # uncached calls build anew
    assert torch.equal(gen.grid_anchors(4, 5, 7, cache=True), gen.grid_anchors(4, 5, 7))
    assert torch.equal(gen.grid_anchors(3, 6, 7, cache=True), gen.grid_anchors(3, 6, 7))


def test_grid_cache_follows_cell_anchors_and_is_bounded():
    gen = generator()
    first = gen.grid_anchors(3, 4, 4, cache=True)
    with torch.no_grad():
        gen.cell_anchors_p3.mul_(2.0)                 # in place: version counter moves
    second = gen.grid_anchors(3, 4, 4, cache=True)
    assert torch.equal(second, gen.grid_anchors(3, 4, 4)) and not torch.equal(first, second)
    double = gen.double()
    assert double.grid_anchors(3, 4, 4, cache=True).dtype == torch.float64
    for size in range(1, AnchorGenerator.GRID_CACHE_SIZE + 5):
        gen.grid_anchors(3, size, size, cache=True)
    assert len(gen._grid_cache) == AnchorGenerator.GRID_CACHE_SIZE


@pytest.mark.filterwarnings("ignore:`torch.jit.trace")
def test_grid_anchors_not_cached_while_tracing():
    gen = generator()

    class Grid(torch.nn.Module):
        def forward(self, x):
            return gen.grid_anchors(3, x.shape[0], x.shape[1], cache=True)

    traced = torch.jit.trace(Grid(), torch.zeros(3, 4), check_trace=False)  # no eager re-run
    assert len(gen._grid_cache) == 0
    assert torch.equal(traced(torch.zeros(5, 6)), gen.grid_anchors(3, 5, 6))   # sizes stay traced
