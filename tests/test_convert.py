"""Official Sparse R-CNN checkpoint converter.

The official layout below is written from the spec's tables (§5.1), not derived from our model or
by inverting the converter, and the reference stage from its Appendix A pseudo-code with the
official key names and the official sequence-first ``nn.MultiheadAttention``.
"""
from __future__ import annotations

import math
import pickle
import re
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from sparsedet.convert import CONVERTERS, convert_checkpoint, infer_overrides, looks_official
from sparsedet.convert.common import summarize_keys
from sparsedet.convert.sparse_rcnn import (BASE_CONFIG, official_to_sparsedet_key,
                                           sparsedet_to_official_key)
from sparsedet.models import build_model

BN = ("weight", "bias", "running_mean", "running_var")
R50, R101 = (3, 4, 6, 3), (3, 4, 23, 3)


# --------------------------------------------------------------------------- official layout (spec §5.1)

def official_layout(blocks=R50, n=100, c=80, stages=6, d=256, ffn=2048, dyn=64, side=7) -> "OrderedDict[str, tuple]":
    """Key -> shape of an official checkpoint, in the file's order: FPN, bottom-up, proposals, head."""
    shapes = OrderedDict()
    for level, c_in in zip((2, 3, 4, 5), (256, 512, 1024, 2048)):
        shapes[f"backbone.fpn_lateral{level}.weight"] = (d, c_in, 1, 1)
        shapes[f"backbone.fpn_lateral{level}.bias"] = (d,)
        shapes[f"backbone.fpn_output{level}.weight"] = (d, d, 3, 3)
        shapes[f"backbone.fpn_output{level}.bias"] = (d,)

    def conv_with_norm(name, shape):
        shapes[f"backbone.bottom_up.{name}.weight"] = shape
        for buffer in BN:
            shapes[f"backbone.bottom_up.{name}.norm.{buffer}"] = (shape[0],)

    conv_with_norm("stem.conv1", (64, 3, 7, 7))
    c_prev = 64
    for s, m, count in zip((2, 3, 4, 5), (64, 128, 256, 512), blocks):
        for b in range(count):
            c_in = c_prev if b == 0 else 4 * m
            if b == 0:
                conv_with_norm(f"res{s}.0.shortcut", (4 * m, c_in, 1, 1))
            conv_with_norm(f"res{s}.{b}.conv1", (m, c_in, 1, 1))
            conv_with_norm(f"res{s}.{b}.conv2", (m, m, 3, 3))
            conv_with_norm(f"res{s}.{b}.conv3", (4 * m, m, 1, 1))
        c_prev = 4 * m

    shapes["init_proposal_features.weight"] = (n, d)
    shapes["init_proposal_boxes.weight"] = (n, 4)
    stage = {
        "self_attn.in_proj_weight": (3 * d, d), "self_attn.in_proj_bias": (3 * d,),
        "self_attn.out_proj.weight": (d, d), "self_attn.out_proj.bias": (d,),
        "inst_interact.dynamic_layer.weight": (2 * d * dyn, d), "inst_interact.dynamic_layer.bias": (2 * d * dyn,),
        "inst_interact.norm1.weight": (dyn,), "inst_interact.norm1.bias": (dyn,),
        "inst_interact.norm2.weight": (d,), "inst_interact.norm2.bias": (d,),
        "inst_interact.out_layer.weight": (d, side * side * d), "inst_interact.out_layer.bias": (d,),
        "inst_interact.norm3.weight": (d,), "inst_interact.norm3.bias": (d,),
        "linear1.weight": (ffn, d), "linear1.bias": (ffn,),
        "linear2.weight": (d, ffn), "linear2.bias": (d,),
        **{f"norm{i}.{p}": (d,) for i in (1, 2, 3) for p in ("weight", "bias")},
        "cls_module.0.weight": (d, d), "cls_module.1.weight": (d,), "cls_module.1.bias": (d,),
        **{f"reg_module.{i}.weight": (d, d) for i in (0, 3, 6)},
        **{f"reg_module.{i}.{p}": (d,) for i in (1, 4, 7) for p in ("weight", "bias")},
        "class_logits.weight": (c, d), "class_logits.bias": (c,),
        "bboxes_delta.weight": (4, d), "bboxes_delta.bias": (4,),
    }
    assert len(stage) == 40
    for k in range(stages):
        for suffix, shape in stage.items():
            shapes[f"head.head_series.{k}.{suffix}"] = shape
    return shapes


