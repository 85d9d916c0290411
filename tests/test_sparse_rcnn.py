"""Sparse R-CNN detector: I/O contract, pre/post-processing, gradient flow, ablations, init, size."""
from __future__ import annotations

import math

import pytest
import torch

from sparsedet.config import ConfigError
from sparsedet.models import build_model
from sparsedet.models.sparse_rcnn.head import AttentionInteraction, DynamicConv

pytestmark = pytest.mark.usefixtures("single_thread")

NUM_CLASSES, NUM_PROPOSALS = 5, 8
FOCAL_BIAS = -math.log(99.0)


def has_grad(p: torch.Tensor) -> bool:
    return p.grad is not None and bool(p.grad.abs().sum() > 0)


def capture_head_inputs(model):
    """Records (features, boxes, proposal_features) of every head call."""
    calls = []
    model.head.register_forward_pre_hook(lambda module, args: calls.append(args))
    return calls


@pytest.fixture(scope="module")
def eval_model(make_tiny):
    """A tiny model in eval mode, shared by the tests that only run it."""
    torch.manual_seed(0)
    return make_tiny().eval()


# ----------------------------------------------------------------------------- contract

def test_train_returns_scalar_losses(make_tiny, images, targets):
    model = make_tiny()
    assert model.training
    losses = model(images, targets)
    assert set(losses) == {f"{k}{s}" for k in ("loss_ce", "loss_bbox", "loss_giou") for s in ("_0", "")}
    assert len(losses) == 3 * 2
    for key, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value) and value.requires_grad, key
        assert value.item() >= 0, key
    sum(losses.values()).backward()


def test_eval_output_contract(eval_model, images):
    model = eval_model
    with torch.no_grad():
        results = model(images)
    assert isinstance(results, list) and len(results) == 2
    for result, image in zip(results, images):
        assert set(result) == {"boxes", "scores", "labels"}
        k = result["boxes"].shape[0]
        assert 0 < k <= NUM_PROPOSALS
        assert result["boxes"].shape == (k, 4) and result["boxes"].dtype == torch.float32
        assert result["scores"].shape == (k,) and result["scores"].is_floating_point()
        assert result["labels"].shape == (k,) and result["labels"].dtype == torch.int64
        assert ((result["scores"] >= 0) & (result["scores"] <= 1)).all()
        assert ((result["labels"] >= 0) & (result["labels"] < NUM_CLASSES)).all()
        h, w = image.shape[-2:]
        boxes = result["boxes"]
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()


def test_eval_is_top_n_over_all_proposal_class_pairs(eval_model, images):
    model = eval_model
    outputs = []
    handle = model.head.register_forward_hook(lambda module, args, output: outputs.append(output))
    try:
        with torch.no_grad():
            results = model(images)
    finally:
        handle.remove()
    last = outputs[0][-1]
    for b, (result, image) in enumerate(zip(results, images)):
        h, w = image.shape[-2:]
        scores, flat = last["pred_logits"][b].sigmoid().flatten().topk(NUM_PROPOSALS)
        boxes = last["pred_boxes"][b][flat // NUM_CLASSES]
        boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h),
                             boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)], 1)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        expected = sorted(zip(scores[keep].tolist(), (flat[keep] % NUM_CLASSES).tolist(), boxes[keep].tolist()))
        got = sorted(zip(result["scores"].tolist(), result["labels"].tolist(), result["boxes"].tolist()))
        assert len(got) == len(expected)
        for (s1, l1, b1), (s2, l2, b2) in zip(got, expected):
            assert s1 == pytest.approx(s2) and l1 == l2 and b1 == pytest.approx(b2, abs=1e-4)


