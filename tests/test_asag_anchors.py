"""ASAG anchor generator: fixed part, Adaptive Probing selection, bounds, training patches, targets.

The patch predictors are replaced by modules that return hand-made predictions, so each case
knows exactly which anchors exist and checks the generator's geometry and selection rules.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from sparsedet.models.asag.anchor_generator import AnchorGenerator
from sparsedet.models.asag.config import ASAGConfig, AnchorGeneratorConfig
from sparsedet.models.asag.patches import (crop_positions, cut_patches, fixed_patch_targets, flipped_p6_targets,
                                           ground_truth_patches, patch_to_image, probe_patch_targets,
                                           random_patches)

H, W = 480, 640
K1, K2 = 50, 20


def logit(p: float) -> float:
    return math.log(p / (1 - p))


class HandMadeHead(nn.Module):
    """Returns ``rows[i]`` (K*5 raw values) for patch i, whatever the input."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k
        self.rows: list[torch.Tensor] = []

    def forward(self, x):
        out = torch.stack(self.rows[:len(x)]) if self.rows else torch.zeros(len(x), self.k * 5)
        assert out.shape[0] == len(x), f"hand-made head has {out.shape[0]} rows, called with {len(x)}"
        return out


def anchors_row(k: int, anchors: list[tuple], default=(0.5, 0.5, 0.2, 0.2, 0.01)) -> torch.Tensor:
    """(k*5,) raw output: the listed (cx, cy, w, h, prob) first, ``default`` elsewhere."""
    values = [anchors[i] if i < len(anchors) else default for i in range(k)]
    return torch.tensor([[logit(v) for v in a] for a in values]).flatten()


def make_generator(**anchor_keys) -> AnchorGenerator:
    cfg = ASAGConfig(anchors=AnchorGeneratorConfig(compress_hidden=4, **anchor_keys))
    gen = AnchorGenerator(cfg, in_channels=8)
    gen.proj_all = HandMadeHead(K1)
    gen.proj_patch = HandMadeHead(K2)
    return gen.eval()


