"""TSP-FCOS (tsp.md §2): assignment, FoI selection, positional encoding, restricted matching,
losses, inference, converter and config errors, on hand cases and brute force."""
from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from sparsedet import build_model, convert_checkpoint
from sparsedet.config import ConfigError
from sparsedet.models.fcos.targets import fcos_assignment, level_points
from sparsedet.models.tsp.fcos_losses import ltrb_giou, tsp_fcos_losses
from sparsedet.models.tsp.fcos_position import fcos_location_encoding, level_padding_masks
from sparsedet.models.tsp.fcos_postprocess import tsp_fcos_detections
from sparsedet.models.tsp.foi_selection import foi_scores, random_keep, select_top_fois
from sparsedet.models.tsp.restricted_matching import restricted_match

TINY = ["model.backbone.weights=null", "model.num_classes=5", "model.fpn.channels=32", "model.head.num_groups=8",
        "model.transformer.d_model=32", "model.transformer.nhead=2", "model.transformer.dim_feedforward=64",
        "model.foi.num_foi=50"]


def tiny_model(*extra: str):
    return build_model("tsp_fcos/mobilenetv2_fpn_cpu", TINY + list(extra))


# ---------------------------------------------------------------- FCOS assignment (§2.3)
def test_fcos_assignment_on_hand_made_boxes():
    # One level, stride 8, 8x8 map: points at 4, 12, ..., 60.
    points = [level_points(8, 8, 8)]
    boxes = torch.tensor([[0.0, 0.0, 64.0, 64.0],     # big: centre (32, 32), area 4096
                          [20.0, 20.0, 44.0, 44.0]])  # small, same centre, area 576
    labels = torch.tensor([2, 4])
    classes, ltrb, gt = fcos_assignment(points, [8], [(-1, 64)], boxes, labels, 5, 1.5)
    grid = lambda t: t.view(8, 8)
    # Centre sampling: strictly inside [32 - 12, 32 + 12] (clipped to the box) -> x, y in {28, 36}, and
    # {20 < 20 false}: points 28 and 36 only; 20 is on the border (not strictly inside).
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[3:5, 3:5] = True
    assert torch.equal(grid(classes != 5), inside)
    # Both GTs qualify there; the smaller area wins; max side to the big box is 36 <= 64 for both.
    assert torch.equal(grid(gt)[inside], torch.ones(4, dtype=torch.int64))
    assert torch.equal(grid(classes)[inside], torch.full((4,), 4))
    assert torch.equal(grid(gt)[~inside], torch.full((60,), -1))
    # Point (28, 28): ltrb to the small box = (8, 8, 16, 16).
    assert ltrb[3 * 8 + 3].tolist() == [8.0, 8.0, 16.0, 16.0]
    # Scale range: with P3 limited to [-1, 10] nothing qualifies (max side 16 > 10).
    classes, _, gt = fcos_assignment(points, [8], [(-1, 10)], boxes, labels, 5, 1.5)
    assert bool((classes == 5).all()) and bool((gt == -1).all())


# ---------------------------------------------------------------- restricted matching (§2.7.3)
@pytest.mark.parametrize("seed", range(5))
def test_restricted_matching_equals_hungarian_on_the_restricted_matrix(seed):
    g = torch.Generator().manual_seed(seed)
    num_gt, n = 6, 40
    gt_index = torch.randint(-1, num_gt, (n,), generator=g)
    gt_index[gt_index == 2] = -1  # GT 2 has no candidate: stays unmatched
    cost = torch.rand(n, generator=g) * 3 - 1
    matched = restricted_match(cost, gt_index, num_gt)
    big = 1e6  # +inf outside each GT's candidates (scipy needs finite entries for a feasible problem)
    table = torch.full((num_gt, n), big)
    cols = (gt_index >= 0).nonzero().squeeze(1)
    table[gt_index[cols], cols] = cost[cols]
    rows, columns = linear_sum_assignment(table.numpy())
    expected = torch.full((num_gt,), -1)
    for r, c in zip(rows, columns):
        if table[r, c] < big:
            expected[r] = int(c)
    assert torch.equal(matched, expected)
    assert matched[2] == -1
    assert restricted_match(cost, torch.full((n,), -1), num_gt).eq(-1).all()


