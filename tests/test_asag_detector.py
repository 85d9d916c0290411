"""ASAG detector: batch == batch-of-one, training losses, converter key coverage, bad input."""
from __future__ import annotations

import pytest
import torch

from asag_helpers import assert_batch_of_three_equals_singles
import sparsedet
from sparsedet.config import ConfigError
from sparsedet.models import build_model

TINY = ["model.backbone.depth=18", "model.hidden_dim=64", "model.fpn.channels=64", "model.dim_feedforward=128",
        "model.anchors.compress_hidden=8", "model.num_classes=3"]


def tiny(*extra, config="asag/a_r50_fpn_100q_1x"):
    torch.manual_seed(0)
    return build_model(config, TINY + list(extra))


def official_layout(state):
    """sparsedet ASAG state_dict -> the official key names (spec section 6)."""
    out = {}
    for key, value in state.items():
        if key == "anchor_generator.train_steps":
            continue
        if key.startswith("backbone.body."):
            key = "backbone.0.body." + key[len("backbone.body."):]
        elif key.startswith("backbone.fpn."):
            kind, index, _, name = key.split(".")[2:]
            key = f"neck.{kind}.{index}.{name}"               # torchvision 0.11 FPN names
        out[key] = value
    return out


@pytest.mark.parametrize("decoder", ["adamixer", "sparse_rcnn"])
def test_batch_of_three_equals_three_batches_of_one(decoder):
    assert_batch_of_three_equals_singles(tiny(f"model.decoder_type={decoder}").eval())


def test_training_losses_and_gradients():
    model = tiny("model.decoder_type=sparse_rcnn").train()
    images = [torch.rand(3, 160, 224) * 255, torch.rand(3, 128, 192) * 255]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 70.0], [100.0, 40.0, 200.0, 150.0]]), "labels": torch.tensor([0, 2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    losses = model(images, targets)
    expected = {f"loss_{t}{s}" for t in ("ce", "bbox", "giou") for s in ("_anchor", "_rpn", "_0", "_1", "_2", "")}
    assert set(losses) == expected
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.anchor_generator.proj_patch.layers[0].weight.grad.abs().sum() > 0
    assert model.rpn.roi.weight.grad.abs().sum() > 0
    assert all(h.class_logits.weight.grad is not None for h in model.decoder.heads)


def test_denoising_adds_dn_losses():
    model = tiny("model.denoising.enabled=true", "model.denoising.num_queries=10").train()
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 70.0], [30.0, 40.0, 90.0, 100.0], [5.0, 5.0, 50.0, 40.0]]),
                "labels": torch.tensor([0, 2, 1])}]
    losses = model([torch.rand(3, 160, 224) * 255], targets)
    assert {f"dn_loss_ce_{k}" for k in range(5)} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    # dn queries pair with the repeated ground truth: 3 boxes x 3 copies, 1 filler
    q, t = model.denoising.last_pairs[0]
    assert q.tolist() == list(range(9)) and t.tolist() == [0, 1, 2] * 3


def test_converter_round_trip_and_keep_head(tmp_path):
    model = tiny("model.test_head=aux_1").eval()
    official = official_layout(model.state_dict())
    assert "neck.inner_blocks.0.weight" in official and "decoder.bbox_head.3.iof_tau" in official
    src = tmp_path / "asag_official.pth"
    torch.save({"model": official, "epoch": 11}, src)
    result = sparsedet.convert_checkpoint("asag", src, tmp_path / "converted.pth")
    assert result.config_overrides["model.decoder_type"] == "adamixer"
    assert result.config_overrides["model.backbone.depth"] == 18
    fresh = tiny("model.test_head=aux_1")
    fresh.load_state_dict(torch.load(tmp_path / "converted.pth", weights_only=True))
    fresh.eval()
    image = torch.rand(3, 160, 224) * 255
    with torch.no_grad():
        a, b = model([image])[0], fresh([image])[0]
    assert torch.equal(a["scores"], b["scores"]) and torch.equal(a["boxes"], b["boxes"])
    assert torch.equal(model.last_anchors.boxes, fresh.last_anchors.boxes)
    # one-head model: head aux_1 moved to slot 0 gives the same detections
    one = sparsedet.convert_checkpoint("asag", official, keep_head="aux_1")
    assert one.config_overrides["model.num_heads_decoder"] == 1
    single = tiny("model.num_heads_decoder=1", "model.test_head=main")
    single.load_state_dict(one.state_dict)
    with torch.no_grad():
        c = single.eval()([image])[0]
    assert torch.allclose(a["scores"], c["scores"]) and torch.allclose(a["boxes"], c["boxes"])
    # sparsedet.load recognises the official file and the converted one
    for path in (src, tmp_path / "converted.pth"):
        loaded = sparsedet.load(path, overrides=["model.test_head=aux_1"])
        with torch.no_grad():
            assert torch.equal(loaded([image])[0]["scores"], a["scores"])


