"""ASAG-D (spec §3.3 reconstruction): the deformable encoder neck, the Deformable-DETR head, batch of
3 == three batches of 1, a training step, evaluation output, explain and the bad-config errors."""
from __future__ import annotations

import pytest
import torch

from asag_helpers import assert_batch_of_three_equals_singles
from sparsedet.config import ConfigError
from sparsedet.models import build_model
from sparsedet.models.asag.deformable_stage import DeformableStage, box_sine_embedding, inverse_sigmoid
from sparsedet.models.backbones import BackboneConfig, DeformableEncoderConfig, build_deformable_backbone

# ResNet-18, 32-d encoder (1 layer) and queries: a few MB, well under a second per forward.
TINY = ["model.backbone.depth=18", "model.hidden_dim=32", "model.encoder.channels=32", "model.encoder.num_layers=1",
        "model.encoder.dim_feedforward=64", "model.dim_feedforward=64", "model.deformable_feedforward=64",
        "model.anchors.compress_hidden=8", "model.num_classes=3"]


def tiny(*extra, config="asag/d_r50_300q_3x"):
    torch.manual_seed(0)
    return build_model(config, TINY + list(extra))


def test_encoder_neck_levels_resnet_and_mobilenet():
    torch.manual_seed(0)
    encoder = DeformableEncoderConfig(channels=32, num_layers=2, dim_feedforward=64)
    sizes = torch.tensor([[100, 150], [128, 160]])
    for backbone in (BackboneConfig(depth=18), BackboneConfig(name="mobilenet_v2", freeze_at=0)):
        model = build_deformable_backbone(backbone, encoder).eval()
        out = model(torch.randn(2, 3, 128, 160), sizes)
        # strides 8, 16, 32 from C3..C5 and 64 from the 3x3/2 conv on C5 (ceil(4/2), ceil(5/2)).
        assert [tuple(v.shape) for v in out.values()] == [(2, 32, 16, 20), (2, 32, 8, 10), (2, 32, 4, 5), (2, 32, 2, 3)]
        assert list(out) == ["e3", "e4", "e5", "e6"] and model.strides == (8, 16, 32, 64)
    assert len(model.neck.layers) == 2 and model.neck.level_embed.shape == (4, 32)
    assert model.neck.input_proj[3][0].stride == (2, 2) and model.neck.input_proj[3][1].num_groups == 32


def test_deformable_head_hand_case():
    torch.manual_seed(0)
    head = DeformableStage(num_classes=5, content_dim=32, num_heads=4, dim_feedforward=64, num_points=2,
                           strides=(8, 16, 32, 64)).eval()
    features = [torch.randn(2, 32, 16 // 2 ** k, 24 // 2 ** k) for k in range(3)] + [torch.randn(2, 32, 1, 2)]
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 0.05, 0.1], [0.7, 0.3, 1.0, 1.0]]).expand(2, 3, 4)
    out = head(features, torch.randn(2, 3, 32), boxes, torch.tensor([[128, 192], [100, 150]]))
    assert out["logits"].shape == (2, 3, 5) and out["content"].shape == (2, 3, 32)
    # Zero-initialised last box layer: the head starts from its reference box, logits from the prior.
    assert torch.allclose(out["boxes"], boxes, atol=1e-5)
    assert torch.allclose(out["logits"].mean(), torch.tensor(-4.595), atol=0.5)
    assert torch.allclose(inverse_sigmoid(torch.tensor([0.5, 0.0])), torch.tensor([0.0, -11.5129]), atol=1e-3)
    embedding = box_sine_embedding(boxes, 16)
    assert embedding.shape == (2, 3, 64)
    # DINO's order: y block first; sin(2 pi * 0.5) at feature 0 of y for the centred box.
    assert torch.allclose(embedding[0, 0, 0], torch.sin(torch.tensor(torch.pi)), atol=1e-6)
    with pytest.raises(ValueError, match="4 levels"):
        head(features[:3], torch.randn(2, 3, 32), boxes, torch.tensor([[128, 192], [100, 150]]))


def test_batch_of_three_equals_three_batches_of_one():
    assert_batch_of_three_equals_singles(tiny().eval())


def test_training_step_and_eval_output():
    model = tiny("model.setting=100").train()
    assert type(model.decoder.heads[0]).__name__ == "DeformableStage" and len(model.decoder.heads) == 4
    images = [torch.rand(3, 160, 224) * 255, torch.rand(3, 128, 192) * 255]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 70.0], [100.0, 40.0, 200.0, 150.0]]), "labels": torch.tensor([0, 2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    losses = model(images, targets)
    for suffix in ("_anchor", "_rpn", "_0", "_1", "_2", ""):
        assert {f"loss_ce{suffix}", f"loss_bbox{suffix}", f"loss_giou{suffix}"} <= set(losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    encoder_grad = model.backbone.neck.layers[0].self_attn.sampling_offsets.weight.grad
    head_grad = model.decoder.heads[3].layer.cross_attn.value_proj.weight.grad
    assert encoder_grad is not None and encoder_grad.abs().sum() > 0 and head_grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and all(set(o) == {"boxes", "scores", "labels"} for o in out)
    assert out[0]["boxes"].shape[1] == 4 and model.last_anchors.boxes.shape[-1] == 4
    model.cfg.test_head = "aux_0"
    model.test_head_index = model.cfg.test_head_index()
    with torch.no_grad():
        assert len(model(images)) == 2


def test_bad_configs_are_named():
    with pytest.raises(ConfigError, match="num_levels"):
        tiny("model.encoder.num_levels=3")                    # no stride-64 level for the fourth RoI level
    with pytest.raises(ConfigError, match="norm_groups"):
        tiny("model.encoder.channels=48")                     # GroupNorm(32) of 48 channels
    with pytest.raises(ConfigError, match="in_stages"):
        tiny("model.encoder.in_stages=[4, 5]", "model.encoder.num_levels=4")
    with pytest.raises(ConfigError, match="decoder_type"):
        tiny("model.decoder_type=deformable_detr")


def test_explain_runs_for_asag_d():
    from sparsedet.explain import explain_prediction

    model = tiny()
    model.config["input"] = {"min_size_test": 160, "max_size_test": 224}
    picture = explain_prediction(model, torch.rand(3, 200, 280) * 255)
    assert picture.size[0] > 300 and picture.size[1] > 300