def numbered(shapes) -> "OrderedDict[str, torch.Tensor]":
    """Tensor i is the constant i, expanded (stride 0), so full-size layouts cost no memory and every
    converted tensor can be traced back to its source key."""
    return OrderedDict((k, torch.tensor(float(i)).expand(shape)) for i, (k, shape) in enumerate(shapes.items()))


def random_weights(shapes, seed=0) -> "OrderedDict[str, torch.Tensor]":
    """Random tensors at sensible scales (normalisation stats near identity, fan-in scaled weights)."""
    g = torch.Generator().manual_seed(seed)
    out = OrderedDict()
    for key, shape in shapes.items():
        if key.endswith("running_var"):
            value = torch.rand(shape, generator=g) + 0.5
        elif key == "init_proposal_boxes.weight":
            value = torch.tensor([0.5, 0.5, 1.0, 1.0]) + 0.1 * torch.randn(shape, generator=g)
        elif (len(shape) == 1 and "norm" in key and key.endswith("weight")) or re.search(r"module\.[147]\.weight", key):
            value = 1 + 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1:
            value = 0.1 * torch.randn(shape, generator=g)
        elif key == "init_proposal_features.weight":
            value = torch.randn(shape, generator=g)
        else:
            value = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        out[key] = value
    return out


TINY = dict(n=6, c=5, stages=2, d=32, ffn=64, dyn=8)


def test_official_layout_matches_spec_counts():
    assert len(official_layout()) == 523
    assert len(official_layout(R101)) == 778
    n_numbers = sum(math.prod(s) for s in official_layout().values())
    assert n_numbers == 106_344_008  # spec §1.6.10: numbers in the R-50 state dict
    assert sum(math.prod(s) for s in official_layout(R101).values()) == 125_388_360


# --------------------------------------------------------------------------- conversion of the real layouts

SPOT_CHECKS = {  # spec §5.2, written out by hand
    "backbone.bottom_up.stem.conv1.weight": "backbone.body.conv1.weight",
    "backbone.bottom_up.stem.conv1.norm.running_var": "backbone.body.bn1.running_var",
    "backbone.bottom_up.res2.0.conv1.weight": "backbone.body.layer1.0.conv1.weight",
    "backbone.bottom_up.res3.2.conv3.norm.bias": "backbone.body.layer2.2.bn3.bias",
    "backbone.bottom_up.res4.5.conv2.norm.running_mean": "backbone.body.layer3.5.bn2.running_mean",
    "backbone.bottom_up.res5.0.shortcut.weight": "backbone.body.layer4.0.downsample.0.weight",
    "backbone.bottom_up.res3.0.shortcut.norm.weight": "backbone.body.layer2.0.downsample.1.weight",
    "backbone.fpn_lateral2.weight": "backbone.fpn.inner_blocks.0.0.weight",
    "backbone.fpn_lateral5.bias": "backbone.fpn.inner_blocks.3.0.bias",
    "backbone.fpn_output3.weight": "backbone.fpn.layer_blocks.1.0.weight",
    "backbone.fpn_output5.bias": "backbone.fpn.layer_blocks.3.0.bias",
    "init_proposal_features.weight": "init_proposal_features.weight",
    "init_proposal_boxes.weight": "init_proposal_boxes.weight",
    "head.head_series.0.self_attn.in_proj_weight": "head.head_series.0.self_attn.in_proj_weight",
    "head.head_series.5.inst_interact.dynamic_layer.weight": "head.head_series.5.inst_interact.dynamic_layer.weight",
    "head.head_series.3.reg_module.7.bias": "head.head_series.3.reg_module.7.bias",
}


