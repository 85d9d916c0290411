"""Config files: bundled names, ``_base_`` inheritance, dotted overrides, helpful errors."""
from __future__ import annotations

import dataclasses

import pytest
import yaml

from sparsedet.config import ConfigError, bundled_configs, from_dict, load_config, to_dict
from sparsedet.models import build_model
from sparsedet.models.backbones import FPNConfig
from sparsedet.models.sparse_rcnn import SparseRCNNConfig

pytestmark = pytest.mark.usefixtures("single_thread")

SPARSE_RCNN_CONFIGS = [
    "sparse_rcnn/mobilenetv2_fpn_cpu",
    "sparse_rcnn/r101_fpn_100pro_3x",
    "sparse_rcnn/r101_fpn_300pro_crop_3x",
    "sparse_rcnn/r50_fpn_100pro_3x",
    "sparse_rcnn/r50_fpn_300pro_crop_3x",
]
SMALL = ["model.backbone.depth=18", "model.hidden_dim=32", "model.fpn.channels=32", "model.num_proposals=4",
         "model.num_stages=1", "model.dim_feedforward=32", "model.dim_dynamic=8"]


def test_bundled_names():
    names = bundled_configs()
    assert set(SPARSE_RCNN_CONFIGS) <= set(names)
    assert names == sorted(names)


@pytest.mark.parametrize("name", SPARSE_RCNN_CONFIGS)
def test_bundled_configs_parse_and_build(name):
    config = load_config(name)
    assert config["model"]["name"] == "sparse_rcnn"
    # the whole model section maps onto the typed config (no unknown keys)
    cfg = from_dict(SparseRCNNConfig, config["model"], "model")
    assert cfg.num_classes == 80 and cfg.loss.use_focal and cfg.dropout == 0.0
    model = build_model(name, SMALL)
    assert model.config["model"]["hidden_dim"] == 32
    assert len(model.head.head_series) == 1
    # with ".yaml" too
    assert load_config(name + ".yaml") == config


def test_inheritance_through_base():
    r50 = load_config("sparse_rcnn/r50_fpn_100pro_3x")
    r101 = load_config("sparse_rcnn/r101_fpn_100pro_3x")
    assert r50["model"]["backbone"]["depth"] == 50 and r101["model"]["backbone"]["depth"] == 101
    # everything else comes from the base
    r101["model"]["backbone"]["depth"] = 50
    assert r101 == r50
    r50_300 = load_config("sparse_rcnn/r50_fpn_300pro_crop_3x")
    r101_300 = load_config("sparse_rcnn/r101_fpn_300pro_crop_3x")
    for cfg, depth in ((r50_300, 50), (r101_300, 101)):
        assert cfg["model"]["num_proposals"] == 300
        assert cfg["input"]["crop"]["enabled"] is True
        assert cfg["input"]["crop"]["size"] == [384, 600]  # sibling keys kept by the deep merge
        assert cfg["model"]["backbone"]["depth"] == depth
    assert r50["model"]["num_proposals"] == 100 and r50["input"]["crop"]["enabled"] is False
    mobile = load_config("sparse_rcnn/mobilenetv2_fpn_cpu")
    assert mobile["model"]["backbone"]["name"] == "mobilenet_v2"
    assert mobile["model"]["backbone"]["weights"] == "imagenet"
    assert mobile["model"]["hidden_dim"] == mobile["model"]["fpn"]["channels"] == 128


def test_official_defaults_in_r50_config():
    cfg = from_dict(SparseRCNNConfig, load_config("sparse_rcnn/r50_fpn_100pro_3x")["model"], "model")
    assert dataclasses.replace(cfg) == cfg
    default = SparseRCNNConfig()
    assert to_dict(cfg) == to_dict(default)


def test_dotted_overrides():
    config = load_config("sparse_rcnn/r50_fpn_100pro_3x", [
        "model.backbone.weights=null",
        "model.backbone.depth=101",
        "model.fpn.out_levels=[3, 4, 5]",
        "model.box_weights=[1, 1, 1, 1]",
        "model.loss.use_focal=false",
        "model.proposal_init=grid",
        "solver.base_lr=1e-4",
        "input.min_size_test=600",
        "data.train.images=value=with=equals",
    ])
    assert config["model"]["backbone"]["weights"] is None
    assert config["model"]["backbone"]["depth"] == 101
    assert config["model"]["fpn"]["out_levels"] == [3, 4, 5]
    assert config["model"]["box_weights"] == [1, 1, 1, 1]
    assert config["model"]["loss"]["use_focal"] is False
    assert config["model"]["proposal_init"] == "grid"
    assert config["solver"]["base_lr"] == pytest.approx(1e-4)
    assert config["input"]["min_size_test"] == 600
    assert config["data"]["train"]["images"] == "value=with=equals"
    # untouched siblings stay
    assert config["model"]["backbone"]["layout"] == "torchvision"