def features(batch: int = 1):
    return [torch.randn(batch, 8, H // s, W // s) for s in (8, 16, 32)]


def fixed_rows(gen, per_patch: dict):
    """Sets the fixed part's 5 rows (TL, TR, BL, BR, P6) from {patch: [anchors]}."""
    gen.proj_all.rows = [anchors_row(K1, per_patch.get(p, [])) for p in range(5)]


def test_fixed_part_conversion_and_no_probing():
    gen = make_generator()
    # BR quarter: patch-relative (0.5, 0.5, 0.5, 0.5) -> image (0.75, 0.75, 0.25, 0.25); P6 stays.
    fixed_rows(gen, {3: [(0.5, 0.5, 0.5, 0.5, 0.9)], 4: [(0.3, 0.6, 0.4, 0.2, 0.8)]})
    out = gen(features(), [(H, W)])
    assert "P4" not in out.patches                                 # nothing selected: no probing
    assert out.valid.sum() == 5                                     # below eta_f everywhere else: min rule
    boxes = out.boxes[0, out.valid[0]]
    expected = torch.tensor([[0.75 * W, 0.75 * H, 0.25 * W, 0.25 * H], [0.3 * W, 0.6 * H, 0.4 * W, 0.2 * H]])
    for box in expected:
        assert torch.isclose(boxes, box, atol=1e-3).all(-1).any()
    assert torch.allclose(out.scores[0, :2].sort(descending=True).values, torch.tensor([0.9, 0.8]), atol=1e-5)


def test_min_and_max_anchor_bounds():
    gen = make_generator()
    fixed_rows(gen, {})                                             # every score 0.01 < eta_f
    out = gen(features(), [(H, W)])
    assert out.valid.sum() == 5                                     # min: the 5 best of all 250
    many = [(0.5, 0.5, 0.9, 0.9, 0.75 + 0.0009 * i) for i in range(K1)]
    fixed_rows(gen, {p: many for p in range(5)})                    # 250 confident large anchors
    out = gen(features(), [(H, W)])
    assert out.valid.sum() == 200                                   # max for setting 100
    assert out.scores[0].min() >= torch.tensor(many[0][4]) - 1e-6


def test_probing_triggered_replaces_the_anchor():
    gen = make_generator()
    # A small uncertain anchor (50 x 40 px, score 0.5) in the TL quarter: probed on P4.
    cx, cy = 0.3, 0.4                                               # of the quarter -> image 0.15, 0.2
    confident = [(0.5, 0.5, 0.9, 0.9, 0.95)] * 5                    # enough kept anchors: no min rule
    fixed_rows(gen, {0: [(cx, cy, 50 / (W / 2), 40 / (H / 2), 0.5)] + confident})
    gen.proj_patch.rows = [anchors_row(K2, [(0.5, 0.5, 0.1, 0.1, 0.9), (0.2, 0.7, 0.05, 0.05, 0.8)])]
    out = gen(features(), [(H, W)])
    p4 = out.patches["P4"]
    assert len(p4.crops) == 1
    centre = torch.tensor([0.15 * W, 0.2 * H])
    assert p4.crops[0].tolist() == [max(0, math.floor(centre[0] / 16 - 7.5)), max(0, math.floor(centre[1] / 16 - 7.5))]
    x0, y0 = p4.crops[0].tolist()
    boxes = out.boxes[0, out.valid[0]]
    # the probed anchor is replaced; the confident one stays; two P4 anchors come in
    assert not torch.isclose(boxes[:, :2], centre, atol=1e-2).all(-1).any()
    assert torch.isclose(boxes, torch.tensor([0.25 * W, 0.25 * H, 0.45 * W, 0.45 * H]), atol=1e-2).all(-1).any()
    probe = torch.tensor([(x0 + 7.5) * 16, (y0 + 7.5) * 16, 0.1 * 240, 0.1 * 240])
    assert torch.isclose(boxes, probe, atol=1e-2).all(-1).any()
    assert (out.levels[0, out.valid[0]] == 4).sum() == 2
    # the P4 anchors are confident or large: P3 is not probed (batch-global early stop)
    assert "P3" not in out.patches


def test_probing_selection_bounds():
    gen = make_generator()
    # Too large for P4 (w = 130 px >= 120), too confident (0.75 >= eta_h), too unsure (0.09 <= eta_l).
    fixed_rows(gen, {0: [(0.3, 0.3, 130 / (W / 2), 20 / (H / 2), 0.5), (0.6, 0.6, 0.1, 0.1, 0.75),
                         (0.5, 0.5, 0.1, 0.1, 0.09)]})
    out = gen(features(), [(H, W)])
    assert "P4" not in out.patches
    # just inside every bound
    fixed_rows(gen, {0: [(0.3, 0.3, 119 / (W / 2), 20 / (H / 2), 0.11)]})
    gen.proj_patch.rows = [anchors_row(K2, [])]
    out = gen(features(), [(H, W)])
    assert len(out.patches["P4"].crops) == 1


def test_inference_levels_stop_probing():
    gen = make_generator(inference_levels="P5P6")
    fixed_rows(gen, {0: [(0.3, 0.3, 0.1, 0.1, 0.5)]})
    out = gen(features(), [(H, W)])
    assert "P4" not in out.patches
    # manual stop: the selected anchor is kept (no replacement)
    assert torch.isclose(out.boxes[0, :, :2], torch.tensor([0.15 * W, 0.15 * H]), atol=1e-2).all(-1).any()


def test_patch_nms_merges_close_anchors_and_fast_cap():
    gen = make_generator()
    close = [(0.30 + 0.01 * i, 0.3, 0.05, 0.05, 0.5 - 0.01 * i) for i in range(3)]   # same 240-px square
    far = [(0.9, 0.9, 0.05, 0.05, 0.4)]
    fixed_rows(gen, {0: close + far})
    gen.proj_patch.rows = [anchors_row(K2, [])] * 2
    out = gen(features(), [(H, W)])
    assert len(out.patches["P4"].crops) == 2                      # NMS at IoU 0.25 keeps 2 patches
    gen.cfg.anchors.fast_max_patches = 1
    out = gen(features(), [(H, W)], fast=True)
    assert len(out.patches["P4"].crops) == 1                      # fast path: capped
    gen.cfg.anchors.max_patches = 1                               # the official CrowdHuman cap (60)
    out = gen(features(), [(H, W)])
    assert len(out.patches["P4"].crops) == 1                      # standard path: capped too


def test_fast_equals_official_without_early_stop():
    gen = make_generator()
    sel = [(0.2 + 0.25 * i, 0.3, 0.05, 0.05, 0.5) for i in range(3)] + [(0.5, 0.5, 0.8, 0.8, 0.9)]
    fixed_rows(gen, {0: sel})
    gen.proj_patch.rows = [anchors_row(K2, [(0.5, 0.5, 0.2, 0.2, 0.8)])] * 3
    feats = features()
    official = gen(feats, [(H, W)])
    fast = gen(feats, [(H, W)], fast=True)
    assert torch.equal(official.boxes, fast.boxes) and torch.equal(official.valid, fast.valid)
    # fewer than 3 selected: the fast path stops (keeps the anchors), the official one probes
    fixed_rows(gen, {0: sel[:2] + sel[3:]})
    official = gen(feats, [(H, W)])
    fast = gen(feats, [(H, W)], fast=True)
    assert "P4" in official.patches and "P4" not in fast.patches
    assert fast.valid.sum() == 5                                   # 3 kept (> eta_f) + 2 by the min rule
    kept = fast.boxes[0, fast.valid[0]]
    assert torch.isclose(kept[:, :2], torch.tensor([0.1 * W, 0.15 * H]), atol=1e-2).all(-1).any()


def test_fast_mode_batch_with_empty_selection_matches_batch_one():
    gen = make_generator()
    busy = {0: [(0.2 + 0.25 * i, 0.3, 0.05, 0.05, 0.5) for i in range(3)]}
    idle = {1: [(0.5, 0.5, 0.5, 0.5, 0.9)]}
    rows_busy = [anchors_row(K1, busy.get(p, [])) for p in range(5)]
    rows_idle = [anchors_row(K1, idle.get(p, [])) for p in range(5)]
    gen.proj_patch.rows = [anchors_row(K2, [(0.5, 0.5, 0.2, 0.2, 0.8)])] * 3
    feats = features(2)
    gen.proj_all.rows = rows_busy + rows_idle
    both = gen(feats, [(H, W), (H, W)], fast=True)
    for b, rows in enumerate((rows_busy, rows_idle)):
        gen.proj_all.rows = rows
        single = gen([f[b:b + 1] for f in feats], [(H, W)], fast=True)
        n = int(single.valid.sum())
        assert int(both.valid[b].sum()) == n
        assert torch.allclose(both.boxes[b, :n], single.boxes[0, :n])
    # nothing selected anywhere: no crash, fixed anchors only
    gen.proj_all.rows = rows_idle + rows_idle
    out = gen(feats, [(H, W), (H, W)], fast=True)
    assert "P4" not in out.patches and (out.valid.sum(1) == 5).all()


def test_padding_whole_image_boxes_at_the_end():
    gen = make_generator()
    rows_few = [anchors_row(K1, []) for _ in range(5)]
    rows_many = [anchors_row(K1, [(0.5, 0.5, 0.5, 0.5, 0.9)] * 10) for _ in range(5)]
    gen.proj_all.rows = rows_few + rows_many
    out = gen(features(2), [(H, W), (H - 32, W - 64)])
    assert out.valid.sum(1).tolist() == [5, 50]
    assert out.valid[0, :5].all() and not out.valid[0, 5:].any()
    assert torch.equal(out.boxes[0, 5:], torch.tensor([W / 2, H / 2, W, H]).expand(45, 4))


# ------------------------------------------------------------------ geometry helpers
def test_crop_positions_stay_inside_the_image():
    centers = torch.tensor([[5.0, 5.0], [630.0, 470.0], [320.0, 240.0]])
    crops = crop_positions(centers, 16, torch.tensor([[W, H]] * 3, dtype=torch.float32))
    assert crops[0].tolist() == [0, 0]
    assert crops[1].tolist() == [math.ceil(W / 16) - 15, math.ceil(H / 16) - 15]
    assert crops[2].tolist() == [math.floor(320 / 16 - 7.5), math.floor(240 / 16 - 7.5)]
    assert (crops >= 0).all() and (crops[:, 0] <= math.ceil(W / 16) - 15).all()


def test_probe_conversion_and_target_inverse():
    crops = torch.tensor([[3, 4]])
    anchors = torch.tensor([[[0.5, 0.5, 0.999999, 0.999999, 10.0]]])
    out = patch_to_image(anchors, crops, 8, torch.tensor([[W, H]], dtype=torch.float32))
    assert torch.allclose(out[0, 0, :4], torch.tensor([(3 + 7.5) * 8, (4 + 7.5) * 8, 120.0, 120.0]), atol=1e-3)
    # target mapping is the inverse: u = (x_px / s - x0) / 15
    box = torch.tensor([[(3 + 6) * 8 / W, (4 + 9) * 8 / H, 16 / W, 24 / H]])
    tgt = probe_patch_targets(box, crops[0], 8, torch.tensor([W, H], dtype=torch.float32))
    assert torch.allclose(tgt, torch.tensor([[6 / 15, 9 / 15, 2 / 15, 3 / 15]]), atol=1e-5)
    # centre outside or object larger than the patch: no target
    assert len(probe_patch_targets(torch.tensor([[0.9, 0.9, 0.01, 0.01]]), crops[0], 8,
                                   torch.tensor([W, H], dtype=torch.float32))) == 0
    # a probe anchor centred beyond the image edge, or under 3 px, gets probability 0
    edge = patch_to_image(torch.tensor([[[0.99, 0.5, 0.5, 0.5, 10.0], [0.5, 0.5, 0.001, 0.5, 10.0]]]),
                          torch.tensor([[78, 0]]), 8, torch.tensor([[W, H]], dtype=torch.float32))
    assert edge[0, :, 4].tolist() == [0.0, 0.0]


def test_cut_patches_matches_slicing():
    fmap = torch.randn(2, 3, 20, 25)
    crops = torch.tensor([[0, 0], [10, 5], [20, 10]])                # the last reads beyond the map
    images = torch.tensor([0, 1, 1])
    tokens = cut_patches(fmap, crops, images)
    assert tokens.shape == (3, 225, 3)
    assert torch.equal(tokens[1].T.reshape(3, 15, 15), fmap[1, :, 5:20, 10:25])
    assert torch.equal(tokens[2].T.reshape(3, 15, 15)[:, :10, :5], fmap[1, :, 10:20, 20:25])
    assert tokens[2].T.reshape(3, 15, 15)[:, :, 5:].abs().sum() == 0


def test_fixed_and_p6_targets():
    boxes = torch.tensor([[0.75, 0.75, 0.1, 0.2], [0.5, 0.25, 0.2, 0.2], [0.2, 0.2, 0.8, 0.3]])
    br = fixed_patch_targets(boxes, 3)
    assert torch.allclose(br, torch.tensor([[0.5, 0.5, 0.2, 0.4]]))
    # a centre exactly on 0.5 belongs to TL and TR; the big box is clipped to TL's quarter
    tl, tr = fixed_patch_targets(boxes, 0), fixed_patch_targets(boxes, 1)
    assert len(tl) == 2 and len(tr) == 1
    assert torch.allclose(tl[1], torch.tensor([0.5, 0.4, 1.0, 0.6]))
    hflip = flipped_p6_targets(boxes[:1], 1)
    assert torch.allclose(hflip, torch.tensor([[0.25, 0.75, 0.1, 0.2]]))
    bug = flipped_p6_targets(boxes[:1], 3, official_bug=True)
    assert torch.allclose(bug, torch.tensor([[0.9, 0.8, 0.25, 0.25]]))


def test_ground_truth_and_random_patches():
    torch.manual_seed(0)
    boxes = torch.tensor([[100.0, 100.0, 150.0, 140.0], [105.0, 102.0, 150.0, 140.0], [600.0, 440.0, 630.0, 470.0],
                          [0.0, 0.0, 300.0, 300.0]])
    for _ in range(10):
        crops = ground_truth_patches(boxes, 16, (W, H))
        assert len(crops) == 2                                     # duplicates merged, the big box skipped
        origin = crops.float() * 16
        for box in boxes[[0, 2]]:
            # the box's top-left is inside; its far corner at most one cell out (official floor)
            contains = ((origin <= box[:2]) & (origin + 240 + 16 >= box[2:])).all(1)
            assert contains.any()
        assert (crops >= 0).all() and (crops[:, 0] <= math.ceil(W / 16) - 15).all()
    rnd = random_patches(50, 8, (W, H))
    assert rnd[:, 0].max() <= math.ceil(W / 8) - 15 - 1 and rnd.min() >= 0


def test_training_patches_per_level():
    cfg = ASAGConfig(anchors=AnchorGeneratorConfig(compress_hidden=4, target_patch_iters=1))
    gen = AnchorGenerator(cfg, in_channels=8).train()
    targets = [{"boxes": torch.tensor([[100.0, 100.0, 140.0, 130.0]])}, {"boxes": torch.zeros(0, 4)}]
    out = gen(features(2), [(H, W), (H, W)], targets)               # iteration 0: GT patches are generated
    for level in ("P4", "P3"):
        p = out.patches[level]
        assert (torch.bincount(p.image_index, minlength=2) >= 4).all()
        assert p.generated[p.image_index == 0].sum() == 1 and p.generated[p.image_index == 1].sum() == 0
    assert out.patches["p6"].anchors.shape[0] == 8                 # 4 flipped copies per image
    out = gen(features(2), [(H, W), (H, W)], targets)               # iteration 1: GT patches are loss-only
    assert (torch.bincount(out.patches["P4"].image_index, minlength=2) >= 4).all()
    assert int(gen.train_steps) == 2


def test_parameter_counts_match_the_official_generator():
    assert sum(p.numel() for p in AnchorGenerator(ASAGConfig(), 256).parameters()) == 6_097_494
    assert sum(p.numel() for p in AnchorGenerator(ASAGConfig(setting=300), 256).parameters()) == 6_748_144


def test_probing_continues_from_p4_to_p3():
    gen = make_generator()
    confident = [(0.5, 0.5, 0.9, 0.9, 0.95)] * 5
    fixed_rows(gen, {0: [(0.3, 0.4, 0.1, 0.1, 0.5)] + confident})
    # P4 patch: one small unsure anchor (12 px, 0.6) -> probed again on P3; P3 patch: one anchor.
    gen.proj_patch.rows = [anchors_row(K2, [(0.2, 0.7, 0.05, 0.05, 0.6)])]
    out = gen(features(), [(H, W)])
    x4, y4 = out.patches["P4"].crops[0].tolist()
    centre = torch.tensor([(x4 + 15 * 0.2) * 16, (y4 + 15 * 0.7) * 16])
    assert out.patches["P3"].crops[0].tolist() == crop_positions(centre[None], 8, torch.tensor([[W, H]]))[0].tolist()
    levels = out.levels[0, out.valid[0]]
    assert (levels == 4).sum() == 0 and (levels == 3).sum() == 1    # the P4 anchor was replaced by P3's
