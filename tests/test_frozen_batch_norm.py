"""The cached FrozenBatchNorm2d: bitwise torchvision's output, fewer ops, never stale."""
from __future__ import annotations

import copy

import pytest
import torch
from torchvision.ops import FrozenBatchNorm2d as TorchvisionFrozenBatchNorm2d

from sparsedet.layers.frozen_batch_norm import FrozenBatchNorm2d
from sparsedet.models.backbones.mobilenet import MobileNetV2Body
from sparsedet.models.backbones.resnet import FrozenStatsBatchNorm2d, ResNetBody

pytestmark = pytest.mark.usefixtures("single_thread")


def random_state(channels: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"weight": torch.randn(channels, generator=g), "bias": torch.randn(channels, generator=g),
            "running_mean": torch.randn(channels, generator=g),
            "running_var": torch.rand(channels, generator=g) + 0.1}


def pair(channels: int = 8, seed: int = 0):
    ours, reference = FrozenBatchNorm2d(channels), TorchvisionFrozenBatchNorm2d(channels)
    state = random_state(channels, seed)
    ours.load_state_dict(state)
    reference.load_state_dict(state)
    return ours.eval(), reference.eval()


def count_ops(fn) -> int:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and
               (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def test_bitwise_equal_to_torchvision_and_cached():
    ours, reference = pair()
    x = torch.randn(2, 8, 5, 7)
    with torch.inference_mode():
        first, second, expected = ours(x), ours(x), reference(x)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert ours._affine_cache is not None
    with torch.inference_mode():
        assert count_ops(lambda: ours(x)) == 2          # mul + add on the map, nothing else
        assert count_ops(lambda: reference(x)) >= 9     # reshapes, rsqrt, ... every call


@pytest.mark.parametrize("change", ["load_state_dict", "inplace", "to_double", "reassign", "data_then_eval"])
def test_cache_follows_buffer_changes(change):
    ours, reference = pair()
    x = torch.randn(1, 8, 3, 3)
    with torch.no_grad():
        ours(x)                                       # fills the cache
        new = random_state(8, seed=1)
        if change == "load_state_dict":
            ours.load_state_dict(new)
            reference.load_state_dict(new)
        elif change == "inplace":
            ours.running_var.mul_(3.0)
            reference.running_var.mul_(3.0)
        elif change == "to_double":
            ours, reference, x = ours.double(), reference.double(), x.double()
        elif change == "reassign":
            ours.running_mean = new["running_mean"]
            reference.running_mean = new["running_mean"]
        else:  # .data edits bypass the version counter; eval() clears the cache
            ours.bias.data.add_(1.0)
            reference.bias.data.add_(1.0)
            ours.eval()
        assert torch.equal(ours(x), reference(x))


def test_training_mode_and_trainable_affine_never_use_the_cache():
    ours, reference = pair()
    x = torch.randn(1, 8, 3, 3)
    ours.train()
    assert torch.equal(ours(x), reference(x)) and ours._affine_cache is None

    bn = FrozenStatsBatchNorm2d(8)
    bn.load_state_dict(random_state(8, 2))
    optimizer = torch.optim.SGD(bn.parameters(), lr=0.5)
    for mode in (True, False):                      # gradients reach weight/bias in train and eval
        bn.train(mode)
        optimizer.zero_grad()
        bn(x).square().sum().backward()
        assert bn.weight.grad is not None and bn.weight.grad.abs().sum() > 0
        optimizer.step()
    bn.eval()
    with torch.no_grad():
        cached = bn(x)                               # cached from the updated parameters
        reference.load_state_dict(bn.state_dict())
        assert torch.equal(cached, reference(x))
        optimizer.zero_grad()
    bn(x).sum().backward()
    optimizer.step()                                 # in-place update bumps the version counter
    with torch.no_grad():
        reference.load_state_dict(bn.state_dict())
        assert torch.equal(bn(x), reference(x))


def test_cache_filled_in_inference_mode_serves_autograd_later():
    ours, reference = pair()
    with torch.inference_mode():
        ours(torch.randn(1, 8, 3, 3))
    x = torch.randn(1, 8, 3, 3, requires_grad=True)
    ours(x).sum().backward()                         # eval-mode forward with a gradient to the input
    x_ref = x.detach().clone().requires_grad_(True)
    reference(x_ref).sum().backward()
    assert torch.equal(x.grad, x_ref.grad)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated", "ignore:`torch.jit.trace_method` is deprecated")
def test_deepcopy_and_tracing():
    ours, reference = pair()
    x = torch.randn(1, 8, 4, 4)
    with torch.no_grad():
        ours(x)
        clone = copy.deepcopy(ours)
        clone.running_var.add_(1.0)
        reference.running_var.add_(1.0)
        assert torch.equal(clone(x), reference(x))
        traced = torch.jit.trace(ours, x)
        # The traced graph reads the buffers, not a frozen cached constant.
        assert "rsqrt" in str(traced.graph)


@pytest.mark.parametrize("body", ["mobilenet_v2", "resnet18"])
def test_backbone_eval_outputs_identical_to_torchvision_norm(body):
    torch.manual_seed(0)
    ours = MobileNetV2Body() if body == "mobilenet_v2" else ResNetBody(18)
    state = ours.state_dict()
    g = torch.Generator().manual_seed(3)
    for key, value in state.items():                 # non-trivial statistics everywhere
        if key.endswith("running_var"):
            value.copy_(torch.rand(value.shape, generator=g) + 0.5)
        elif key.endswith(("running_mean", "bias")) and value.dim() == 1:
            value.copy_(torch.randn(value.shape, generator=g) * 0.1)
    reference = copy.deepcopy(ours)
    for name, module in list(reference.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, FrozenBatchNorm2d):
                plain = TorchvisionFrozenBatchNorm2d(child.weight.shape[0], child.eps)
                plain.load_state_dict(child.state_dict())
                setattr(module, child_name, plain)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in reference.modules())
    x = torch.randn(1, 3, 64, 96)
    with torch.inference_mode():
        for _ in range(2):                           # the second pass runs from the cache
            out, expected = ours.eval()(x), reference.eval()(x)
            assert all(torch.equal(out[k], expected[k]) for k in expected)