# ---------------------------------------------------------------- FoI selection (§2.4)
def test_foi_scores_lift_positives_and_topk():
    logits = torch.tensor([[[0.0, -1.0], [3.0, -2.0], [-4.0, -5.0], [-3.0, -3.5]]])   # (1, 4, 2)
    positive = torch.tensor([[False, False, True, False]])
    s = foi_scores(logits)
    assert torch.allclose(s, torch.sigmoid(torch.tensor([[0.0, 3.0, -4.0, -3.0]])))
    lifted = foi_scores(logits, positive)
    assert lifted[0, 2].item() == pytest.approx((torch.sigmoid(torch.tensor(-4.0)).item() + 1) / 2)
    assert select_top_fois(lifted, 2).tolist() == [[1, 2]]  # the lifted positive beats 0.5
    with pytest.raises(ConfigError, match="model.foi.num_foi=5"):
        select_top_fois(s, 5)
    assert select_top_fois(s, 5, clamp=True).shape == (1, 4)


def test_random_keep_range():
    g = torch.Generator().manual_seed(0)
    kept = [random_keep(700, 0.7, g) for _ in range(400)]
    sizes = torch.tensor([k.numel() for k in kept])
    assert sizes.min() >= int(700 * 0.7) and sizes.max() <= 700
    assert sizes.min() < 500 and sizes.max() > 680          # the whole (0.7, 1] range is used
    assert all(k.unique().numel() == k.numel() and int(k.max()) < 700 for k in kept)
    assert random_keep(700, 1.0, g).numel() == 700


# ---------------------------------------------------------------- positional encoding (§2.5)
def test_location_encoding_at_hand_picked_positions():
    # Image 0 fills 64 x 96 of a 64 x 128 batch; image 1 fills 32 x 128. P3 (stride 8) is 8 x 16.
    masks = level_padding_masks([(64, 96), (32, 128)], (64, 128), [(8, 16), (4, 8)])
    assert masks[0][0, :, 12:].all() and not masks[0][0, :, :12].any()
    assert masks[0][1, 4:].all() and not masks[0][1, :4].any()
    d = 16
    embedding = torch.zeros(2, d)
    embedding[1] = 1.0
    enc = fcos_location_encoding(masks, embedding)                     # (2, 8*16 + 4*8, 16)
    assert enc.shape == (2, 160, d)
    at = lambda b, i, j: enc[b, i * 16 + j]
    two_pi = 2 * math.pi
    # Image 0, cell (2, 5): y = 3/8 * 2pi, x = 6/12 * 2pi; [sin y, cos y, ...] then [sin x, cos x, ...].
    y, x = 3 / 8 * two_pi, 6 / 12 * two_pi
    e = at(0, 2, 5)
    assert e[0].item() == pytest.approx(math.sin(y), abs=1e-5)
    assert e[1].item() == pytest.approx(math.cos(y), abs=1e-5)
    assert e[2].item() == pytest.approx(math.sin(y / 10000 ** (2 / 8)), abs=1e-5)
    assert e[8].item() == pytest.approx(math.sin(x), abs=1e-5)
    assert e[9].item() == pytest.approx(math.cos(x), abs=1e-5)
    # Right of image 0 in a valid row: x = 2pi (cumsum stops at the valid width).
    assert at(0, 2, 14)[8].item() == pytest.approx(math.sin(two_pi), abs=1e-4)
    assert at(0, 2, 14)[9].item() == pytest.approx(1.0, abs=1e-4)
    # Image 1, fully padded row 6: x = 0 (sin 0, cos 0) and y = 4/4 * 2pi.
    assert at(1, 6, 3)[8:10].tolist() == pytest.approx([0.0, 1.0], abs=1e-5)
    assert at(1, 6, 3)[0].item() == pytest.approx(math.sin(two_pi), abs=1e-4)
    # The second level's learnable vector is added to each of its cells.
    level1 = fcos_location_encoding([masks[1]], torch.zeros(1, d))
    assert torch.allclose(enc[:, 128:], level1 + 1.0)


# ---------------------------------------------------------------- losses (§2.7)
def test_ltrb_giou_hand_values():
    pred = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 0.0, 1.0]])
    target = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
    giou = ltrb_giou(pred, target)
    assert giou[0].item() == pytest.approx(1.0)
    # Second: pred area 2*1 = 2, target 1*1 = 1, intersection 0, union 3, enclosure (2+1)*(1+1) = 6.
    assert giou[1].item() == pytest.approx((0 + 1) / (3 + 1) - (6 - 3) / 6)