def test_postprocess_one_box_several_labels_clip_and_drop(eval_model):
    model = eval_model
    logits = torch.full((1, NUM_PROPOSALS, NUM_CLASSES), -10.0)
    logits[0, 0] = 10.0            # proposal 0: all 5 classes
    logits[0, 1, :3] = 9.0         # proposal 1: classes 0..2
    boxes = torch.tensor([[10.0, 10.0, 50.0, 40.0]]).repeat(NUM_PROPOSALS, 1)[None].clone()
    boxes[0, 1] = torch.tensor([-20.0, 30.0, 200.0, 90.0])   # partly outside a 64x96 image
    out = model.postprocess({"pred_logits": logits, "pred_boxes": boxes}, [(64, 96)])[0]
    assert len(out["labels"]) == NUM_PROPOSALS
    pairs = sorted(zip(out["labels"].tolist(), [tuple(b) for b in out["boxes"].tolist()]))
    assert pairs == sorted([(c, (10.0, 10.0, 50.0, 40.0)) for c in range(5)]
                           + [(c, (0.0, 30.0, 96.0, 64.0)) for c in range(3)])
    torch.testing.assert_close(out["scores"].sort().values,
                               torch.sigmoid(torch.tensor([9.0] * 3 + [10.0] * 5)))
    # a box entirely outside the image has zero size after clipping and is dropped
    boxes[0, 1] = torch.tensor([100.0, 70.0, 120.0, 90.0])
    out = model.postprocess({"pred_logits": logits, "pred_boxes": boxes}, [(64, 96)])[0]
    assert len(out["labels"]) == 5 and (out["boxes"] == torch.tensor([10.0, 10.0, 50.0, 40.0])).all()
    # original size: per-axis rescale, then clip to the original image
    out = model.postprocess({"pred_logits": logits, "pred_boxes": boxes}, [(64, 96)], [(32, 192)])[0]
    assert (out["boxes"] == torch.tensor([20.0, 5.0, 100.0, 20.0])).all()
    with pytest.raises(ValueError, match="original_sizes"):
        model.postprocess({"pred_logits": logits, "pred_boxes": boxes}, [(64, 96)], [(32, 192), (1, 1)])


def test_original_sizes_rescale_boxes(eval_model, images):
    model = eval_model
    with torch.no_grad():
        plain = model(images)
        scaled = model(images, original_sizes=[(32, 192), (96, 40)])  # (H, W): x*2 y/2; x/2 y*2
    factors = [torch.tensor([2.0, 0.5, 2.0, 0.5]), torch.tensor([0.5, 2.0, 0.5, 2.0])]
    for a, b, f in zip(plain, scaled, factors):
        torch.testing.assert_close(b["boxes"], a["boxes"] * f)
        assert torch.equal(a["scores"], b["scores"]) and torch.equal(a["labels"], b["labels"])


def test_boxes_are_clipped_to_the_image(make_tiny, images):
    model = make_tiny().eval()
    with torch.no_grad():
        model.init_proposal_boxes.weight.copy_(torch.tensor([0.5, 0.5, 3.0, 3.0]))  # 3x the image
        results = model(images)
    clipped_somewhere = False
    for result, image in zip(results, images):
        h, w = image.shape[-2:]
        boxes = result["boxes"]
        assert len(boxes) > 0
        assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= w).all() and (boxes[:, [1, 3]] <= h).all()
        clipped_somewhere |= bool((boxes[:, 2] == w).any() or (boxes[:, 0] == 0).any())
    assert clipped_somewhere


# ----------------------------------------------------------------------------- preprocessing

def test_normalisation_and_padding_inside_the_model(eval_model):
    model = eval_model
    image = torch.rand(3, 70, 90) * 255
    batch, sizes = model.preprocess([image])
    assert batch.shape == (1, 3, 96, 96) and sizes == [(70, 90)]
    mean = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
    torch.testing.assert_close(batch[0, :, :70, :90], (image - mean) / std)
    assert (batch[0, :, 70:] == 0).all() and (batch[0, :, :, 90:] == 0).all()
    # uint8 input gives the same batch as its float values
    as_uint8 = image.round().to(torch.uint8)
    torch.testing.assert_close(model.preprocess([as_uint8])[0], model.preprocess([as_uint8.float()])[0])
    # several images: padded to the largest H and W, each rounded up to 32
    batch, sizes = model.preprocess([image, torch.rand(3, 33, 20) * 255])
    assert batch.shape == (2, 3, 96, 96) and sizes == [(70, 90), (33, 20)]
    assert (batch[1, :, 33:] == 0).all()


def test_caffe_layout_flips_to_bgr_once(make_tiny):
    model = make_tiny("model.backbone.depth=50", "model.backbone.layout=caffe")
    assert model.backbone.body.layer2[0].conv1.stride == (2, 2)
    image = torch.rand(3, 40, 50) * 255
    batch, _ = model.preprocess([image])
    bgr_mean = torch.tensor([103.53, 116.28, 123.675]).view(3, 1, 1)
    torch.testing.assert_close(batch[0, :, :40, :50], image.flip(0) - bgr_mean)
    # explicit overrides win over the layout's convention
    model = make_tiny("model.input_format=RGB", "model.pixel_mean=[1, 2, 3]", "model.pixel_std=[2, 2, 2]")
    batch, _ = model.preprocess([image])
    torch.testing.assert_close(batch[0, :, :40, :50], (image - torch.tensor([1.0, 2, 3]).view(3, 1, 1)) / 2)