def test_mapping_overrides_and_dict_input_not_mutated():
    base = load_config("sparse_rcnn/r50_fpn_100pro_3x")
    snapshot = yaml.safe_dump(base)
    config = load_config(base, {"model.backbone.weights": None, "model.fpn.out_levels": [2, 3],
                                "model.num_proposals": 300, "model.backbone.weights_path": "/tmp/a b: c.pth"})
    assert config["model"]["backbone"]["weights"] is None
    assert config["model"]["fpn"]["out_levels"] == [2, 3]
    assert config["model"]["num_proposals"] == 300
    assert config["model"]["backbone"]["weights_path"] == "/tmp/a b: c.pth"
    assert yaml.safe_dump(base) == snapshot


def test_overrides_reach_the_model():
    model = build_model("sparse_rcnn/r50_fpn_100pro_3x", SMALL + ["model.num_classes=3", "model.num_stages=2"])
    assert model.head.head_series[0].class_logits.out_features == 3
    assert len(model.head.head_series) == 2
    assert model.init_proposal_boxes.weight.shape == (4, 4)
    mapping = {key: yaml.safe_load(value) for key, value in (o.split("=") for o in SMALL)}
    model = build_model("sparse_rcnn/r50_fpn_100pro_3x", {**mapping, "model.num_classes": 7})
    assert model.head.head_series[0].class_logits.out_features == 7


def test_list_values_become_tuples_for_tuple_fields():
    cfg = from_dict(FPNConfig, {"out_levels": [2, 3, 4]}, "model.fpn")
    assert cfg.out_levels == (2, 3, 4)
    cfg = from_dict(SparseRCNNConfig, {"box_weights": [1, 1, 1, 1], "pixel_mean": [1, 2, 3]}, "model")
    assert cfg.box_weights == (1, 1, 1, 1) and cfg.pixel_mean == (1, 2, 3)


def test_unknown_key_names_the_dotted_key_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown config key model\.num_proposal \(did you mean model\.num_proposals\?\)"):
        build_model("sparse_rcnn/r50_fpn_100pro_3x", ["model.num_proposal=300"])
    with pytest.raises(ConfigError, match=r"model\.backbone\.dpth \(did you mean model\.backbone\.depth\?\)"):
        build_model("sparse_rcnn/r50_fpn_100pro_3x", ["model.backbone.dpth=18"])
    with pytest.raises(ConfigError, match=r"model\.loss\.giou_wieght \(did you mean model\.loss\.giou_weight\?\)"):
        build_model("sparse_rcnn/r50_fpn_100pro_3x", ["model.loss.giou_wieght=1"])
    with pytest.raises(ConfigError, match=r"model\.loss must be a mapping"):
        build_model("sparse_rcnn/r50_fpn_100pro_3x", ["model.loss=3"])


def test_unknown_config_name_suggests_close_names():
    with pytest.raises(ConfigError, match=r"sparse_rcnn/r50_fpn_100pro'.*Did you mean: sparse_rcnn/r50_fpn_100pro_3x"):
        load_config("sparse_rcnn/r50_fpn_100pro")
    with pytest.raises(ConfigError, match=r"Did you mean:.*sparse_rcnn/r101_fpn_100pro_3x"):
        build_model("sparse_rcnn/r101_fpn_100_pro_3x")


def test_bad_overrides_and_files(tmp_path):
    with pytest.raises(ConfigError, match="must look like key.path=value"):
        load_config("sparse_rcnn/r50_fpn_100pro_3x", ["model.num_proposals"])
    with pytest.raises(ConfigError, match="'num_proposals' is a value, not a section"):
        load_config("sparse_rcnn/r50_fpn_100pro_3x", ["model.num_proposals.x=1"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config("sparse_rcnn/r50_fpn_100pro_3x", ["model.box_weights=[1, 2"])
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("_base_: b.yaml\nmodel: {num_classes: 3}\n")
    b.write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(a)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_config(bad)
    no_model = tmp_path / "no_model.yaml"
    no_model.write_text("solver: {base_lr: 1}\n")
    with pytest.raises(ConfigError, match="has no model.name"):
        build_model(no_model)
    with pytest.raises(ConfigError, match="model.name 'detr' is not one of"):
        build_model({"model": {"name": "detr"}})


def test_user_file_with_base(tmp_path):
    from sparsedet.config import CONFIG_ROOT
    user = tmp_path / "mine.yaml"
    user.write_text(f"_base_: {CONFIG_ROOT / 'sparse_rcnn' / 'r50_fpn_300pro_crop_3x.yaml'}\n"
                    "model:\n  num_classes: 3\n  backbone: {depth: 18}\n")
    config = load_config(user)
    assert config["model"]["num_classes"] == 3 and config["model"]["num_proposals"] == 300
    assert config["model"]["backbone"] == {**load_config("sparse_rcnn/r50_fpn_100pro_3x")["model"]["backbone"],
                                           "depth": 18}
    assert load_config(str(user)) == config