def test_r50_all_523_keys_convert_and_load_strictly(tmp_path):
    source = numbered(official_layout())
    assert len(source) == 523
    src, dst = tmp_path / "r50_100pro_3x_model.pth", tmp_path / "converted.pth"
    torch.save(source, src)

    result = convert_checkpoint("sparse_rcnn", src, dst)

    assert len(result.state_dict) == 523
    # Every source tensor is used exactly once (each holds its own index).
    assert sorted(int(v.reshape(-1)[0]) for v in result.state_dict.values()) == list(range(523))
    for official, ours in SPOT_CHECKS.items():
        assert torch.equal(result.state_dict[ours], source[official]), official
    assert result.config_overrides["model.backbone.depth"] == 50
    assert result.config_overrides["model.num_proposals"] == 100
    assert result.config_overrides["model.num_classes"] == 80
    assert result.config_overrides["model.num_stages"] == 6
    assert "523" in result.report and "R-50" in result.report

    model = build_model(BASE_CONFIG, result.config_overrides)
    model.load_state_dict(torch.load(dst, weights_only=True))  # strict
    assert model.backbone.body.layer4[0].downsample[1].running_mean[0] == \
        source["backbone.bottom_up.res5.0.shortcut.norm.running_mean"][0]
    assert model.head.head_series[5].class_logits.bias[0] == source["head.head_series.5.class_logits.bias"][0]


def test_r101_300_proposals_other_classes():
    shapes = official_layout(R101, n=300, c=20)
    assert len(shapes) == 778
    result = convert_checkpoint("sparse_rcnn", numbered(shapes))
    assert len(result.state_dict) == 778
    assert {k: result.config_overrides[k] for k in ("model.backbone.depth", "model.num_proposals",
                                                    "model.num_classes", "model.num_stages")} == \
        {"model.backbone.depth": 101, "model.num_proposals": 300, "model.num_classes": 20, "model.num_stages": 6}


def test_model_wrapper_and_detectron2_pkl(tmp_path):
    shapes = official_layout(**TINY)
    weights = random_weights(shapes)
    wrapped = tmp_path / "model_final.pth"
    torch.save({"model": weights, "iteration": 269999}, wrapped)
    pkl = tmp_path / "model_final.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in weights.items()}, "__author__": "test"}, f)

    a = convert_checkpoint("sparse_rcnn", wrapped)
    b = convert_checkpoint("sparse_rcnn", pkl)
    assert a.config_overrides == b.config_overrides
    assert a.config_overrides["model.hidden_dim"] == 32 and a.config_overrides["model.num_stages"] == 2
    assert list(a.state_dict) == list(b.state_dict)
    for key in a.state_dict:
        torch.testing.assert_close(a.state_dict[key], b.state_dict[key], rtol=0, atol=0)


def test_softmax_checkpoint_sets_use_focal_false():
    shapes = official_layout(c=81)
    shapes["criterion.empty_weight"] = (81,)
    source = numbered(shapes)
    source["criterion.empty_weight"] = torch.tensor([1.0] * 80 + [0.1])
    result = convert_checkpoint("sparse_rcnn", source)
    assert result.config_overrides["model.num_classes"] == 80
    assert result.config_overrides["model.loss.use_focal"] is False
    assert result.config_overrides["model.loss.no_object_weight"] == pytest.approx(0.1)
    assert "criterion.empty_weight" not in result.state_dict


def test_key_mapping_round_trips():
    for key in official_layout(R101):
        ours = official_to_sparsedet_key(key)
        assert ours is not None and sparsedet_to_official_key(ours) == key
    assert official_to_sparsedet_key("backbone.bottom_up.stem.fc.weight") is None
    assert official_to_sparsedet_key("pixel_mean") is None


# --------------------------------------------------------------------------- infer_overrides on our layout

