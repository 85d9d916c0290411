"""TSP-RCNN (spec tsp.md §3): anchors, RPN labels, proposal sampling, box encoding, restricted
matching vs scipy, each loss term on hand cases, the model's train/eval contract, cascade and DETR-loss
switches, and clear errors for bad configs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler

from sparsedet.config import ConfigError
from sparsedet.layers.anchors import cell_anchors
from sparsedet.layers.box_coder import BoxCoder
from sparsedet.models import build_model
from sparsedet.models.dense.iou_matcher import IoUMatcher
from sparsedet.models.faster_rcnn.rpn import label_rpn_anchors
from sparsedet.models.tsp.rcnn_box_encoding import box_position_encoding
from sparsedet.models.tsp.rcnn_config import ANCHOR_PRESETS, TSPRCNNLossConfig
from sparsedet.models.tsp.rcnn_detector import pad_per_image
from sparsedet.models.tsp.rcnn_losses import (box_regression_loss, detr_losses, set_classification_loss,
                                              tsp_losses)
from sparsedet.models.tsp.rcnn_matching import restricted_matching
from sparsedet.models.tsp.rcnn_proposal_sampling import (label_proposals, random_keep,
                                                         sample_foreground_background, sample_training_proposals)

TINY = ["model.backbone.depth=18", "model.backbone.layout=torchvision", "model.fpn.channels=32",
        "model.num_classes=5", "model.rpn.pre_nms_topk_train=200", "model.rpn.pre_nms_topk_test=200",
        "model.rpn.num_proposals=40", "model.roi_heads.batch_size_per_image=40", "model.roi_heads.d_model=64",
        "model.roi_heads.num_heads=4", "model.roi_heads.num_layers=1", "model.roi_heads.dim_feedforward=64"]


def tiny_model(*extra: str):
    return build_model("tsp_rcnn/r50_fpn_3x", TINY + list(extra))


# ---------------------------------------------------------------------------------------- anchors

def test_anchor_presets_keep_the_official_typo():
    official, retina = ANCHOR_PRESETS["official"], ANCHOR_PRESETS["retinanet"]
    assert official[0] == (32.0, 40.32, 51.80)
    assert retina[0][2] == pytest.approx(50.80, abs=5e-3)
    for level in range(1, 5):  # the other levels are the exact octave sizes, rounded to 2 decimals
        assert official[level] == pytest.approx(retina[level], abs=5e-3)
    model = tiny_model()
    cell = model.anchor_generator.cell_anchors(3)
    assert cell.shape == (9, 4)
    # size-major: anchors 6..8 have size 51.80 (sqrt of the area), ratios 0.5, 1, 2 (h / w)
    w, h = cell[:, 2] - cell[:, 0], cell[:, 3] - cell[:, 1]
    assert torch.sqrt(w * h)[6:].tolist() == pytest.approx([51.80] * 3, rel=1e-5)
    assert (h / w)[6:].tolist() == pytest.approx([0.5, 1.0, 2.0], rel=1e-5)
    retina_model = tiny_model("model.rpn.anchor_preset=retinanet")
    assert torch.allclose(retina_model.anchor_generator.cell_anchors(3), cell_anchors(retina[0], (0.5, 1.0, 2.0)))
    # grid offset 0: the first anchor of position (0, 0) is centred on the origin
    anchors = model.anchor_generator.grid_anchors(3, 2, 2)
    assert anchors.shape == (2 * 2 * 9, 4)
    assert anchors[:9].view(9, 2, 2).mean(1).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------- RPN labels

def test_rpn_labels_on_hand_made_boxes():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    anchors = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],    # IoU 1 -> positive
        [0.0, 0.0, 10.0, 8.0],     # IoU 0.8 -> positive
        [0.0, 0.0, 10.0, 5.0],     # IoU 0.5 -> ignored (0.3 <= IoU < 0.7)
        [0.0, 0.0, 10.0, 2.0],     # IoU 0.2 -> negative
        [50.0, 50.0, 60.0, 60.0],  # IoU 0 -> negative
    ])
    labels, deltas = label_rpn_anchors(anchors, [{"boxes": gt}], IoUMatcher((0.3, 0.7), True),
                                       BalancedPositiveNegativeSampler(256, 0.5), BoxCoder((1, 1, 1, 1)))
    assert labels[0].tolist() == [1.0, 1.0, -1.0, 0.0, 0.0]
    assert torch.allclose(deltas[0, 1], torch.tensor([0.0, 0.1 / 0.8 * 1.0, 0.0, math.log(10 / 8)]), atol=1e-6)
    # low-quality match: a GT whose best anchor has IoU 0.5 still gets that anchor as positive
    labels, _ = label_rpn_anchors(anchors[2:], [{"boxes": gt}], IoUMatcher((0.3, 0.7), True),
                                  BalancedPositiveNegativeSampler(256, 0.5), BoxCoder((1, 1, 1, 1)))
    assert labels[0].tolist() == [1.0, 0.0, 0.0]


# ---------------------------------------------------------------------------------------- sampling

def test_proposal_labels_argmax_gt_and_inclusive_threshold():
    gts = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 10.0]])
    proposals = torch.tensor([[0.0, 0.0, 10.0, 5.0],     # IoU exactly 0.5 with GT 0 -> fg (>= 0.5)
                              [20.0, 0.0, 30.0, 4.0],    # IoU 0.4 with GT 1 -> background
                              [21.0, 0.0, 30.0, 10.0]])  # IoU 0.9 with GT 1
    labelled = label_proposals(proposals, gts, torch.tensor([3, 1]), num_classes=5, iou_threshold=0.5)
    assert labelled.gt_classes.tolist() == [3, 5, 1]
    assert labelled.gt_indices.tolist() == [0, 1, 1]
    assert torch.equal(labelled.gt_boxes[2], gts[1])
    paper = label_proposals(proposals, gts, torch.tensor([3, 1]), num_classes=5, iou_threshold=0.5, strict=True)
    assert paper.gt_classes.tolist() == [5, 5, 1]                # paper: IoU > 0.5
    empty = label_proposals(proposals, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), 5, 0.5)
    assert empty.gt_classes.tolist() == [5, 5, 5]


def test_sampler_caps_foreground_and_fills_with_background():
    classes = torch.tensor([0] * 300 + [5] * 600)
    rows = sample_foreground_background(classes, 5, batch_size=700, positive_fraction=0.25)
    assert len(rows) == 700 and len(set(rows.tolist())) == 700
    assert int((classes[rows] < 5).sum()) == 175
    few = sample_foreground_background(torch.tensor([0] * 10 + [5] * 50), 5, 700, 0.25)
    assert len(few) == 60 and int((few < 10).sum()) == 10  # everything kept in most images


def test_keep_ratio_range():
    n = 700
    generator = torch.Generator().manual_seed(0)
    counts = []
    for _ in range(400):
        keep = random_keep(n, 0.7, generator)
        assert len(set(keep.tolist())) == len(keep) and int(keep.max()) < n
        counts.append(len(keep))
    # f in (0.7, 1] -> int(700 f) in [490, 700]; uniform, so both ends are approached
    assert min(counts) >= int(n * 0.7) and max(counts) <= n
    assert min(counts) < 500 and max(counts) > 690
    assert abs(np.mean(counts) - 0.85 * n) < 10
    assert random_keep(5, 1.0).tolist() == [0, 1, 2, 3, 4]
    assert len(random_keep(700, 0.3, generator, keep_ratio_max=0.3)) == 210   # the paper's "drop 70 %" literally


def test_noisy_gt_fallback_only_without_foreground():
    gts = torch.tensor([[0.0, 0.0, 40.0, 40.0]])
    far = torch.tensor([[100.0, 100.0, 140.0, 140.0]] * 3)
    out = sample_training_proposals(far, gts, torch.tensor([2]), 5, 0.5, 700, 0.25, 1.0)
    assert len(out.boxes) == 4 and int((out.gt_classes == 2).sum()) == 1  # one noisy GT copy appended
    noisy = out.boxes[out.gt_classes == 2][0]
    assert not torch.equal(noisy, gts[0]) and (noisy - gts[0]).abs().max() < 0.2 * 40
    near = torch.tensor([[0.0, 0.0, 40.0, 38.0]] + [[100.0, 100.0, 140.0, 140.0]] * 3)
    out = sample_training_proposals(near, gts, torch.tensor([2]), 5, 0.5, 700, 0.25, 1.0)
    assert len(out.boxes) == 4  # no GT appended when a proposal is foreground


# ---------------------------------------------------------------------------------------- encoding

def test_box_encoding_at_hand_picked_values():
    boxes = torch.tensor([[[10.0, 20.0, 50.0, 100.0]]])         # cx 30, cy 60, w 40, h 80
    size = torch.tensor([[200, 100]])                            # H = 200, W = 100
    pe = box_position_encoding(boxes, size, 512, "box8")
    assert pe.shape == (1, 1, 512)
    numbers = [30 / 100, 60 / 200, 40 / 100, 80 / 200, 10 / 100, 20 / 200, 50 / 100, 100 / 200]
    for i, v in enumerate(numbers):
        angle = 2 * math.pi * v
        block = pe[0, 0, 64 * i: 64 * (i + 1)]
        assert block[0].item() == pytest.approx(math.sin(angle), abs=1e-6)
        assert block[1].item() == pytest.approx(math.cos(angle), abs=1e-6)
        # pair k = 5 (dims 10, 11): frequency 10000^(2 * 5 / 64)
        freq = 10000 ** (10 / 64)
        assert block[10].item() == pytest.approx(math.sin(angle / freq), abs=1e-6)
        assert block[11].item() == pytest.approx(math.cos(angle / freq), abs=1e-6)
    paper = box_position_encoding(boxes, size, 512, "box4")
    assert paper[0, 0, 128].item() == pytest.approx(math.sin(0.3), abs=1e-6)  # cy = 0.3, no 2 pi
    assert paper[0, 0, 129].item() == pytest.approx(math.cos(0.3), abs=1e-6)


def test_pad_per_image_masks_padding():
    rows = torch.arange(5.0)[:, None].repeat(1, 2)
    padded, mask = pad_per_image(rows, [3, 0, 2])
    assert padded.shape == (3, 3, 2)
    assert mask.tolist() == [[False, False, False], [False, True, True], [False, False, True]]
    assert padded[2, :2, 0].tolist() == [3.0, 4.0]


# ---------------------------------------------------------------------------------------- matching

@pytest.mark.parametrize("seed", range(5))
def test_restricted_matching_equals_scipy_with_inf_outside_candidates(seed):
    g = torch.Generator().manual_seed(seed)
    num_gt, num = 6, 40
    cost = torch.rand(num, generator=g) * 4 - 2
    gt_indices = torch.randint(0, num_gt, (num,), generator=g)
    eligible = torch.rand(num, generator=g) < 0.6
    eligible[gt_indices == 5] = False                                # GT 5 has no candidate
    matched = restricted_matching(cost, gt_indices, eligible)
    full = np.full((num_gt, num), np.inf)
    for j in torch.nonzero(eligible).squeeze(1).tolist():
        full[gt_indices[j], j] = cost[j].item()
    rows = [r for r in range(num_gt) if np.isfinite(full[r]).any()]  # a GT without candidates is unmatched
    r, c = linear_sum_assignment(full[rows])
    assert sorted(torch.nonzero(matched).squeeze(1).tolist()) == sorted(c.tolist())
    assert 5 not in gt_indices[matched].tolist()
    assert not restricted_matching(cost, gt_indices, torch.zeros_like(eligible)).any()


# ---------------------------------------------------------------------------------------- losses

def test_set_classification_loss_hand_case():
    logits = torch.tensor([[2.0, 0.0, 0.0], [1.0, 0.0, 1.0], [0.0, 0.0, 3.0]])   # C = 2, background = 2
    classes = torch.tensor([0, 0, 2])
    matched = torch.tensor([True, False, False])                                # proposal 1: a duplicate
    loss = set_classification_loss(logits, classes, matched, eos_coef=0.1, focal_factor=2.0, focal_gamma=2.0)
    p = logits.softmax(1)
    ce = [-math.log(p[0, 0]), -math.log(p[1, 2]), -math.log(p[2, 2])]
    f = [1.0, 2 * (1 - p[1, 2].item()) ** 2, 2 * (1 - p[2, 2].item()) ** 2]
    e = [1.0, 0.1, 0.1]
    expected = sum(a * b * c for a, b, c in zip(e, f, ce)) / (sum(e) + 1e-6)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert set_classification_loss(logits, classes, torch.zeros(3, dtype=torch.bool), 0.1, 2, 2).item() == 0.0


def test_box_regression_loss_hand_case():
    coder = BoxCoder((10, 10, 5, 5))
    proposals = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 5.0, 5.0]])
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 20.0, 10.0], [0.0, 0.0, 5.0, 5.0]])
    classes = torch.tensor([1, 0, 2])                      # C = 2: the third proposal is background
    deltas = torch.zeros(3, 8)                             # class-specific, zero: boxes = proposals
    loss = box_regression_loss(deltas, proposals, classes, gt, 2, coder, l1_weight=1.0, giou_weight=2.0)
    # proposal 0: perfect. Proposal 1: target dx = 10 * 5 / 10 = 5, dw = 5 log 2; GIoU = 100 / 200 = 0.5
    expected = (5.0 + 5 * math.log(2) + 2.0 * 0.5) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_tsp_losses_one_positive_per_gt_and_box_loss_on_all_eligible():
    coder = BoxCoder((10, 10, 5, 5))
    gt = torch.tensor([0.0, 0.0, 10.0, 10.0])
    proposals = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 9.0], [50.0, 50.0, 60.0, 60.0]])
    classes, gt_boxes = torch.tensor([1, 1, 3]), gt.repeat(3, 1)
    logits = torch.zeros(3, 4, requires_grad=True)
    deltas = torch.zeros(3, 12, requires_grad=True)
    losses, matched = tsp_losses(logits, deltas, proposals, classes, gt_boxes, torch.zeros(3, dtype=torch.int64),
                                 coder, TSPRCNNLossConfig())
    assert matched.tolist() == [True, False, False]       # the exact box wins (GIoU 1), the other is a duplicate
    sum(losses.values()).backward()
    assert deltas.grad[1].abs().sum() > 0                  # the duplicate still gets a box loss
    assert deltas.grad[2].abs().sum() == 0                 # background does not
    off, matched_off = tsp_losses(logits, deltas, proposals, classes, gt_boxes, torch.zeros(3, dtype=torch.int64),
                                  coder, TSPRCNNLossConfig(set_prediction=False))
    assert matched_off.tolist() == [True, True, False]
    assert off["loss_obj"].item() == pytest.approx(math.log(4), rel=1e-5)   # uniform logits, plain CE


def test_detr_losses_hungarian_over_all_proposals():
    coder = BoxCoder((10, 10, 5, 5))
    proposals = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [21.0, 20.0, 30.0, 30.0]])
    target = {"boxes": torch.tensor([[20.0, 20.0, 30.0, 30.0]]), "labels": torch.tensor([0])}
    logits = torch.zeros(3, 3)
    deltas = torch.zeros(3, 8)
    losses = detr_losses([logits], [deltas], [proposals], [target], coder, TSPRCNNLossConfig(type="detr"))
    # proposal 1 matches (GIoU 1): box loss 0; CE: one target class 0, two no-object with weight 0.1
    assert losses["loss_box_reg"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_obj"].item() == pytest.approx(0.5 * math.log(3), rel=1e-5)


# ---------------------------------------------------------------------------------------- model

def _data():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 128, generator=g) * 255, torch.rand(3, 80, 112, generator=g) * 255]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [70.0, 20.0, 120.0, 90.0]]),
                "labels": torch.tensor([1, 4])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    return images, targets


@pytest.mark.parametrize("extra", [(), ("model.roi_heads.num_fc=2", "model.roi_heads.position_encoding=none"),
                                   ("model.loss.type=detr",),
                                   ("model.cascade.num_stages=2", "model.roi_heads.cls_agnostic_bbox_reg=true")])
def test_train_and_eval_contract(extra, single_thread):
    torch.manual_seed(0)
    model = tiny_model(*extra)
    images, targets = _data()
    losses = model(images, targets)
    suffixes = ["_stage0", "_stage1"] if "model.cascade.num_stages=2" in extra else [""]
    expected = {"loss_rpn_cls", "loss_rpn_loc"} | {k + s for k in ("loss_obj", "loss_box_reg") for s in suffixes}
    assert set(losses) == expected
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    encoder = (model.box_head[0] if "model.cascade.num_stages=2" in extra else model.box_head).transformer_encoder
    assert encoder.layers[0].linear1.weight.grad is not None
    model.eval()
    with torch.no_grad():
        out = model(images, original_sizes=[(192, 256), (80, 112)])
    assert len(out) == 2 and len(model.last_rois) == 2
    for det, size in zip(out, [(192, 256), (80, 112)]):
        assert det["boxes"].shape[1] == 4 and len(det["scores"]) == len(det["labels"]) <= 100
        assert (det["boxes"][:, 2] <= size[1]).all() and (det["boxes"][:, 3] <= size[0]).all()
        assert (det["labels"] < 5).all()


def test_parameter_counts_match_the_paper():
    def count(*extra):
        with torch.device("meta"):
            model = build_model("tsp_rcnn/r50_fpn_3x", list(extra))
        return sum(p.numel() for p in model.parameters()) / 1e6

    # spec §6.5: conv/linear/norm weights (FrozenBN buffers excluded)
    assert count() == pytest.approx(56.70, abs=0.01)
    assert count("model.roi_heads.num_fc=2") == pytest.approx(63.64, abs=0.01)
    assert count("model.backbone.depth=101") == pytest.approx(75.64, abs=0.01)


@pytest.mark.parametrize("override, key", [
    ("model.roi_heads.position_encoding=sine", "model.roi_heads.position_encoding"),
    ("model.loss.type=hungarian", "model.loss.type"),
    ("model.roi_heads.iou_comparison=greater", "model.roi_heads.iou_comparison"),
    ("model.roi_heads.keep_ratio_max=0.5", "keep_ratio_max"),
    ("model.rpn.anchor_preset=yolo", "model.rpn.anchor_preset"),
    ("model.roi_heads.in_levels=[1,2,3]", "model.roi_heads.in_levels"),
    ("model.rpn.levels=[3,4,5,6,7,8]", "model.rpn.levels"),
    ("model.cascade.num_stages=2", "cls_agnostic_bbox_reg"),
])
def test_bad_config_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        tiny_model(override)


def test_explain_draws_the_encoder_rois(single_thread):
    from sparsedet.explain import explain_prediction

    model = tiny_model()
    model.config["input"].update(min_size_test=96, max_size_test=128)
    model.train()
    picture = explain_prediction(model, torch.rand(3, 120, 160) * 255)
    assert picture.size[0] > 500 and picture.size[1] > 200
    assert model.training                                   # left as it was
    rois = model.last_rois[0]
    assert 0 < len(rois["boxes"]) <= 40 and ((rois["scores"] >= 0) & (rois["scores"] <= 1)).all()


def test_demo_runs_tsp_rcnn(tmp_path, single_thread):
    from sparsedet.demo import run_demo

    stats = run_demo(tmp_path, iterations=2, model="tsp_rcnn", num_train=4, num_val=2, image_size=96)
    assert 0.0 <= stats["AP"] <= 1.0
    report = (tmp_path / "report.md").read_text()
    assert "TSP-RCNN" in report and (tmp_path / "train" / "last.pth").is_file()
    assert any(p.name.endswith("_explain.png") for p in (tmp_path / "predictions").glob("*.png"))


def test_cascade_scales_the_roi_feature_gradient():
    from sparsedet.models.tsp.rcnn_detector import _ScaleGradient

    x = torch.ones(3, requires_grad=True)
    y = _ScaleGradient.apply(x, 0.5)
    assert torch.equal(y, x.detach())
    (y * 4).sum().backward()
    assert x.grad.tolist() == [2.0, 2.0, 2.0]


def test_padded_batch_equals_images_alone(single_thread):
    """Images with different proposal counts share one padded encoder batch: the key padding mask
    must make every image's outputs equal to running it alone."""
    torch.manual_seed(0)
    model = tiny_model().eval()
    features = [torch.randn(2, 32, 64 // 2 ** lvl, 96 // 2 ** lvl) for lvl in model.roi_levels]
    xy = torch.rand(9, 2) * 40
    boxes = [torch.cat((xy[:6], xy[:6] + 10 + torch.rand(6, 2) * 30), 1),
             torch.cat((xy[6:], xy[6:] + 10 + torch.rand(3, 2) * 30), 1)]
    sizes = [(64, 96), (60, 90)]
    with torch.no_grad():
        logits, deltas, _, mask = model.run_stage(0, features, boxes, sizes, None)
        assert mask.tolist()[1] == [False] * 3 + [True] * 3
        for i in range(2):
            alone_logits, alone_deltas, _, _ = model.run_stage(0, [f[i:i + 1] for f in features], [boxes[i]],
                                                               [sizes[i]], None)
            rows = slice(0, 6) if i == 0 else slice(6, 9)
            assert torch.allclose(logits[rows], alone_logits, atol=1e-5)
            assert torch.allclose(deltas[rows], alone_deltas, atol=1e-5)


def test_official_optimizer_split():
    """spec §4: only box_head.transformer_encoder.* on AdamW (lr 1e-4); RPN, projections, PE projection,
    predictor on SGD (lr 0.02); norm layers without weight decay."""
    from sparsedet.engine.optim import build_optimizer

    model = tiny_model()
    optimizer = build_optimizer(model, model.config["solver"])
    sgd, adamw = optimizer.optimizers
    assert type(sgd).__name__ == "SGD" and type(adamw).__name__ == "AdamW"
    names = {id(p): n for n, p in model.named_parameters()}
    on_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert on_adamw == {n for n in names.values() if n.startswith("box_head.transformer_encoder.")}
    assert all(g["lr"] == 1e-4 for g in adamw.param_groups) and all(g["lr"] == 0.02 for g in sgd.param_groups)
    for g in sgd.param_groups + adamw.param_groups:
        if any(names[id(p)].endswith(("norm.weight", "post_input_proj_norm.bias")) for p in g["params"]):
            assert g["weight_decay"] == 0.0


def test_trainer_resume_is_exact_with_random_keep_and_two_optimizers(tmp_path, single_thread):
    """The random keep, the proposal sampler, dropout and the SGD + AdamW pair all resume bit-exactly."""
    import json

    from sparsedet.config import load_config
    from sparsedet.data.synthetic import write_synthetic_coco
    from sparsedet.engine.trainer import Trainer

    data = write_synthetic_coco(tmp_path / "data", num_train=4, num_val=2, seed=0, height=96, width=128)

    def config(max_iter):
        solver = {"images_per_batch": 2, "max_iter": max_iter, "steps": [3], "warmup_iters": 2, "eval_period": 0,
                  "checkpoint_period": 0, "log_period": 1, "seed": 3, "sync_bn": False}
        return load_config("tsp_rcnn/r50_fpn_3x", TINY + [
            f"data.train.annotations={data['train']['annotations']}", f"data.train.images={data['train']['images']}",
            "data.val=null", "data.num_workers=0", "input.min_size_train=[64, 96]", "input.max_size_train=128",
            "model.roi_heads.keep_ratio_min=0.5"] + [f"solver.{k}={json.dumps(v)}" for k, v in solver.items()])

    def losses(output):
        rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
        return {r["iteration"]: r["total_loss"] for r in rows if r["type"] == "train"}

    Trainer(config(4), tmp_path / "straight", progress=False).train()
    Trainer(config(2), tmp_path / "resumed", progress=False).train()
    Trainer(config(4), tmp_path / "resumed", resume=True, progress=False).train()
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(straight) == sorted(resumed) == [1, 2, 3, 4]
    for iteration in (3, 4):
        assert resumed[iteration] == straight[iteration], (iteration, resumed, straight)


def test_transformer_clip_is_one_global_norm():
    from sparsedet.engine.optim import build_optimizer

    model = tiny_model()
    optimizer = build_optimizer(model, model.config["solver"])
    params = [p for n, p in model.named_parameters() if n.startswith("box_head.transformer_encoder.")]
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.clip_grad_norms()
    total = torch.sqrt(sum((p.grad ** 2).sum() for p in params))
    assert total.item() == pytest.approx(0.01, rel=1e-4)
    factors = {round(float(p.grad.flatten()[0]), 10) for p in params}
    assert len(factors) == 1                                   # one scale for the whole group


def test_rpn_loss_terms_hand_case():
    """loss_rpn_cls = BCE over the sampled anchors / (256 B); loss_rpn_loc = L1 over positives / (256 B) x 2."""
    model = tiny_model()
    anchors = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 8.0], [50.0, 50.0, 60.0, 60.0]])]
    objectness = [torch.tensor([[2.0, 0.0, -1.0]])]
    deltas = [torch.zeros(1, 3, 4)]
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]])}]
    losses = model.rpn_losses(objectness, deltas, anchors, targets)
    bce = math.log(1 + math.exp(-2.0)) + math.log(2.0) + math.log(1 + math.exp(-1.0))
    assert losses["loss_rpn_cls"].item() == pytest.approx(bce / 256, rel=1e-5)
    l1 = 0.125 + math.log(10 / 8)                     # anchor 1's target deltas (0, 0.125, 0, log 1.25)
    assert losses["loss_rpn_loc"].item() == pytest.approx(2.0 * l1 / 256, rel=1e-5)


