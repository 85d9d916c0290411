"""Official QueryDet / RetinaNet checkpoint converter. The official layout below is written from
the spec's table (§6.1), not derived from our model."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

from sparsedet.convert import CONVERTERS, convert_checkpoint
from sparsedet.convert.querydet import BASE_CONFIGS
from sparsedet.models import build_model

BN = ("weight", "bias", "running_mean", "running_var")


def official_layout(arch="querydet", k=80, a=9, d=256, head_convs=4):
    """Key -> shape of an official RetinaNetQueryDet / RetinaNet_D2 R-50 checkpoint (spec §6.1)."""
    s = OrderedDict()
    s["pixel_mean"] = (3, 1, 1)
    s["pixel_std"] = (3, 1, 1)

    def conv_norm(name, shape):
        s[f"backbone.bottom_up.{name}.weight"] = shape
        for b in BN:
            s[f"backbone.bottom_up.{name}.norm.{b}"] = (shape[0],)

    conv_norm("stem.conv1", (64, 3, 7, 7))
    c_prev = 64
    for stage, m, count in zip((2, 3, 4, 5), (64, 128, 256, 512), (3, 4, 6, 3)):
        for i in range(count):
            c_in = c_prev if i == 0 else 4 * m
            conv_norm(f"res{stage}.{i}.conv1", (m, c_in, 1, 1))
            conv_norm(f"res{stage}.{i}.conv2", (m, m, 3, 3))
            conv_norm(f"res{stage}.{i}.conv3", (4 * m, m, 1, 1))
            if i == 0:
                conv_norm(f"res{stage}.0.shortcut", (4 * m, c_in, 1, 1))
        c_prev = 4 * m
    levels = (2, 3, 4, 5) if arch == "querydet" else (3, 4, 5)
    for level in levels:
        c_in = {2: 256, 3: 512, 4: 1024, 5: 2048}[level]
        s[f"backbone.fpn_lateral{level}.weight"] = (d, c_in, 1, 1)
        s[f"backbone.fpn_lateral{level}.bias"] = (d,)
        s[f"backbone.fpn_output{level}.weight"] = (d, d, 3, 3)
        s[f"backbone.fpn_output{level}.bias"] = (d,)
    s["backbone.top_block.p6.weight"] = (d, 2048, 3, 3)
    s["backbone.top_block.p6.bias"] = (d,)
    s["backbone.top_block.p7.weight"] = (d, d, 3, 3)
    s["backbone.top_block.p7.bias"] = (d,)
    if arch == "querydet":
        for i in range(head_convs):
            for kind in ("cls", "bbox"):
                s[f"det_head.{kind}_layer_{i}.weight"] = (d, d, 3, 3)
                s[f"det_head.{kind}_layer_{i}.bias"] = (d,)
        s["det_head.cls_score.weight"], s["det_head.cls_score.bias"] = (a * k, d, 3, 3), (a * k,)
        s["det_head.bbox_pred.weight"], s["det_head.bbox_pred.bias"] = (a * 4, d, 3, 3), (a * 4,)
        for i in range(4):
            s[f"query_head.layer_{i}.weight"], s[f"query_head.layer_{i}.bias"] = (d, d, 3, 3), (d,)
        s["query_head.pred_net.weight"], s["query_head.pred_net.bias"] = (1, d, 3, 3), (1,)
        for i in range(6):
            s[f"anchor_generator.cell_anchors.{i}"] = (9, 4)
        for i in range(2):
            s[f"query_anchor_generator.cell_anchors.{i}"] = (1, 4)
    else:
        for i in range(head_convs):
            for kind in ("cls", "bbox"):
                s[f"head.{kind}_subnet.{2 * i}.weight"] = (d, d, 3, 3)
                s[f"head.{kind}_subnet.{2 * i}.bias"] = (d,)
        s["head.cls_score.weight"], s["head.cls_score.bias"] = (a * k, d, 3, 3), (a * k,)
        s["head.bbox_pred.weight"], s["head.bbox_pred.bias"] = (a * 4, d, 3, 3), (a * 4,)
    return s


def random_state(layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    return OrderedDict((k, torch.randn(shape, generator=g) * 0.05) for k, shape in layout.items())


def official_tower(state, x, layer_keys, pred_key):
    """The official tower, functionally: conv + ReLU per layer key, then the predictor conv."""
    for key in layer_keys:
        x = F.relu(F.conv2d(x, state[key + ".weight"], state[key + ".bias"], padding=1))
    return F.conv2d(x, state[pred_key + ".weight"], state[pred_key + ".bias"], padding=1)


@pytest.fixture(scope="module")
def querydet_state():
    return random_state(official_layout("querydet", k=10))


def test_registered():
    assert {"sparse_rcnn", "querydet", "retinanet"} <= set(CONVERTERS)


def test_querydet_every_key_maps_and_loads_strict(querydet_state, single_thread):
    layout = official_layout("querydet", k=10)
    result = convert_checkpoint("querydet", {"model": querydet_state})
    assert result.config_overrides["model.num_classes"] == 10
    assert result.config_overrides["model.backbone.depth"] == 50
    ignored = [k for k in layout if k.startswith(("pixel_", "anchor_generator", "query_anchor_generator"))]
    assert len(result.state_dict) == len(layout) - len(ignored)
    model = build_model(BASE_CONFIGS["querydet"], {**result.config_overrides, "model.backbone.weights": None})
    missing, unexpected = model.load_state_dict(result.state_dict, strict=True)
    assert not missing and not unexpected
    # MSRA/caffe layout: stride on the 1x1, BGR input, caffe mean.
    block = model.backbone.body.layer3[0]
    assert block.conv1.stride == (2, 2) and block.conv2.stride == (1, 1)
    assert model.preprocess.input_format == "BGR"
    # Same tensors as the official keys (spot checks across every group).
    s = querydet_state
    pairs = {"backbone.body.layer4.2.bn3.running_var": "backbone.bottom_up.res5.2.conv3.norm.running_var",
             "backbone.body.layer1.0.downsample.0.weight": "backbone.bottom_up.res2.0.shortcut.weight",
             "backbone.fpn.inner_blocks.0.0.weight": "backbone.fpn_lateral2.weight",
             "backbone.fpn.layer_blocks.3.0.bias": "backbone.fpn_output5.bias",
             "backbone.fpn.extra_blocks.p6.weight": "backbone.top_block.p6.weight"}
    for ours, theirs in pairs.items():
        assert torch.equal(result.state_dict[ours], s[theirs])
    # Heads compute what the official towers compute (order of layers and predictors).
    x = torch.randn(1, 256, 5, 6)
    with torch.no_grad():
        cls, = model.head.cls_tower(x)
        box, = model.head.box_tower(x)
        qry, = model.query_head(x)
    torch.testing.assert_close(cls, official_tower(s, x, [f"det_head.cls_layer_{i}" for i in range(4)], "det_head.cls_score"))
    torch.testing.assert_close(box, official_tower(s, x, [f"det_head.bbox_layer_{i}" for i in range(4)], "det_head.bbox_pred"))
    torch.testing.assert_close(qry, official_tower(s, x, [f"query_head.layer_{i}" for i in range(4)], "query_head.pred_net"))


def test_retinanet_d2_layout(single_thread):
    s = random_state(official_layout("retinanet", k=80), seed=1)
    result = convert_checkpoint("retinanet", s)
    assert result.config_overrides["model.num_classes"] == 80
    with torch.device("meta"):
        model = build_model(BASE_CONFIGS["retinanet"], {**result.config_overrides, "model.backbone.weights": None})
    model.load_state_dict(result.state_dict, strict=True, assign=True)
    assert torch.equal(result.state_dict["head.cls_tower.subnet.3.weight"], s["head.cls_subnet.6.weight"])
    assert torch.equal(result.state_dict["backbone.fpn.inner_blocks.0.0.weight"], s["backbone.fpn_lateral3.weight"])
    assert torch.equal(result.state_dict["head.box_tower.predictors.0.bias"], s["head.bbox_pred.bias"])


def test_errors_name_keys(querydet_state):
    bad = OrderedDict(querydet_state)
    del bad["det_head.cls_layer_2.bias"]
    bad["det_head.cls_bn_0.weight"] = torch.zeros(256)
    with pytest.raises(ValueError) as err:
        convert_checkpoint("querydet", bad)
    assert "det_head.cls_layer_2.bias" in str(err.value) and "det_head.cls_bn_0.weight" in str(err.value)
    with pytest.raises(ValueError, match="arch 'querydet'"):
        convert_checkpoint("retinanet", querydet_state)
    with pytest.raises(ValueError, match="not an official querydet"):
        convert_checkpoint("querydet", {"fc.weight": torch.zeros(2, 2)})


def test_pkl_file(tmp_path, querydet_state):
    import pickle
    path = tmp_path / "model_final.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in querydet_state.items()}}, f)
    result = convert_checkpoint("querydet", path, tmp_path / "out.pth")
    assert (tmp_path / "out.pth").is_file() and "written to" in result.report