def test_proposals_scaled_by_each_unpadded_image_size(make_tiny):
    model = make_tiny("model.proposal_init=center")
    calls = capture_head_inputs(model.eval())
    with torch.no_grad():
        model([torch.rand(3, 70, 90) * 255, torch.rand(3, 40, 100) * 255])
    features, boxes, proposal_features = calls[0]
    assert [tuple(f.shape) for f in features] == [(2, 64, 24, 32), (2, 64, 12, 16), (2, 64, 6, 8), (2, 64, 3, 4)]
    assert boxes.shape == (2, NUM_PROPOSALS, 4)
    torch.testing.assert_close(boxes[0], torch.tensor([0.45 * 90, 0.45 * 70, 0.55 * 90, 0.55 * 70]).expand(8, 4))
    torch.testing.assert_close(boxes[1], torch.tensor([45.0, 18.0, 55.0, 22.0]).expand(8, 4))
    # the same learned features for every image
    assert proposal_features.shape == (2, NUM_PROPOSALS, 64)
    assert torch.equal(proposal_features[0], model.init_proposal_features.weight)
    assert torch.equal(proposal_features[1], model.init_proposal_features.weight)


def test_range_warning_for_0_1_images(make_tiny):
    model = make_tiny()
    with pytest.warns(UserWarning, match="0-255"):
        model.preprocess([torch.rand(3, 32, 32)])


# ----------------------------------------------------------------------------- gradients

def test_boxes_detached_between_stages_features_not(make_tiny, images, targets):
    model = make_tiny("model.loss.deep_supervision=false")
    losses = model(images, targets)
    assert set(losses) == {"loss_ce", "loss_bbox", "loss_giou"}
    sum(losses.values()).backward()
    first, last = model.head.head_series
    # stage 1's box branch only reaches stage 2 through the (detached) boxes: no gradient
    assert not any(has_grad(p) for p in first.reg_module.parameters())
    assert not has_grad(first.bboxes_delta.weight) and not has_grad(first.bboxes_delta.bias)
    assert not has_grad(first.class_logits.weight)
    assert not has_grad(model.init_proposal_boxes.weight)
    # stage 1's object features feed stage 2 undetached: its trunk gets gradient
    for name in ("linear1.weight", "linear2.weight", "norm3.weight", "inst_interact.dynamic_layer.weight",
                 "self_attn.in_proj_weight"):
        assert has_grad(first.get_parameter(name)), name
    assert has_grad(model.init_proposal_features.weight)
    assert has_grad(last.bboxes_delta.weight) and has_grad(last.class_logits.weight)
    # backbone: trainable stages and FPN get gradient, frozen stem / res2 have none
    assert has_grad(model.backbone.body.layer2[0].conv1.weight) and has_grad(model.backbone.fpn.layer_blocks[0][0].weight)
    assert model.backbone.body.conv1.weight.grad is None and model.backbone.body.layer1[0].conv1.weight.grad is None


def test_proposal_boxes_get_gradient_from_stage_one(make_tiny, images, targets):
    model = make_tiny()
    losses = model(images, targets)
    (losses["loss_bbox_0"] + losses["loss_giou_0"]).backward(retain_graph=True)
    assert has_grad(model.init_proposal_boxes.weight)
    assert has_grad(model.head.head_series[0].bboxes_delta.weight)
    model.zero_grad(set_to_none=True)
    # the last stage's box loss does not reach the proposals or stage 1's regression layer
    (losses["loss_bbox"] + losses["loss_giou"]).backward()
    assert not has_grad(model.init_proposal_boxes.weight)
    assert not has_grad(model.head.head_series[0].bboxes_delta.weight)


def test_feature_reuse_off_disconnects_stages(make_tiny, images, targets):
    model = make_tiny("model.feature_reuse=false", "model.loss.deep_supervision=false")
    sum(model(images, targets).values()).backward()
    assert not any(has_grad(p) for p in model.head.head_series[0].parameters())
    assert has_grad(model.init_proposal_features.weight)


# ----------------------------------------------------------------------------- ablations