@pytest.mark.parametrize("config, keys", [
    ("asag/a_r50_fpn_100q_1x", 498), ("asag/s_r50_fpn_300q_3x", 510)])
def test_converter_key_coverage_full_size(config, keys):
    """Every official key of the full-size models (spec section 6 names and shapes) maps."""
    with torch.device("meta"):
        model = build_model(config)
    official = official_layout(model.state_dict())
    assert len(official) == keys
    spec_shapes = {"anchor_generator.compress.0.0.weight": (128, 256, 1, 1), "anchor_generator.layernorm.0.weight": (225, 8),
                   "rpn.roi.weight": (256, 12544), "rpn.attn.in_proj_weight": (768, 256), "decoder.decoder_embedding.weight": (4, 256),
                   "neck.inner_blocks.3.weight": (256, 2048, 1, 1)}
    if "s_r50" in config:
        spec_shapes.update({"anchor_generator.proj_all.layers.2.weight": (750, 1000),
                            "decoder.head_series.2.inst_interact.dynamic_layer.weight": (32768, 256),
                            "decoder.head_series.0.inst_interact.out_layer.weight": (256, 12544)})
    else:
        spec_shapes.update({"anchor_generator.proj_patch.layers.2.weight": (100, 1000),
                            "decoder.bbox_head.1.sampling_n_mixing.adaptive_mixing.parameter_generator.0.weight": (32768, 256),
                            "decoder.bbox_head.1.sampling_n_mixing.sampling_offset_generator.0.weight": (384, 256),
                            "decoder.bbox_head.3.sampling_n_mixing.adaptive_mixing.out_proj.weight": (256, 32768)})
    for key, shape in spec_shapes.items():
        assert tuple(official[key].shape) == shape, key
    result = sparsedet.convert_checkpoint("asag", official)
    assert list(result.state_dict) == list(model.state_dict())
    # a missing and a misshapen key are both named
    broken = dict(official)
    del broken["rpn.roi.weight"]
    broken["rpn.fc_reg.weight"] = torch.zeros(5, 256)
    with pytest.raises(ValueError, match=r"rpn\.roi\.weight[\s\S]*rpn\.fc_reg\.weight"):
        sparsedet.convert_checkpoint("asag", broken)


def test_bad_input_names_the_key():
    with pytest.raises(ConfigError, match="model.setting"):
        tiny("model.setting=200")
    with pytest.raises(ConfigError, match="model.decoder_type"):
        tiny("model.decoder_type=detr")
    with pytest.raises(ConfigError, match="model.test_head"):
        tiny("model.test_head=aux_3")
    with pytest.raises(ConfigError, match="model.test_head"):
        tiny("model.num_heads_decoder=1", "model.test_head=aux_2")
    model = tiny("model.fast_inference=true").train()
    with pytest.raises(ConfigError, match="model.fast_inference"):
        model([torch.rand(3, 64, 64) * 255], [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}])
    # a one-head checkpoint loaded into a four-head model: the error names the keys to set
    one = sparsedet.convert_checkpoint("asag", official_layout(tiny().state_dict()), keep_head="aux_2")
    with pytest.raises(ConfigError, match="model.num_heads_decoder=1"):
        tiny().load_state_dict(one.state_dict)


def test_fast_inference_runs_and_exposes_anchors():
    model = tiny("model.fast_inference=true").eval()
    with torch.no_grad():
        out = model([torch.rand(3, 160, 224) * 255, torch.rand(3, 128, 160) * 255])
    assert len(out) == 2 and model.last_anchors.boxes.shape[0] == 2
    assert (model.last_anchors.valid.sum(1) >= 5).all()


def test_backbone_bn_affine_is_trained_outside_frozen_stages():
    """Official ASAG backbone: BN statistics fixed, BN weight/bias of layer2-4 trainable (spec 1.2)."""
    model = tiny()
    body = model.backbone.body
    assert body.layer2[0].bn1.weight.requires_grad and not body.layer1[0].bn1.weight.requires_grad
    assert not body.bn1.weight.requires_grad
    assert "layer2.0.bn1.running_mean" in dict(body.named_buffers())
    frozen = tiny("model.backbone.trainable_bn_affine=false").backbone.body
    assert "layer2.0.bn1.weight" in dict(frozen.named_buffers())
