"""Parts shared by TSP-FCOS and TSP-RCNN: the pre-norm encoder, the sine helper, the conv+BN
P6/P7 block and the optimizer with parameter groups chosen by name (tsp.md §1.3-1.5, §4)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from sparsedet.config import ConfigError
from sparsedet.engine.optim import ScheduleSet, build_optimizer
from sparsedet.layers.position_encoding import sine_encoding
from sparsedet.layers.transformer import TransformerEncoder
from sparsedet.models.backbones.fpn import FPN


# ---------------------------------------------------------------- encoder
def _hand_layer(layer, x, pos, pad):
    """The pre-norm layer of tsp.md §1.4 written out with explicit q/k/v matrices (eval mode)."""
    d = x.shape[-1]
    heads = layer.self_attn.num_heads
    w, b = layer.self_attn.in_proj_weight, layer.self_attn.in_proj_bias
    h = F.layer_norm(x, (d,), layer.norm1.weight, layer.norm1.bias)
    q = (h + pos) @ w[:d].T + b[:d]
    k = (h + pos) @ w[d:2 * d].T + b[d:2 * d]
    v = h @ w[2 * d:].T + b[2 * d:]
    split = lambda t: t.view(t.shape[0], t.shape[1], heads, d // heads).transpose(1, 2)  # (B, h, S, dh)
    logits = split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // heads)
    logits = logits.masked_fill(pad[:, None, None, :], float("-inf"))
    attended = (logits.softmax(-1) @ split(v)).transpose(1, 2).reshape(x.shape)
    x = x + layer.self_attn.out_proj(attended)
    h = F.layer_norm(x, (d,), layer.norm2.weight, layer.norm2.bias)
    return x + layer.linear2(torch.relu(layer.linear1(h)))


def test_encoder_matches_a_hand_written_pre_norm_layer():
    torch.manual_seed(0)
    enc = TransformerEncoder(d_model=16, nhead=4, num_layers=2, dim_feedforward=32, dropout=0.1).eval()
    for p in enc.parameters():  # non-trivial norms and biases
        nn.init.normal_(p, std=0.3)
    x, pos = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    expected = x
    for layer in enc.layers:
        expected = _hand_layer(layer, expected, pos, pad)
    expected = F.layer_norm(expected, (16,), enc.norm.weight, enc.norm.bias)
    with torch.no_grad():
        got = enc(x, pos, pad)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # The position enters Q and K only: values are h, so a zero position is not "no position".
    with torch.no_grad():
        assert not torch.allclose(enc(x, pos, pad), enc(x, None, pad))
        # Padded keys do not influence the valid tokens.
        x2 = x.clone()
        x2[1, 3:] = 100.0
        torch.testing.assert_close(enc(x2, pos, pad)[1, :3], got[1, :3], atol=1e-5, rtol=1e-5)


def test_encoder_keys_are_the_official_ones():
    keys = set(TransformerEncoder(num_layers=6).state_dict())
    for i in range(6):
        for name, shape in [("self_attn.in_proj_weight", (1536, 512)), ("self_attn.in_proj_bias", (1536,)),
                            ("self_attn.out_proj.weight", (512, 512)), ("linear1.weight", (2048, 512)),
                            ("linear2.weight", (512, 2048)), ("norm1.weight", (512,)), ("norm2.bias", (512,))]:
            assert f"layers.{i}.{name}" in keys
    assert {"norm.weight", "norm.bias"} <= keys
    assert len(keys) == 6 * 12 + 2


def test_encoder_trains_with_dropout():
    enc = TransformerEncoder(d_model=8, nhead=2, num_layers=1, dim_feedforward=16).train()
    x = torch.randn(1, 4, 8, requires_grad=True)
    enc(x, torch.zeros_like(x)).sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in enc.parameters())


# ---------------------------------------------------------------- sine helper
def test_sine_encoding_at_hand_picked_values():
    # F = 4, T = 10000: frequencies (1, 1, 100, 100).
    got = sine_encoding(torch.tensor([0.0, math.pi / 2]), 4)
    expected = torch.tensor([[0.0, 1.0, 0.0, 1.0],
                             [1.0, 0.0, math.sin(math.pi / 200), math.cos(math.pi / 200)]])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    # F = 8 at v = 2*pi: the third pair has frequency 10000**(4/8) = 100.
    e = sine_encoding(torch.tensor(2 * math.pi), 8, temperature=10000)
    assert e.shape == (8,)
    assert e[4].item() == pytest.approx(math.sin(2 * math.pi / 100), abs=1e-6)
    assert e[5].item() == pytest.approx(math.cos(2 * math.pi / 100), abs=1e-6)
    assert sine_encoding(torch.zeros(2, 3), 6).shape == (2, 3, 6)
    with pytest.raises(ValueError, match="even"):
        sine_encoding(torch.zeros(2), 5)


# ---------------------------------------------------------------- P6/P7 with BatchNorm
def test_p6p7_bn_block_from_p5_output():
    fpn = FPN((3, 4, 5), (8, 16, 32), 8, (3, 4, 5, 6, 7), top_block="p6p7_bn_from_p5")
    names = {k for k in fpn.state_dict() if k.startswith("extra_blocks.")}
    assert {"extra_blocks.p6.conv.weight", "extra_blocks.p6.bn.running_var", "extra_blocks.p7.bn.weight"} <= names
    feats = {"c3": torch.randn(2, 8, 32, 32), "c4": torch.randn(2, 16, 16, 16), "c5": torch.randn(2, 32, 8, 8)}
    fpn.eval()
    with torch.no_grad():
        for m in (fpn.extra_blocks.p6.bn, fpn.extra_blocks.p7.bn):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.uniform_(0.5, 2)
        out = fpn(feats)
        top = fpn.extra_blocks
        p6 = top.p6.bn(top.p6.conv(out["p5"]))
        p7 = top.p7.bn(top.p7.conv(torch.relu(p6)))
    assert [tuple(v.shape[-2:]) for v in out.values()] == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
    torch.testing.assert_close(out["p6"], p6)
    torch.testing.assert_close(out["p7"], p7)
    assert (out["p6"] < 0).any()  # no ReLU on the published P6
    fpn.train()
    before = top.p6.bn.running_mean.clone()
    fpn(feats)
    assert not torch.equal(before, top.p6.bn.running_mean)  # batch statistics in train mode


# ---------------------------------------------------------------- optimizer groups
class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        self.transformer_encoder = TransformerEncoder(d_model=4, nhead=1, num_layers=1, dim_feedforward=8)
        self.head = nn.Linear(4, 2)
        self.head_norm = nn.GroupNorm(2, 4)


def _lookup(opt_set, param):
    for opt in opt_set.optimizers:
        for group in opt.param_groups:
            if any(p is param for p in group["params"]):
                return type(opt).__name__, group
    raise AssertionError("parameter in no group")


def test_default_solver_builds_the_historical_groups():
    model = _Toy()
    opt = build_optimizer(model, {"optimizer": "adamw", "base_lr": 1e-3, "weight_decay": 0.05,
                                  "backbone_lr_multiplier": 0.1})
    assert len(opt.optimizers) == 1 and isinstance(opt.optimizers[0], torch.optim.AdamW)
    groups = opt.optimizers[0].param_groups
    rest = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    backbone = [p for n, p in model.named_parameters() if n.startswith("backbone.")]
    assert [len(g["params"]) for g in groups] == [len(rest), len(backbone)]
    assert all(a is b for a, b in zip(groups[0]["params"], rest))
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(1e-4)]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.05]


def test_param_groups_by_name_with_norm_decay_and_schedule():
    model = _Toy()
    solver = {"optimizer": "sgd", "base_lr": 0.01, "weight_decay": 1e-4, "norm_weight_decay": 0.0,
              "param_groups": [{"match": "transformer", "optimizer": "adamw", "lr": 1e-4, "clip_grad_norm": 0.01}],
              "warmup_iters": 10, "warmup_factor": 0.001, "steps": [20], "gamma": 0.1}
    opt = build_optimizer(model, solver)
    kinds = [type(o).__name__ for o in opt.optimizers]
    assert kinds == ["SGD", "AdamW"]
    layer = model.transformer_encoder.layers[0]
    assert _lookup(opt, layer.linear1.weight)[0] == "AdamW"
    assert _lookup(opt, layer.linear1.weight)[1]["weight_decay"] == 1e-4
    assert _lookup(opt, layer.norm1.weight)[1]["weight_decay"] == 0.0          # LN inside the AdamW group
    assert _lookup(opt, model.head.weight)[0] == "SGD"
    assert _lookup(opt, model.head.weight)[1]["weight_decay"] == 1e-4
    assert _lookup(opt, model.head_norm.weight)[1]["weight_decay"] == 0.0       # GN
    assert _lookup(opt, model.backbone[1].bias)[1]["weight_decay"] == 0.0       # BN
    assert _lookup(opt, model.backbone[0].weight)[1]["weight_decay"] == 1e-4
    counted = sum(len(g["params"]) for g in opt.param_groups)
    assert counted == len(list(model.parameters()))
    # One multiplier for every group, relative to each group's own lr.
    schedule = ScheduleSet(opt, solver)
    for _ in range(5):
        opt.step()
        schedule.step()
    factor = 0.001 * 0.5 + 0.5
    assert _lookup(opt, model.head.weight)[1]["lr"] == pytest.approx(0.01 * factor)
    assert _lookup(opt, layer.linear1.weight)[1]["lr"] == pytest.approx(1e-4 * factor)


def test_group_clip_touches_only_that_group():
    model = _Toy()
    opt = build_optimizer(model, {"optimizer": "sgd", "base_lr": 0.1, "param_groups": [
        {"match": "transformer", "optimizer": "adamw", "lr": 1e-4, "clip_grad_norm": 0.01}]})
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    opt.clip_grad_norms()
    enc = list(model.transformer_encoder.parameters())
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in enc]))
    assert norm.item() == pytest.approx(0.01, rel=1e-4)
    assert torch.all(model.head.weight.grad == 3.0)


def test_optimizer_state_round_trip_and_old_format():
    model = _Toy()
    solver = {"optimizer": "sgd", "base_lr": 0.1,
              "param_groups": [{"match": "transformer", "optimizer": "adamw", "lr": 1e-3}]}
    opt = build_optimizer(model, solver)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    state = opt.state_dict()
    other = build_optimizer(_Toy(), solver)
    other.load_state_dict(state)
    assert other.state_dict()["optimizers"][1]["state"][0]["step"] == 1
    single = build_optimizer(_Toy(), {"optimizer": "sgd", "base_lr": 0.1})
    plain = single.optimizers[0].state_dict()
    single.load_state_dict(plain)  # a checkpoint written before OptimizerSet
    with pytest.raises(ValueError, match="param_groups"):
        single.load_state_dict(state)


@pytest.mark.parametrize("groups, message", [
    ([{"match": "transformer", "optimizer": "adam", "lr": 1e-4}], r"param_groups\[0\]\.optimizer"),
    ([{"match": "transformer", "lr": 1e-4}], r"param_groups\[0\]\.optimizer is required"),
    ([{"match": "transformer", "optimizer": "sgd", "lr": 1e-4, "clip": 1}], "unknown keys"),
    ([{"match": "decoder", "optimizer": "sgd", "lr": 1e-4}], "names no trainable parameter"),
    ("transformer", "must be a list"),
])
def test_bad_param_groups_name_the_key(groups, message):
    with pytest.raises(ConfigError, match=message):
        build_optimizer(_Toy(), {"optimizer": "sgd", "param_groups": groups})


# ---------------------------------------------------------------- trainer: exact resume with groups
def test_trainer_resumes_exactly_with_two_optimizers(tmp_path, single_thread):
    from sparsedet.data.synthetic import write_synthetic_coco
    from sparsedet.engine.trainer import Trainer
    from test_trainer import tiny_config, train_losses

    data = write_synthetic_coco(tmp_path / "data", num_train=4, num_val=2, seed=0, height=64, width=96)
    groups = dict(optimizer="sgd", base_lr=1e-3, norm_weight_decay=0.0, max_iter=4, steps=[3],
                  param_groups=[{"match": "head", "optimizer": "adamw", "lr": 1e-4, "clip_grad_norm": 0.1}])
    Trainer(tiny_config(data, **groups), tmp_path / "straight", progress=False).train()
    Trainer(tiny_config(data, **{**groups, "max_iter": 2}), tmp_path / "resumed", progress=False).train()
    Trainer(tiny_config(data, **groups), tmp_path / "resumed", resume=True, progress=False).train()
    straight, resumed = train_losses(tmp_path / "straight"), train_losses(tmp_path / "resumed")
    assert resumed[3] == straight[3] and resumed[4] == straight[4]
    saved = torch.load(tmp_path / "straight" / "last.pth", weights_only=True)
    assert len(saved["optimizer"]["optimizers"]) == 2