@pytest.mark.parametrize("mode", ["image", "center", "grid", "random"])
def test_proposal_init(make_tiny, images, targets, mode):
    model = make_tiny(f"model.proposal_init={mode}")
    boxes = model.init_proposal_boxes.weight.detach()
    assert boxes.shape == (NUM_PROPOSALS, 4)
    if mode == "image":
        assert (boxes == torch.tensor([0.5, 0.5, 1.0, 1.0])).all()
    elif mode == "center":
        assert (boxes == torch.tensor([0.5, 0.5, 0.1, 0.1])).all()
    elif mode == "grid":
        c = [1 / 6, 3 / 6, 5 / 6]  # 3 x 3 grid, first 8 cells, row-major
        expected = torch.tensor([[cx, cy, 1 / 3, 1 / 3] for cy in c for cx in c][:NUM_PROPOSALS])
        torch.testing.assert_close(boxes, expected)
    else:
        assert (boxes[:, :2] >= 0).all() and (boxes[:, :2] <= 1).all()
        assert (boxes[:, 2:] >= 0.05).all() and (boxes[:, 2:] <= 1).all()
        assert boxes.std(0).min() > 0  # not all the same
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())


def test_bad_ablation_values(make_tiny):
    with pytest.raises(ConfigError, match="proposal_init"):
        make_tiny("model.proposal_init=anchors")
    with pytest.raises(ValueError, match="interaction"):
        make_tiny("model.interaction=conv")
    with pytest.raises(ConfigError, match=r"fpn.channels \(32\) must equal model.hidden_dim \(64\)"):
        make_tiny("model.fpn.channels=32")


@pytest.mark.parametrize("overrides, stages", [
    (["model.interaction=multihead_attention"], 2),
    (["model.self_attention=false"], 2),
    (["model.feature_reuse=false"], 2),
    (["model.num_stages=1"], 1),
    (["model.loss.use_focal=false"], 2),
])
def test_ablation_switches_build_and_run(make_tiny, images, targets, overrides, stages):
    model = make_tiny(*overrides)
    assert len(model.head.head_series) == stages
    stage = model.head.head_series[0]
    if "model.interaction=multihead_attention" in overrides:
        assert isinstance(stage.inst_interact, AttentionInteraction)
    else:
        assert isinstance(stage.inst_interact, DynamicConv)
    assert hasattr(stage, "self_attn") == ("model.self_attention=false" not in overrides)
    losses = model(images, targets)
    assert len(losses) == 3 * stages
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        results = model(images)
    softmax = "model.loss.use_focal=false" in overrides
    assert stage.class_logits.out_features == NUM_CLASSES + softmax
    for result in results:
        assert len(result["boxes"]) <= NUM_PROPOSALS
        assert ((result["labels"] >= 0) & (result["labels"] < NUM_CLASSES)).all()
    if softmax:
        assert hasattr(model.criterion, "empty_weight")
        assert not torch.allclose(stage.class_logits.bias, torch.tensor(FOCAL_BIAS))


def test_softmax_eval_is_best_foreground_class_per_proposal(make_tiny):
    model = make_tiny("model.loss.use_focal=false").eval()
    logits = torch.zeros(1, NUM_PROPOSALS, NUM_CLASSES + 1)
    logits[0, :, -1] = 5.0      # no-object is the most likely class everywhere
    logits[0, :, 3] = 1.0       # best foreground class
    boxes = torch.tensor([[1.0, 1.0, 20.0, 20.0]]).repeat(1, NUM_PROPOSALS, 1)
    out = model.postprocess({"pred_logits": logits, "pred_boxes": boxes}, [(32, 32)])[0]
    assert len(out["labels"]) == NUM_PROPOSALS and (out["labels"] == 3).all()
    expected = torch.softmax(logits[0, 0], 0)[3]
    torch.testing.assert_close(out["scores"], expected.expand(NUM_PROPOSALS))


# ----------------------------------------------------------------------------- init and size

@pytest.mark.parametrize("num_classes", [5, 4, 16, 64])
def test_head_init_only_classifier_bias_gets_the_prior(make_tiny, num_classes):
    model = make_tiny(f"model.num_classes={num_classes}")
    for stage in model.head.head_series:
        torch.testing.assert_close(stage.class_logits.bias.detach(), torch.full((num_classes,), FOCAL_BIAS))
        # the official shape-based quirk (last dim == num_classes) is not copied
        bias = stage.bboxes_delta.bias.detach()
        assert bias.std() > 0 and bias.abs().max() <= 1 / math.sqrt(64)
        for norm in (stage.norm1, stage.norm2, stage.norm3, stage.inst_interact.norm1, stage.inst_interact.norm2):
            assert (norm.weight == 1).all() and (norm.bias == 0).all()
        assert (stage.self_attn.in_proj_bias == 0).all() and (stage.self_attn.out_proj.bias == 0).all()
        # xavier_uniform on >= 2-D parameters
        w = stage.inst_interact.dynamic_layer.weight
        bound = math.sqrt(6 / (w.shape[0] + w.shape[1]))
        assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
    assert model.init_proposal_features.weight.std().item() == pytest.approx(1.0, abs=0.15)