@pytest.mark.parametrize("overrides", [
    ["model.backbone.depth=18", "model.hidden_dim=64", "model.fpn.channels=64", "model.num_proposals=8",
     "model.num_stages=2", "model.dim_feedforward=128", "model.dim_dynamic=16", "model.num_classes=5"],
    ["model.backbone.depth=101", "model.num_proposals=300", "model.pooler_resolution=5",
     "model.num_cls_layers=2", "model.num_reg_layers=1", "model.backbone.frozen_bn=false"],
    ["model.backbone.name=mobilenet_v2", "model.hidden_dim=128", "model.fpn.channels=128",
     "model.interaction=multihead_attention", "model.self_attention=false", "model.fpn.top_block=p6p7_from_p5",
     "model.fpn.out_levels=[2,3,4,5,6]"],
])
def test_infer_overrides_rebuilds_the_same_model(overrides):
    with torch.device("meta"):
        model = build_model(BASE_CONFIG, overrides)
        state = model.state_dict()
        inferred = infer_overrides(state)
        rebuilt = build_model(BASE_CONFIG, {**inferred, "model.fpn.out_levels": list(model.cfg.fpn.out_levels)})
    for item in overrides:
        key, value = item.split("=")
        if key in inferred:
            assert str(inferred[key]).lower() == value.lower(), key
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == {k: tuple(v.shape) for k, v in state.items()}
    assert not looks_official(state)


def test_infer_overrides_names_missing_key():
    with torch.device("meta"):
        state = build_model(BASE_CONFIG, ["model.backbone.depth=18"]).state_dict()
    del state["init_proposal_features.weight"]
    with pytest.raises(ValueError, match="init_proposal_features.weight"):
        infer_overrides(state)


# --------------------------------------------------------------------------- numerical parity with the official stage

def official_decode(deltas, ref):
    """Spec §1.6.6: weights (2, 2, 1, 1), upper clamp log(100000/16). (K, 4), (K, 4) xyxy -> (K, 4) xyxy."""
    w, h = ref[:, 2] - ref[:, 0], ref[:, 3] - ref[:, 1]
    cx, cy = ref[:, 0] + 0.5 * w, ref[:, 1] + 0.5 * h
    clamp = math.log(100000.0 / 16)
    dx, dy = deltas[:, 0] / 2.0, deltas[:, 1] / 2.0
    dw, dh = deltas[:, 2].clamp(max=clamp), deltas[:, 3].clamp(max=clamp)
    cx, cy, w, h = dx * w + cx, dy * h + cy, dw.exp() * w, dh.exp() * h
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=1)


def official_stage(w, k, roi, boxes, prop, num_heads=8):
    """One official RCNNHead stage (spec Appendix A) from a dict of official tensors.

    roi (B*N, d, S, S) pooled features, boxes (B, N, 4) abs xyxy, prop (B*N, d)
    -> logits (B, N, C), boxes (B, N, 4), object features (B*N, d).
    """
    p = lambda name: w[f"head.head_series.{k}.{name}"]  # noqa: E731
    ln = lambda x, name: F.layer_norm(x, x.shape[-1:], p(name + ".weight"), p(name + ".bias"))  # noqa: E731
    lin = lambda x, name, bias=True: F.linear(x, p(name + ".weight"), p(name + ".bias") if bias else None)  # noqa: E731
    B, N, _ = boxes.shape
    d = prop.shape[1]
    roi = roi.flatten(2).transpose(1, 2)                                  # (B*N, S*S, d)

    mha = nn.MultiheadAttention(d, num_heads)                             # sequence-first, as official
    mha.load_state_dict({name: p(f"self_attn.{name}") for name in
                         ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")})
    x = prop.view(B, N, d).permute(1, 0, 2)                               # (N, B, d)
    x = ln(x + mha(x, x, x)[0], "norm1")
    x = x.permute(1, 0, 2).reshape(B * N, d)

    prm = lin(x, "inst_interact.dynamic_layer")
    half = prm.shape[1] // 2
    w1, w2 = prm[:, :half].view(B * N, d, -1), prm[:, half:].view(B * N, -1, d)
    f = F.relu(ln(torch.bmm(roi, w1), "inst_interact.norm1"))
    f = F.relu(ln(torch.bmm(f, w2), "inst_interact.norm2"))
    f = F.relu(ln(lin(f.flatten(1), "inst_interact.out_layer"), "inst_interact.norm3"))
    x = ln(x + f, "norm2")
    x = ln(x + lin(F.relu(lin(x, "linear1")), "linear2"), "norm3")

    c = F.relu(ln(lin(x, "cls_module.0", bias=False), "cls_module.1"))
    r = x
    for i in (0, 3, 6):
        r = F.relu(ln(lin(r, f"reg_module.{i}", bias=False), f"reg_module.{i + 1}"))
    logits, deltas = lin(c, "class_logits"), lin(r, "bboxes_delta")
    new_boxes = official_decode(deltas, boxes.reshape(-1, 4))
    return logits.view(B, N, -1), new_boxes.view(B, N, 4), x


def official_pool(features, boxes, side=7):
    """Spec §1.6.1: level = floor(4 + log2(sqrt(area)/224 + 1e-8)) in [2, 5], RoIAlignV2, 2 samples."""
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(boxes)])
    size = ((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])).sqrt()
    level = torch.floor(4 + torch.log2(size / 224 + 1e-8)).clamp(2, 5)
    out = torch.zeros(len(rois), features[0].shape[1], side, side)
    for lvl, feature in zip((2, 3, 4, 5), features):
        sel = level == lvl
        if sel.any():
            out[sel] = roi_align(feature, rois[sel], side, 1.0 / 2 ** lvl, 2, aligned=True)
    return out


