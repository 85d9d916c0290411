"""The shared timing harness (``sparsedet.benchmark``) and ``sparsedet bench``."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsedet.benchmark import (POSTPROCESS, Candidate, Measure, Part, benchmark, check_device, default_parts,
                                 format_results, median_times, model_candidate, parse_size, timed_functions,
                                 training_step_times)
from sparsedet.models import build_model


class VirtualClock:
    """A clock that only moves when a ``Sleep`` module says so: exact, whatever the machine's load."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Sleep(nn.Module):
    def __init__(self, clock, seconds):
        super().__init__()
        self.clock, self.seconds = clock, seconds

    def forward(self, x):
        self.clock.now += self.seconds
        return x


class Staged(nn.Module):
    """Known stage durations: preprocess 10 ms, backbone 30 ms, head 2 x 10 ms, then 15 ms after."""

    def __init__(self, clock):
        super().__init__()
        self.clock = clock
        self.preprocess, self.backbone, self.head = Sleep(clock, 0.01), Sleep(clock, 0.03), Sleep(clock, 0.01)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        x = self.head(self.head(self.backbone(self.preprocess(x))))
        self.clock.now += 0.015
        return x


def test_parts_partition_the_run_and_match_known_durations():
    clock = VirtualClock()
    model = Staged(clock)
    parts = default_parts(model)
    assert [p.name for p in parts] == ["preprocess", "backbone+FPN", "head"]
    (result,) = benchmark([Candidate("staged", lambda: model(0), 2, parts, [Measure("head calls", [model.head])])],
                          warmup=2, runs=4, clock=clock)
    assert model.calls == 6 and len(result.times) == 4 and len(result.cpu_times) == 4
    medians = result.part_medians()
    for name, expected in [("preprocess", 0.01), ("backbone+FPN", 0.03), ("head", 0.02), (POSTPROCESS, 0.015),
                           ("head calls", 0.02)]:
        assert medians[name] == pytest.approx(expected, abs=1e-9), name
    assert result.median == pytest.approx(0.075, abs=1e-9)
    for run in range(4):  # the parts (not the "of which" measure) sum to each run's wall time
        total = sum(result.parts[name][run] for name in ("preprocess", "backbone+FPN", "head", POSTPROCESS))
        assert total == pytest.approx(result.times[run], rel=1e-9)
    assert result.images_per_s == pytest.approx(2 / 0.075)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())  # hooks removed


def test_tiny_detector_runs_counted_ratios_and_breakdown(single_thread):
    torch.manual_seed(0)
    cfg = {"name": "retinanet", "num_classes": 3, "backbone": {"depth": 18, "weights": None},
           "fpn": {"channels": 16}, "head": {"num_convs": 1}}
    model = build_model({"model": cfg}).eval()
    other = build_model({"model": {**cfg, "fpn": {"channels": 32}}}).eval()
    calls = {"n": 0}
    model.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    batches = [[torch.rand(3, 64, 96) * 255, torch.rand(3, 64, 96) * 255]]
    results = benchmark([model_candidate(model, batches, "a"), model_candidate(other, batches, "b")],
                        warmup=1, runs=5)
    assert calls["n"] == 6
    a, b = results
    assert a.images == 2 and len(a.times) == len(b.times) == 5
    assert a.min <= a.median <= a.max and a.peak_memory > 0
    parts = a.part_medians()
    assert list(parts) == ["preprocess", "backbone+FPN", "head", POSTPROCESS]
    assert sum(parts.values()) == pytest.approx(a.median, rel=0.05)
    text = format_results(results)
    ratio_line = [line for line in text.splitlines() if line.startswith("b ")][0]
    assert f"{b.median / a.median:5.2f}" in ratio_line
    assert "sum of parts" in text


def test_median_times_interleaves_and_counts():
    order = []
    times = median_times({"x": lambda: order.append("x"), "y": lambda: order.append("y")}, warmup=1, runs=3)
    assert order == ["x", "y"] + ["x", "y"] * 3
    assert len(times["x"]) == len(times["y"]) == 3


def test_bad_inputs():
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            check_device("cuda")
    with pytest.raises(ValueError, match="is not HxW"):
        parse_size("800")
    with pytest.raises(ValueError, match="runs >= 1"):
        benchmark([], runs=0)


def test_cli_bench_compare(capsys, single_thread):
    from sparsedet.cli import main

    tiny = ["model.backbone.depth=18", "model.backbone.weights=null", "model.fpn.channels=16",
            "model.head.num_convs=1", "model.backbone.layout=torchvision"]
    assert main(["bench", "retinanet/r50_fpn_1x_coco", *tiny, "--sizes", "64x96", "--runs", "2", "--warmup", "0",
                 "--compare", "retinanet/mobilenetv2_fpn_cpu"]) == 0
    out = capsys.readouterr().out
    assert "=== 64x96, batch 1" in out and "retinanet/mobilenetv2_fpn_cpu" in out and "breakdown of" in out
    if not torch.cuda.is_available():
        assert main(["bench", "retinanet/r50_fpn_1x_coco", "--device", "cuda"]) == 2  # wrong device: exit 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "no CUDA device is visible" in err