def test_full_r50_parameter_count_and_init():
    model = build_model("sparse_rcnn/r50_fpn_100pro_3x")
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    state = model.state_dict()
    assert params == 106_237_768
    assert trainable == 106_015_368
    assert sum(v.numel() for v in state.values()) == 106_344_008
    # nothing for the pooler, the matcher, the criterion or the pixel statistics
    assert not [k for k in state if k.startswith(("criterion", "preprocess", "head.pooler"))]
    assert model.init_proposal_boxes.weight.shape == (100, 4)
    assert (model.init_proposal_boxes.weight == torch.tensor([0.5, 0.5, 1.0, 1.0])).all()
    features = model.init_proposal_features.weight
    assert features.shape == (100, 256)
    assert features.std().item() == pytest.approx(1.0, abs=0.03) and abs(features.mean().item()) < 0.03
    stage = model.head.head_series[0]
    assert stage.class_logits.bias.shape == (80,)
    torch.testing.assert_close(stage.class_logits.bias.detach(), torch.full((80,), -4.59512), atol=1e-5, rtol=0)
    assert stage.inst_interact.dynamic_layer.weight.abs().max() <= 0.01348


# ----------------------------------------------------------------------------- bad input

def test_bad_images_are_clear_errors(eval_model):
    model = eval_model
    good = torch.rand(3, 32, 32) * 255
    with pytest.raises(TypeError, match="not one tensor"):
        model(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="non-empty list"):
        model([])
    with pytest.raises(ValueError, match=r"images\[1\] has shape \(32, 32\), expected \(3, H, W\)"):
        model([good, torch.rand(32, 32)])
    with pytest.raises(ValueError, match=r"images\[0\] has shape \(1, 32, 32\)"):
        model([torch.rand(1, 32, 32)])
    with pytest.raises(TypeError, match=r"images\[0\] has dtype torch.int64"):
        model([torch.zeros(3, 32, 32, dtype=torch.int64)])
    with pytest.raises(TypeError, match=r"images\[0\] is a ndarray"):
        model([good.numpy()])


def test_bad_targets_are_clear_errors(make_tiny, images, targets):
    model = make_tiny()

    def with_target(index, **fields):
        out = [dict(t) for t in targets]
        out[index].update(fields)
        return out

    with pytest.raises(ValueError, match="training needs targets"):
        model(images)
    with pytest.raises(ValueError, match="got 1 targets for 2 images"):
        model(images, targets[:1])
    nan = targets[0]["boxes"].clone()
    nan[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"targets\[0\]\['boxes'\]\[1\] is not finite"):
        model(images, with_target(0, boxes=nan))
    with pytest.raises(ValueError, match=r"targets\[1\]\['boxes'\]\[0\].*degenerate"):
        model(images, with_target(1, boxes=torch.tensor([[10.0, 5.0, 10.0, 40.0]])))
    with pytest.raises(ValueError, match=r"targets\[1\]\['boxes'\]\[0\].*degenerate"):
        model(images, with_target(1, boxes=torch.tensor([[70.0, 5.0, 10.0, 40.0]])))  # x2 < x1
    with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\]\[1\] = 5 is outside \[0, 5\)"):
        model(images, with_target(0, labels=torch.tensor([1, 5])))
    with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\]\[0\] = -1 is outside"):
        model(images, with_target(0, labels=torch.tensor([-1, 2])))
    with pytest.raises(ValueError, match=r"targets\[1\] has no 'labels'"):
        model(images, [targets[0], {"boxes": targets[1]["boxes"]}])
    with pytest.raises(ValueError, match=r"expected \(M, 4\)"):
        model(images, with_target(1, boxes=torch.zeros(0), labels=torch.zeros(0, dtype=torch.int64)))
    with pytest.raises(ValueError, match=r"labels'\] has shape \(1,\), expected \(2,\)"):
        model(images, with_target(0, labels=torch.tensor([1])))
    with pytest.raises(ValueError, match="must be integers"):
        model(images, with_target(0, labels=torch.tensor([1.0, 2.0])))


def test_images_without_targets_train(make_tiny, images):
    model = make_tiny()
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)} for _ in images]
    losses = model(images, empty)
    assert all(losses[k].item() == 0 for k in losses if not k.startswith("loss_ce"))
    assert all(losses[k].item() > 0 for k in losses if k.startswith("loss_ce"))