@pytest.fixture(scope="module")
def tiny_official():
    """A tiny official checkpoint (R-50 layout, d=32, 2 stages) and our model loaded through the converter."""
    weights = random_weights(official_layout(**TINY), seed=3)
    result = convert_checkpoint("sparse_rcnn", weights)
    model = build_model(BASE_CONFIG, result.config_overrides)
    model.load_state_dict(result.state_dict)
    return weights, model.eval()


def test_one_stage_matches_official_reference(tiny_official):
    weights, model = tiny_official
    g = torch.Generator().manual_seed(5)
    B, N, d, S = 2, TINY["n"], TINY["d"], 7
    roi = torch.randn(B * N, d, S, S, generator=g)
    prop = torch.randn(B * N, d, generator=g)
    xy = torch.rand(B, N, 2, generator=g) * 200
    boxes = torch.cat((xy, xy + 20 + torch.rand(B, N, 2, generator=g) * 200), dim=2)
    with torch.no_grad():
        for k, stage in enumerate(model.head.head_series):
            ref_logits, ref_boxes, ref_x = official_stage(weights, k, roi, boxes, prop)
            logits, new_boxes, x = stage(roi.flatten(2).transpose(1, 2), prop.view(B, N, d), boxes)
            torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(new_boxes, ref_boxes, atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(x.reshape(B * N, d), ref_x, atol=1e-5, rtol=1e-5)
            assert not torch.allclose(ref_boxes, boxes)  # the stage really moved the boxes


def test_whole_head_forward_matches_official_reference(tiny_official):
    """Our detector end to end (proposals, pooler, stage chaining) vs the official driver on the
    same FPN features."""
    weights, model = tiny_official
    g = torch.Generator().manual_seed(7)
    images = [torch.rand(3, 128, 160, generator=g) * 255, torch.rand(3, 96, 128, generator=g) * 255]
    captured = {}
    hooks = [model.backbone.register_forward_hook(lambda m, i, o: captured.update(features=list(o.values()))),
             model.head.register_forward_hook(lambda m, i, o: captured.update(head=o))]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in hooks:
            h.remove()

    # Official driver (spec §1.4-1.6.7): whole-image-ish learned boxes scaled by each un-padded size.
    whwh = torch.tensor([[160.0, 128, 160, 128], [128.0, 96, 128, 96]])
    cxcywh = weights["init_proposal_boxes.weight"]
    xyxy = torch.cat((cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2), dim=1)
    boxes = xyxy[None] * whwh[:, None]
    prop = weights["init_proposal_features.weight"].repeat(2, 1)
    with torch.no_grad():
        for k, ours in enumerate(captured["head"]):
            roi = official_pool(captured["features"], list(boxes))
            logits, new_boxes, prop = official_stage(weights, k, roi, boxes, prop)
            torch.testing.assert_close(ours["pred_logits"], logits, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ours["pred_boxes"], new_boxes, atol=1e-4, rtol=1e-5)
            boxes = new_boxes
    assert len(captured["head"]) == TINY["stages"]


# --------------------------------------------------------------------------- errors

def test_missing_and_wrong_shape_and_extra_keys_are_named(tmp_path):
    source = numbered(official_layout())
    del source["head.head_series.2.norm3.bias"]
    del source["backbone.bottom_up.res4.5.conv2.norm.running_var"]
    source["head.head_series.3.linear1.weight"] = torch.zeros(2048, 128)
    source["backbone.fpn_lateral6.weight"] = torch.zeros(256, 2048, 1, 1)
    source["head.head_series.0.extra.weight"] = torch.zeros(3)
    source["pixel_mean"] = torch.zeros(3)
    path = tmp_path / "broken.pth"
    torch.save(source, path)
    with pytest.raises(ValueError) as info:
        convert_checkpoint("sparse_rcnn", path)
    message = str(info.value)
    assert str(path) in message
    for key in ("head.head_series.2.norm3.bias", "backbone.bottom_up.res4.5.conv2.norm.running_var",
                "backbone.fpn_lateral6.weight", "head.head_series.0.extra.weight", "pixel_mean",
                "head.head_series.3.linear1.weight: file (2048, 128), model (2048, 256)"):
        assert key in message, key
    assert "2 keys of the model missing" in message and "3 keys in the file with no place" in message


def test_long_key_lists_are_grouped():
    source = numbered(official_layout())
    for k in range(6):
        del source[f"head.head_series.{k}.norm2.bias"]
    for b in range(6):
        del source[f"backbone.bottom_up.res4.{b}.conv1.norm.running_mean"]
    with pytest.raises(ValueError) as info:
        convert_checkpoint("sparse_rcnn", source)
    message = str(info.value)
    assert "head.head_series.{0..5}.norm2.bias" in message
    assert "backbone.bottom_up.res4.{0..5}.conv1.norm.running_mean" in message
    assert len(message.splitlines()) < 8


def test_summarize_keys_never_overclaims():
    text = summarize_keys(["a.0.x", "a.1.x", "b.2.y", "c.0.1.z", "c.1.0.z"])
    assert "a.{0,1}.x" in text and "b.2.y" in text and "c.*.*.z (2 keys)" in text
    text = summarize_keys([f"k{i}" for i in range(40)], max_lines=5)
    assert "... and 35 more groups (35 keys)" in text


def test_torchvision_faster_rcnn_is_refused():
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    with torch.device("meta"):
        state = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    with pytest.raises(ValueError, match=r"not an official Sparse R-CNN checkpoint.*torchvision Faster/Mask R-CNN"):
        convert_checkpoint("sparse_rcnn", state)


@pytest.mark.parametrize("extra_key, looks_like", [
    ("head.cls_score.weight", "RetinaNet"),
    ("query_head.cls_score.weight", "QueryDet"),
    ("roi_heads.box_predictor.cls_score.weight", "detectron2 two-stage"),
])
def test_other_detectron2_models_are_refused(tmp_path, extra_key, looks_like):
    state = {"backbone.bottom_up.stem.conv1.weight": torch.zeros(64, 3, 7, 7),
             "backbone.fpn_lateral2.weight": torch.zeros(256, 256, 1, 1), extra_key: torch.zeros(80, 256)}
    path = tmp_path / "other.pth"
    torch.save({"model": state}, path)
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}: not an official Sparse R-CNN.*{looks_like}"):
        convert_checkpoint("sparse_rcnn", path)


def test_file_in_sparsedet_layout_is_refused_with_hint():
    with torch.device("meta"):
        state = build_model(BASE_CONFIG, ["model.backbone.depth=18"]).state_dict()
    with pytest.raises(ValueError, match="already in sparsedet layout.*sparsedet.load"):
        convert_checkpoint("sparse_rcnn", state)


def test_missing_proposals_named_by_official_key():
    source = numbered(official_layout())
    del source["init_proposal_features.weight"]
    with pytest.raises(ValueError, match="incomplete.*'init_proposal_features.weight' is missing"):
        convert_checkpoint("sparse_rcnn", source)


def test_unknown_arch_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="unknown architecture 'detr'.*sparse_rcnn"):
        convert_checkpoint("detr", tmp_path / "x.pth")
    assert "sparse_rcnn" in CONVERTERS
    with pytest.raises(FileNotFoundError):
        convert_checkpoint("sparse_rcnn", tmp_path / "does_not_exist.pth")