def _focal(logit, target, alpha=0.25, gamma=2.0):
    p = float(torch.sigmoid(torch.tensor(logit)))
    ce = -math.log(p) if target else -math.log(1 - p)
    pt = p if target else 1 - p
    return (alpha if target else 1 - alpha) * ce * (1 - pt) ** gamma


def test_loss_terms_on_a_hand_case():
    K = 2
    # Locations: 3, one positive of class 1.
    foi_logits = torch.tensor([[0.5, -1.0], [0.0, 0.0], [-2.0, 1.0]])
    location_labels = torch.tensor([K, K, 1])
    # Selected FoIs: 3, FoIs 0 and 2 belong to GT 0 (class 1), FoI 1 is background.
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0], [0.0, -1.0]])
    ltrb = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [2.0, 1.0, 1.0, 1.0]])
    target = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    labels = torch.tensor([1, K, 1])
    ctr = torch.tensor([0.8, 0.0, 0.5])
    centerness = torch.tensor([0.3, 9.0, -0.2])
    gt_index = torch.tensor([0, -1, 0])
    losses = tsp_fcos_losses(foi_logits, location_labels, logits, ltrb, centerness, labels, target, ctr,
                             gt_index, num_gt=1)
    # 1. FoI classifier: focal over all 6 entries / 1 positive.
    local = sum(_focal(foi_logits[i, c].item(), location_labels[i].item() == c) for i in range(3) for c in range(K))
    assert losses["loss_fcos_local_cls"].item() == pytest.approx(local, rel=1e-5)
    # 3. Matching: FoI 0 costs -sigmoid(2)*0.8 + 2*(1 - 1); FoI 2 costs more -> FoI 0 is the match.
    giou2 = ltrb_giou(ltrb[2:3], target[2:3]).item()
    assert -torch.sigmoid(torch.tensor(2.0)).item() * 0.8 < -torch.sigmoid(torch.tensor(-1.0)).item() * 0.5 + 2 * (1 - giou2)
    # 4. Set classification: FoI 0 positive at class 1; FoI 2 a duplicate (weight 0.1 at class 1).
    total = 0.0
    for i in range(3):
        for c in range(K):
            w = 0.1 if (i == 2 and c == 1) else 1.0
            total += w * _focal(logits[i, c].item(), i == 0 and c == 1)
    assert losses["loss_fcos_cls"].item() == pytest.approx(total / (2 * (1 + 0.1 * 2)), rel=1e-5)
    # 5. Centerness-weighted GIoU over both eligible FoIs.
    loc = (0.8 * 0.0 + 0.5 * (1 - giou2)) / 1.3
    assert losses["loss_fcos_loc"].item() == pytest.approx(loc, rel=1e-5)
    # 6. Centerness BCE over the eligible FoIs / |E|.
    bce = lambda z, t: -(t * math.log(torch.sigmoid(torch.tensor(z)).item())
                         + (1 - t) * math.log(1 - torch.sigmoid(torch.tensor(z)).item()))
    assert losses["loss_fcos_ctr"].item() == pytest.approx((bce(0.3, 0.8) + bce(-0.2, 0.5)) / 2, rel=1e-5)
    # Without the set loss, both eligible FoIs are positives with weight 1, normalised by |E|.
    plain = tsp_fcos_losses(foi_logits, location_labels, logits, ltrb, centerness, labels, target, ctr,
                            gt_index, num_gt=1, set_loss="none")
    total = sum(_focal(logits[i, c].item(), i in (0, 2) and c == 1) for i in range(3) for c in range(K))
    assert plain["loss_fcos_cls"].item() == pytest.approx(total / 2, rel=1e-5)


def test_losses_without_eligible_fois_or_gts():
    K = 3
    losses = tsp_fcos_losses(torch.zeros(4, K, requires_grad=True), torch.full((4,), K),
                             torch.zeros(2, K, requires_grad=True), torch.ones(2, 4, requires_grad=True),
                             torch.zeros(2, requires_grad=True), torch.full((2,), K), torch.zeros(2, 4),
                             torch.zeros(2), torch.full((2,), -1), num_gt=0)
    assert losses["loss_fcos_loc"].item() == 0.0 and losses["loss_fcos_ctr"].item() == 0.0
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