def test_cli_bench_onnx(capsys, single_thread):
    from sparsedet.cli import main

    tiny = ["model.backbone.depth=18", "model.backbone.weights=null", "model.fpn.channels=16",
            "model.head.num_convs=1", "model.backbone.layout=torchvision"]
    assert main(["bench", "retinanet/r50_fpn_1x_coco", *tiny, "--sizes", "64x96", "--runs", "1", "--warmup", "1",
                 "--onnx", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "retinanet/r50_fpn_1x_coco (onnxruntime)" in out


# ---------------------------------------------------------------- benchmark_parts of TSP and ASAG

TINY_TSP_FCOS = ["model.backbone.weights=null", "model.num_classes=5", "model.fpn.channels=32",
                 "model.head.num_groups=8", "model.transformer.d_model=32", "model.transformer.nhead=2",
                 "model.transformer.dim_feedforward=64", "model.transformer.num_layers=2", "model.foi.num_foi=50"]
TINY_TSP_RCNN = ["model.backbone.depth=18", "model.backbone.layout=torchvision", "model.fpn.channels=32",
                 "model.num_classes=5", "model.rpn.pre_nms_topk_test=200", "model.rpn.num_proposals=40",
                 "model.roi_heads.d_model=64", "model.roi_heads.num_heads=4", "model.roi_heads.num_layers=1",
                 "model.roi_heads.dim_feedforward=64"]
TINY_ASAG = ["model.backbone.depth=18", "model.hidden_dim=64", "model.fpn.channels=64", "model.dim_feedforward=128",
             "model.anchors.compress_hidden=8", "model.num_classes=3", "model.num_heads_decoder=1",
             "model.test_head=main"]
PARTS = {
    "tsp_fcos": ("tsp_fcos/mobilenetv2_fpn_cpu", TINY_TSP_FCOS,
                 ["preprocess", "backbone+FPN", "head (FCOS head)", "selection (FoI top-k, gather, projection)",
                  "encoder (transformer)"]),
    "tsp_rcnn": ("tsp_rcnn/r50_fpn_3x", TINY_TSP_RCNN,
                 ["preprocess", "backbone+FPN", "head (RPN head)", "selection (proposals + RoI pooling)",
                  "encoder (projection + transformer)"]),
    "asag_s_fast": ("asag/s_r50_fpn_100q_3x", TINY_ASAG + ["model.fast_inference=true"],
                    ["preprocess", "backbone+FPN", "selection (anchor generator)", "RelationBlock",
                     "decoder (one layer)"]),
    "asag_a": ("asag/a_r50_fpn_100q_1x", TINY_ASAG,
               ["preprocess", "backbone+FPN", "selection (anchor generator)", "RelationBlock", "decoder (one layer)"]),
}


@pytest.mark.parametrize("key", list(PARTS))
def test_benchmark_parts_of_tsp_and_asag(key, single_thread):
    """Every declared part fires in an inference call (non-zero duration: a part whose modules never
    ran would get exactly 0), the names are the declared ones in order, and the parts partition the run."""
    config, overrides, names = PARTS[key]
    torch.manual_seed(0)
    model = build_model(config, overrides).eval()
    assert [name for name, _ in model.benchmark_parts()] == names
    assert all(isinstance(m, nn.Module) for _, modules in model.benchmark_parts() for m in modules)
    g = torch.Generator().manual_seed(1)
    batches = [[torch.rand(3, 128, 160, generator=g) * 255]]
    (result,) = benchmark([model_candidate(model, batches, key)], warmup=1, runs=3)
    medians = result.part_medians()
    assert list(medians) == names + [POSTPROCESS]
    assert all(medians[name] > 0 for name in names), medians
    # Each run's parts sum to its wall time (the sum of the part medians need not equal the median
    # total on a loaded machine, so the check is per run).
    for run in range(3):
        assert sum(result.parts[name][run] for name in medians) == pytest.approx(result.times[run], rel=0.05)
    if key.startswith("asag"):
        assert model.last_anchors.valid.sum() > 0


def test_timed_functions_add_up_and_restore():
    """``timed_functions`` sums the time inside wrapped module functions and class methods and puts
    the originals back; ``training_step_times`` reads the totals per timed step after the warm-up."""
    import types

    clock = VirtualClock()
    module = types.SimpleNamespace(match=lambda seconds: setattr(clock, "now", clock.now + seconds) or "matched")

    class Model:
        def assign(self):
            clock.now += 0.5

    original_match, original_assign = module.match, Model.__dict__["assign"]
    model = Model()

    def step():
        clock.now += 1.0                    # the rest of the step
        assert module.match(0.25) == "matched"
        module.match(0.25)
        model.assign()

    with timed_functions({"matching": [(module, "match")], "assignment": [(Model, "assign")]}, clock) as totals:
        steps = training_step_times(step, totals, warmup=2, runs=3, clock=clock)
    assert len(steps) == 3
    for seconds, inside in steps:
        assert seconds == pytest.approx(2.0)
        assert inside == pytest.approx({"matching": 0.5, "assignment": 0.5})
    assert module.match is original_match and Model.__dict__["assign"] is original_assign
    with pytest.raises(ValueError, match="runs"):
        training_step_times(step, {}, runs=0)
