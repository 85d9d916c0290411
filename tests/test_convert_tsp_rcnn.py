"""The ``tsp_rcnn`` converter on state_dicts written from spec tsp.md §6 (names and shapes of the
official detectron2 checkpoints), independent of our model's code: every official key is used, every
model key is filled, the architecture is inferred, and foreign checkpoints are refused by key."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

import sparsedet
from sparsedet.convert import CONVERTERS, convert_checkpoint, official_architecture
from sparsedet.models import build_model

BLOCKS = {18: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def official_state(depth=50, num_fc=1, stages=0, num_classes=80, channels=256, d=512, ffn=2048, layers=6,
                   agnostic=False, width=64, device="meta") -> "OrderedDict[str, torch.Tensor]":
    """An official TSP-RCNN state_dict per spec §6 (depth 18: detectron2's basic-block ResNet, to keep
    the functional test small; ``device="meta"`` for shape-only tests)."""
    s = OrderedDict()

    def put(key, *shape):
        s[key] = torch.randn(shape, device=device) * 0.02 if device != "meta" else torch.empty(shape, device=device)

    def frozen_bn(prefix, n):
        for x in ("weight", "bias", "running_mean", "running_var"):
            put(f"{prefix}.{x}", n)
        if device != "meta":
            s[f"{prefix}.running_var"] = s[f"{prefix}.running_var"].abs() + 1.0

    def bn(prefix, n):
        frozen_bn(prefix, n)
        s[f"{prefix}.num_batches_tracked"] = torch.tensor(0, dtype=torch.int64, device=device)

    b = "backbone.bottom_up."
    put(b + "stem.conv1.weight", width, 3, 7, 7)
    frozen_bn(b + "stem.conv1.norm", width)
    in_ch = width
    stage_out = []
    for k, blocks in zip(range(2, 6), BLOCKS[depth]):
        mid = width * 2 ** (k - 2)
        out = mid if depth == 18 else mid * 4
        for i in range(blocks):
            p = f"{b}res{k}.{i}."
            if depth == 18:
                put(p + "conv1.weight", mid, in_ch if i == 0 else out, 3, 3)
                frozen_bn(p + "conv1.norm", mid)
                put(p + "conv2.weight", mid, mid, 3, 3)
                frozen_bn(p + "conv2.norm", mid)
            else:
                put(p + "conv1.weight", mid, in_ch if i == 0 else out, 1, 1)
                frozen_bn(p + "conv1.norm", mid)
                put(p + "conv2.weight", mid, mid, 3, 3)
                frozen_bn(p + "conv2.norm", mid)
                put(p + "conv3.weight", out, mid, 1, 1)
                frozen_bn(p + "conv3.norm", out)
            if i == 0 and in_ch != out:
                put(p + "shortcut.weight", out, in_ch, 1, 1)
                frozen_bn(p + "shortcut.norm", out)
        in_ch = out
        stage_out.append(out)
    for k, c in zip(range(2, 6), stage_out):
        put(f"backbone.fpn_lateral{k}.weight", channels, c, 1, 1)
        put(f"backbone.fpn_lateral{k}.bias", channels)
        put(f"backbone.fpn_output{k}.weight", channels, channels, 3, 3)
        put(f"backbone.fpn_output{k}.bias", channels)
    for p in ("p6", "p7"):
        put(f"backbone.top_block.{p}.conv.weight", channels, channels, 3, 3)
        put(f"backbone.top_block.{p}.conv.bias", channels)
        bn(f"backbone.top_block.{p}.bn", channels)
    r = "proposal_generator.rpn_head."
    for branch in ("obj", "anchor"):
        for i in range(2):
            put(f"{r}{branch}_conv.{i}.conv.weight", channels, channels, 3, 3)
            put(f"{r}{branch}_conv.{i}.conv.bias", channels)
        for lvl in range(5):
            for i in range(2):
                bn(f"{r}{branch}_bn_list.{lvl}.{i}", channels)
    put(r + "objectness_logits.weight", 9, channels, 1, 1)
    put(r + "objectness_logits.bias", 9)
    put(r + "anchor_deltas.weight", 36, channels, 1, 1)
    put(r + "anchor_deltas.bias", 36)
    for lvl in range(5):
        put(f"proposal_generator.anchor_generator.cell_anchors.{lvl}", 9, 4)
    for stage in (range(stages) if stages else [None]):
        h = "roi_heads.box_head." + (f"{stage}." if stage is not None else "")
        q = "roi_heads.box_predictor." + (f"{stage}." if stage is not None else "")
        if num_fc == 1:
            put(h + "input_proj.weight", d, channels * 49)
            put(h + "input_proj.bias", d)
        else:
            put(h + "input_proj.0.weight", 1024, channels * 49)
            put(h + "input_proj.0.bias", 1024)
            put(h + "input_proj.2.weight", d, 1024)
            put(h + "input_proj.2.bias", d)
        put(h + "post_input_proj_norm.weight", d)
        put(h + "post_input_proj_norm.bias", d)
        for i in range(layers):
            e = f"{h}transformer_encoder.layers.{i}."
            put(e + "self_attn.in_proj_weight", 3 * d, d)
            put(e + "self_attn.in_proj_bias", 3 * d)
            put(e + "self_attn.out_proj.weight", d, d)
            put(e + "self_attn.out_proj.bias", d)
            put(e + "linear1.weight", ffn, d)
            put(e + "linear1.bias", ffn)
            put(e + "linear2.weight", d, ffn)
            put(e + "linear2.bias", d)
            for n in ("norm1", "norm2"):
                put(e + n + ".weight", d)
                put(e + n + ".bias", d)
        put(h + "transformer_encoder.norm.weight", d)
        put(h + "transformer_encoder.norm.bias", d)
        put(h + "dec_pos_embed_proj.weight", d, d)
        put(h + "dec_pos_embed_proj.bias", d)
        put(q + "cls_score.weight", num_classes + 1, d)
        put(q + "cls_score.bias", num_classes + 1)
        for i in range(2):
            put(f"{q}bbox_pred.layers.{i}.weight", d, d)
            put(f"{q}bbox_pred.layers.{i}.bias", d)
        out = 4 if agnostic else 4 * num_classes
        put(q + "bbox_pred.layers.2.weight", out, d)
        put(q + "bbox_pred.layers.2.bias", out)
    put("pixel_mean", 3, 1, 1)
    put("pixel_std", 3, 1, 1)
    return s


IGNORED = 2 + 5  # pixel_mean / pixel_std, 5 cell_anchors


@pytest.mark.parametrize("kwargs, overrides", [
    ({}, {"model.backbone.depth": 50, "model.roi_heads.num_fc": 1, "model.num_classes": 80}),
    ({"num_fc": 2}, {"model.roi_heads.num_fc": 2, "model.roi_heads.fc_dim": 1024}),
    ({"depth": 101}, {"model.backbone.depth": 101}),
    ({"stages": 2, "agnostic": True, "ffn": 1024}, {"model.cascade.num_stages": 2,
                                                     "model.roi_heads.cls_agnostic_bbox_reg": True,
                                                     "model.roi_heads.dim_feedforward": 1024}),
])
def test_every_official_key_used_and_every_model_key_filled(kwargs, overrides):
    state = official_state(**kwargs)
    result = convert_checkpoint("tsp_rcnn", state)
    for key, value in overrides.items():
        assert result.config_overrides[key] == value
    with torch.device("meta"):
        model = build_model("tsp_rcnn/r50_fpn_3x", result.config_overrides)
    expected = model.state_dict()
    assert list(result.state_dict) == list(expected)
    assert len(result.state_dict) == len(state) - IGNORED            # one target per official key
    assert all(tuple(result.state_dict[k].shape) == tuple(v.shape) for k, v in expected.items())


def test_converted_weights_land_in_place_and_run(tmp_path, single_thread):
    state = official_state(depth=18, channels=16, d=32, ffn=32, layers=1, num_classes=3, device="cpu")
    src, dst = tmp_path / "official.pth", tmp_path / "converted.pth"
    torch.save({"model": state, "iteration": 5}, src)
    result = sparsedet.convert_checkpoint("tsp_rcnn", src, dst)
    small = {"model.roi_heads.num_heads": 4}
    assert result.config_overrides["model.backbone.depth"] == 18
    model = build_model("tsp_rcnn/r50_fpn_3x", {**result.config_overrides, **small})
    model.load_state_dict(torch.load(dst, weights_only=True))
    assert torch.equal(model.rpn_head.deltas_norms[3][1].running_var,
                       state["proposal_generator.rpn_head.anchor_bn_list.3.1.running_var"])
    assert torch.equal(model.backbone.body.layer3[0].downsample[0].weight,
                       state["backbone.bottom_up.res4.0.shortcut.weight"])
    assert torch.equal(model.backbone.fpn.extra_blocks.p7.bn.running_mean,
                       state["backbone.top_block.p7.bn.running_mean"])
    assert torch.equal(model.box_head.transformer_encoder.layers[0].self_attn.in_proj_weight,
                       state["roi_heads.box_head.transformer_encoder.layers.0.self_attn.in_proj_weight"])
    assert torch.equal(model.box_predictor.bbox_pred.layers[2].bias, state["roi_heads.box_predictor.bbox_pred.layers.2.bias"])
    assert official_architecture(state) == "tsp_rcnn"
    loaded = sparsedet.load(src, overrides=[f"{k}={v}" for k, v in small.items()])
    with torch.no_grad():
        out = loaded([torch.rand(3, 64, 96) * 255])
    assert set(out[0]) == {"boxes", "scores", "labels"}


def test_registered_and_foreign_checkpoints_are_refused_by_key():
    assert "tsp_rcnn" in CONVERTERS
    sparse_rcnn = {"backbone.bottom_up.stem.conv1.weight": torch.empty(64, 3, 7, 7),
                   "init_proposal_features.weight": torch.empty(100, 256),
                   "head.head_series.0.class_logits.weight": torch.empty(80, 256)}
    with pytest.raises(ValueError, match=r"roi_heads\.box_head\.post_input_proj_norm\.weight.*convert sparse_rcnn"):
        convert_checkpoint("tsp_rcnn", sparse_rcnn)
    querydet = {"backbone.bottom_up.stem.conv1.weight": torch.empty(64, 3, 7, 7),
                "det_head.cls_score.weight": torch.empty(720, 256, 3, 3),
                "query_head.pred_net.weight": torch.empty(1, 256, 3, 3)}
    with pytest.raises(ValueError, match=r"roi_heads\.box_head\.post_input_proj_norm\.weight.*QueryDet"):
        convert_checkpoint("tsp_rcnn", querydet)


def test_missing_and_wrong_keys_are_named():
    state = official_state()
    del state["proposal_generator.rpn_head.anchor_bn_list.4.1.running_var"]
    with pytest.raises(ValueError, match=r"anchor_bn_list\.4\.1\.running_var"):
        convert_checkpoint("tsp_rcnn", state)
    state = official_state()
    state["roi_heads.box_head.dec_pos_embed_proj.weight"] = torch.empty(512, 256, device="meta")
    with pytest.raises(ValueError, match=r"dec_pos_embed_proj\.weight: file \(512, 256\), model \(512, 512\)"):
        convert_checkpoint("tsp_rcnn", state)
    state = official_state()
    state["roi_heads.box_head.extra.weight"] = torch.empty(3, device="meta")
    with pytest.raises(ValueError, match=r"roi_heads\.box_head\.extra\.weight"):
        convert_checkpoint("tsp_rcnn", state)