# ---------------------------------------------------------------- inference (§2.8)
def test_detections_per_level_topk_nms_and_sqrt_score():
    K = 2
    logits = torch.tensor([[3.0, -9.0], [2.0, -9.0], [-9.0, 1.0], [0.0, -9.0]])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 9.0], [0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
    levels = torch.tensor([0, 0, 0, 1])
    out = tsp_fcos_detections(logits, boxes, levels, 2, topk_candidates=2, score_threshold=0.0, nms_threshold=0.6,
                              max_detections=100, image_size=(100, 100))
    # Level 0 keeps its 2 best pairs (FoI 0 / class 0 and FoI 1 / class 0); FoI 1 is suppressed by
    # FoI 0 (IoU 0.9, same class); FoI 2 / class 1 is the 3rd pair of level 0 (dropped by the top-2).
    # Level 1 keeps both pairs of FoI 3: every score > 0 passes the official threshold 0.
    sig = lambda z: torch.sigmoid(torch.tensor(z)).item()
    assert out["labels"].tolist() == [0, 0, 1]
    assert out["scores"].tolist() == pytest.approx([math.sqrt(sig(3.0)), math.sqrt(0.5), math.sqrt(sig(-9.0))])
    assert out["boxes"][1].tolist() == [50.0, 50.0, 60.0, 60.0]
    strict = tsp_fcos_detections(logits, boxes, levels, 2, 2, 0.01, 0.6, 100, (100, 100))
    assert strict["labels"].tolist() == [0, 0]


# ---------------------------------------------------------------- the model
def test_tiny_model_trains_and_predicts():
    torch.manual_seed(0)
    model = tiny_model()
    images = [torch.rand(3, 96, 128) * 255, torch.rand(3, 80, 112) * 255]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 90.0, 80.0], [50.0, 40.0, 70.0, 60.0]]), "labels": torch.tensor([1, 3])},
               {"boxes": torch.tensor([[0.0, 0.0, 100.0, 70.0]]), "labels": torch.tensor([0])}]
    losses = model(images, targets)
    assert set(losses) == {"loss_fcos_local_cls", "loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"}
    sum(losses.values()).backward()
    assert model.transformer_encoder.layers[0].linear1.weight.grad is not None
    assert model.fcos_head.bbox_tower[0].weight.grad.abs().sum() > 0   # only through the transformer
    model.eval()
    with torch.no_grad():
        out = model(images, original_sizes=[(192, 256), (80, 112)])
    assert len(out) == 2 and out[0]["boxes"].shape[1] == 4 and len(out[0]["scores"]) <= 100
    assert (out[0]["boxes"][:, 2] <= 256).all()
    sel = model.last_selection["images"][0]
    assert sel["points"].shape == (50, 2) and sel["levels"].max() < 5


def test_position_encoding_off_and_no_drop_are_deterministic_switches():
    torch.manual_seed(0)
    model = tiny_model("model.position_encoding=none", "model.foi.keep_min=1.0", "model.transformer.dropout=0.0")
    image = [torch.rand(3, 128, 160) * 255]  # P7 needs > 1 value per channel for train-mode BN
    target = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 40.0]]), "labels": torch.tensor([2])}]
    a, b = model(image, target), model(image, target)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("override, key", [
    ("model.position_encoding=cosine", "model.position_encoding"),
    ("model.loss.set_loss=hungarian", "model.loss.set_loss"),
    ("model.loss.class_normaliser=mean", "model.loss.class_normaliser"),
    ("model.foi.keep_min=0", "model.foi.keep_min"),
    ("model.fpn.out_levels=[3, 4, 5, 6, 7, 8]", "model.fpn.out_levels"),
    ("model.fpn.in_stages=[3, 4, 5, 6]", "model.fpn.in_stages"),
    ("model.foi.nmu_foi=10", "model.foi.num_foi"),
])
def test_bad_configs_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        tiny_model(override)


def test_num_foi_above_the_locations_is_a_clear_error():
    model = tiny_model("model.foi.num_foi=5000").eval()
    with pytest.raises(ConfigError, match=r"model\.foi\.num_foi=5000 .* 5 \d+ feature-map locations|model\.foi\.num_foi=5000"):
        model([torch.rand(3, 64, 64) * 255])
    model.cfg.foi.clamp_to_locations = True
    assert len(model([torch.rand(3, 64, 64) * 255])) == 1