@pytest.mark.parametrize("inherit", [False, True])
def test_cascade_stage1_rematches_refined_boxes_at_its_iou(inherit, monkeypatch, single_thread):
    import sparsedet.models.tsp.rcnn_detector as detector

    calls = []
    original = detector.label_proposals

    def recording(boxes, *args, **kwargs):
        calls.append((boxes.clone(), args[3]))
        return original(boxes, *args, **kwargs)

    monkeypatch.setattr(detector, "label_proposals", recording)
    model = tiny_model("model.cascade.num_stages=2", "model.roi_heads.cls_agnostic_bbox_reg=true",
                       f"model.cascade.inherit_match={str(inherit).lower()}")
    refined = []
    original_refine = model.refine
    monkeypatch.setattr(model, "refine", lambda *a: refined.append(original_refine(*a)) or refined[-1])
    images, targets = _data()
    model(images, targets)
    assert len(refined) == 1
    if inherit:
        assert calls == []
    else:
        assert [thr for _, thr in calls] == [0.7, 0.7]          # one call per image, at stage 1's IoU
        assert all(torch.equal(b, r) for (b, _), r in zip(calls, refined[0]))
    for boxes, (h, w) in zip(refined[0], [(96, 128), (80, 112)]):   # detached and clipped to the image
        assert not boxes.requires_grad and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