def test_parameter_counts_match_the_spec():
    with torch.device("meta"):
        r50 = build_model("tsp_fcos/r50_fpn_3x")
        r101 = build_model("tsp_fcos/r101_fpn_3x")
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(r50) / 1e6 == pytest.approx(51.46, abs=0.005)
    assert count(r101) / 1e6 == pytest.approx(70.40, abs=0.005)


# ---------------------------------------------------------------- converter (§6)
def official_tsp_fcos_state(depth: int = 50, num_classes: int = 80) -> "OrderedDict[str, torch.Tensor]":
    """A state_dict with the official names and shapes of tsp.md §6.1-6.3 (random values)."""
    g = torch.Generator().manual_seed(0)
    s = OrderedDict()
    put = lambda k, *shape: s.__setitem__(k, torch.randn(*shape, generator=g) * 0.01)
    norm = lambda k, c: [put(f"{k}.{n}", c) for n in ("weight", "bias", "running_mean")] + \
        [s.__setitem__(f"{k}.running_var", torch.rand(c, generator=g) + 0.5)]
    b = "backbone.bottom_up."
    put(b + "stem.conv1.weight", 64, 3, 7, 7)
    norm(b + "stem.conv1.norm", 64)
    blocks = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    in_ch = 64
    for stage, (n, width) in enumerate(zip(blocks, (64, 128, 256, 512)), start=2):
        out_ch = 4 * width
        for i in range(n):
            p = f"{b}res{stage}.{i}."
            put(p + "conv1.weight", width, in_ch if i == 0 else out_ch, 1, 1)
            norm(p + "conv1.norm", width)
            put(p + "conv2.weight", width, width, 3, 3)
            norm(p + "conv2.norm", width)
            put(p + "conv3.weight", out_ch, width, 1, 1)
            norm(p + "conv3.norm", out_ch)
            if i == 0:
                put(p + "shortcut.weight", out_ch, in_ch, 1, 1)
                norm(p + "shortcut.norm", out_ch)
        in_ch = out_ch
    for k, c in zip((3, 4, 5), (512, 1024, 2048)):
        put(f"backbone.fpn_lateral{k}.weight", 256, c, 1, 1)
        put(f"backbone.fpn_lateral{k}.bias", 256)
        put(f"backbone.fpn_output{k}.weight", 256, 256, 3, 3)
        put(f"backbone.fpn_output{k}.bias", 256)
    for p in ("p6", "p7"):
        put(f"backbone.top_block.{p}.conv.weight", 256, 256, 3, 3)
        put(f"backbone.top_block.{p}.conv.bias", 256)
        norm(f"backbone.top_block.{p}.bn", 256)
        s[f"backbone.top_block.{p}.bn.num_batches_tracked"] = torch.tensor(1000)
    for tower in ("cls_tower", "bbox_tower"):
        for i in (0, 3, 6, 9):
            put(f"fcos_head.{tower}.{i}.weight", 256, 256, 3, 3)
            put(f"fcos_head.{tower}.{i}.bias", 256)
            put(f"fcos_head.{tower}.{i + 1}.weight", 256)
            put(f"fcos_head.{tower}.{i + 1}.bias", 256)
    put("fcos_head.cls_logits.weight", num_classes, 256, 3, 3)
    put("fcos_head.cls_logits.bias", num_classes)
    for i in range(6):
        p = f"transformer_encoder.layers.{i}."
        put(p + "self_attn.in_proj_weight", 1536, 512)
        put(p + "self_attn.in_proj_bias", 1536)
        put(p + "self_attn.out_proj.weight", 512, 512)
        put(p + "self_attn.out_proj.bias", 512)
        put(p + "linear1.weight", 2048, 512)
        put(p + "linear1.bias", 2048)
        put(p + "linear2.weight", 512, 2048)
        put(p + "linear2.bias", 512)
        for n in ("norm1", "norm2"):
            put(p + n + ".weight", 512)
            put(p + n + ".bias", 512)
    put("transformer_encoder.norm.weight", 512)
    put("transformer_encoder.norm.bias", 512)
    put("pyramid_position_embedding", 5, 512)
    put("enc_proj.weight", 512, 512)
    put("enc_proj.bias", 512)
    put("post_enc_proj_norm.weight", 512)
    put("post_enc_proj_norm.bias", 512)
    put("cls_logits.weight", num_classes, 512)
    put("cls_logits.bias", num_classes)
    put("bbox_pred.weight", 4, 512)
    put("bbox_pred.bias", 4)
    put("ctrness.weight", 1, 512)
    put("ctrness.bias", 1)
    put("scales", 5)
    s["pixel_mean"] = torch.tensor([103.530, 116.280, 123.675]).view(3, 1, 1)
    s["pixel_std"] = torch.ones(3, 1, 1)
    return s


def test_converter_uses_every_official_key_and_fills_every_model_key(tmp_path):
    official = official_tsp_fcos_state()
    result = convert_checkpoint("tsp_fcos", {"model": official, "iteration": 5}, tmp_path / "converted.pth")
    assert len(result.state_dict) == len(official) - 2            # all but pixel_mean / pixel_std
    assert result.config_overrides["model.backbone.depth"] == 50
    with torch.device("meta"):
        model = build_model("tsp_fcos/r50_fpn_3x", result.config_overrides)
    assert list(result.state_dict) == list(model.state_dict())   # every model key filled
    # Values travel unchanged under the mapped names.
    sd = result.state_dict
    assert torch.equal(sd["backbone.body.layer2.0.downsample.1.running_var"],
                       official["backbone.bottom_up.res3.0.shortcut.norm.running_var"])
    assert torch.equal(sd["backbone.fpn.inner_blocks.2.0.weight"], official["backbone.fpn_lateral5.weight"])
    assert torch.equal(sd["backbone.fpn.extra_blocks.p7.bn.running_mean"], official["backbone.top_block.p7.bn.running_mean"])
    assert torch.equal(sd["fcos_head.bbox_tower.10.bias"], official["fcos_head.bbox_tower.10.bias"])
    # The written file loads strictly into the bundled config, and the model runs.
    model = build_model("tsp_fcos/r50_fpn_3x")
    model.load_state_dict(torch.load(tmp_path / "converted.pth", weights_only=True))
    model.eval()
    # sparsedet.load recognises an official file and converts it on the fly.
    import sparsedet

    torch.save({"model": official, "iteration": 5}, tmp_path / "official.pth")
    loaded = sparsedet.load(tmp_path / "official.pth")
    assert loaded.config["model"]["name"] == "tsp_fcos" and not loaded.training
    assert torch.equal(loaded.state_dict()["scales"], official["scales"])
    with torch.no_grad():
        out = model([torch.rand(3, 256, 256) * 255])  # 1364 locations >= 700 FoIs
    assert out[0]["boxes"].shape[1] == 4


def test_converter_infers_r101_and_refuses_other_checkpoints():
    r101 = convert_checkpoint("tsp_fcos", official_tsp_fcos_state(depth=101, num_classes=3))
    assert r101.config_overrides["model.backbone.depth"] == 101
    assert r101.config_overrides["model.num_classes"] == 3
    sparse_rcnn = {"backbone.bottom_up.stem.conv1.weight": torch.zeros(64, 3, 7, 7),
                   "init_proposal_features.weight": torch.zeros(100, 256),
                   "head.head_series.0.class_logits.weight": torch.zeros(80, 256)}
    with pytest.raises(ValueError, match="not an official TSP-FCOS checkpoint.*Sparse R-CNN|not an official TSP-FCOS"):
        convert_checkpoint("tsp_fcos", sparse_rcnn)
    querydet = {"backbone.bottom_up.stem.conv1.weight": torch.zeros(64, 3, 7, 7),
                "query_head.layer_0.weight": torch.zeros(256, 256, 3, 3)}
    with pytest.raises(ValueError, match="not an official TSP-FCOS checkpoint.*QueryDet"):
        convert_checkpoint("tsp_fcos", querydet)
    broken = official_tsp_fcos_state()
    del broken["enc_proj.weight"]
    with pytest.raises(ValueError, match="enc_proj.weight"):
        convert_checkpoint("tsp_fcos", broken)
    extra = official_tsp_fcos_state()
    extra["backbone.bottom_up.res3.0.conv2_offset.weight"] = torch.zeros(27, 128, 3, 3)
    with pytest.raises(ValueError, match="conv2_offset"):
        convert_checkpoint("tsp_fcos", extra)


# ---------------------------------------------------------------- --explain
def test_explain_draws_the_selected_fois():
    from sparsedet.explain import explain_prediction

    model = tiny_model("input.min_size_test=96", "input.max_size_test=128").eval()
    picture = explain_prediction(model, torch.rand(3, 120, 160) * 255)
    assert picture.size[0] > 400 and picture.size[1] > 200
    assert not model.training
    sel = model.last_selection["images"][0]
    assert sel["points"].shape[0] == 50 and (sel["scores"] > 0).all()


# ---------------------------------------------------------------- trainer: exact resume
def test_trainer_resumes_tsp_fcos_exactly(tmp_path, single_thread):
    """The random FoI keep and dropout draw from the checkpointed RNG, and the SGD + AdamW pair is
    restored: the steps after a resume equal the uninterrupted run's."""
    import json

    from sparsedet.config import load_config
    from sparsedet.data.synthetic import write_synthetic_coco
    from sparsedet.engine.trainer import Trainer

    data = write_synthetic_coco(tmp_path / "data", num_train=4, num_val=2, seed=0, height=96, width=128)

    def config(max_iter):
        overrides = TINY + [
            "model.backbone.weights=null", "model.backbone.freeze_at=5",
            f"data.train.annotations={data['train']['annotations']}", f"data.train.images={data['train']['images']}",
            "data.val=null", "data.num_workers=0", "input.min_size_train=[96]", "input.max_size_train=128",
            "solver.images_per_batch=2", f"solver.max_iter={max_iter}", "solver.steps=[3]", "solver.warmup_iters=1",
            "solver.log_period=1", "solver.eval_period=0", "solver.checkpoint_period=0", "solver.seed=5"]
        return load_config("tsp_fcos/mobilenetv2_fpn_cpu", overrides)

    def losses(folder):
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return {r["iteration"]: r["total_loss"] for r in rows if r["type"] == "train"}

    Trainer(config(4), tmp_path / "straight", progress=False).train()
    Trainer(config(2), tmp_path / "resumed", progress=False).train()
    Trainer(config(4), tmp_path / "resumed", resume=True, progress=False).train()
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert resumed[3] == straight[3] and resumed[4] == straight[4], (straight, resumed)


def test_detr_loss_baseline_matches_any_gt_of_the_image():
    from sparsedet.models.tsp.fcos_detr_loss import tsp_fcos_detr_losses

    K = 2
    # One image, 3 FoIs, 1 GT of class 1 at [0, 0, 10, 10]: FoI 1 predicts it exactly and is matched
    # although it could sit anywhere (no FCOS restriction).
    logits = torch.tensor([[[0.0, 0.0], [0.0, 3.0], [1.0, 0.0]]])
    boxes = torch.tensor([[[20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 5.0, 5.0]]])
    centerness = torch.tensor([[0.0, 0.5, 0.0]])
    points = torch.tensor([[[25.0, 25.0], [5.0, 5.0], [2.0, 2.0]]])
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([1])}]
    losses = tsp_fcos_detr_losses(logits, boxes, centerness, points, targets, [(40, 40)])
    assert losses["loss_fcos_loc"].item() == pytest.approx(0.0, abs=1e-6)
    full = torch.cat((logits[0], torch.zeros(3, 1)), dim=1)
    ce = torch.nn.functional.cross_entropy(full, torch.tensor([2, 1, 2]), weight=torch.tensor([1.0, 1.0, 0.1]))
    assert losses["loss_fcos_cls"].item() == pytest.approx(ce.item(), rel=1e-5)
    # FoI 1 sits at the GT's centre: centerness target 1.
    expected = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor(0.5), torch.tensor(1.0))
    assert losses["loss_fcos_ctr"].item() == pytest.approx(expected.item(), rel=1e-5)
    model = tiny_model("model.loss.set_loss=detr")
    out = model([torch.rand(3, 128, 160) * 255],
                [{"boxes": torch.tensor([[10.0, 10.0, 90.0, 80.0]]), "labels": torch.tensor([2])}])
    assert set(out) == {"loss_fcos_local_cls", "loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"}
    sum(out.values()).backward()
