"""One timing harness for ``sparsedet bench`` and the ``benchmarks/`` scripts.

``benchmark(candidates, warmup, runs)`` runs every candidate ``warmup`` times, then ``runs`` times
interleaved (candidate A, B, C, A, B, C, ...: drift in the machine's load hits all alike), and
returns per candidate the wall times, process CPU times, peak memory and the per-part breakdown.

Per-part breakdown. A candidate declares its parts as an ordered list of ``Part(name, modules)``.
Forward hooks (which only read the clock) stamp the end of each module's last call in a run; part i
lasts from the end of part i-1 (the start of the run for the first) to its own end, and whatever
follows the last part is ``post-processing``. The parts therefore partition the run's wall time:
the time between two declared modules (e.g. building proposal boxes) counts to the later part.
``Measure``s are optional sub-totals (the summed time inside some modules, e.g. the RoIAlign
pooler), printed as "of which" lines.

Training steps (not under ``inference_mode``): ``timed_functions`` wraps plain functions or methods
(e.g. a matching routine) to add up their wall time, and ``training_step_times`` times a step
callable after warm-up and reads those totals per step, for "share of a training step" figures.

Declaring parts for a new model: give the detector a ``benchmark_parts()`` method returning
``[("backbone+FPN", [self.backbone]), ("head", [self.head]), ("selection", [...]), ...]`` in
execution order (post-processing is implicit); without one, ``default_parts`` uses the common
attributes ``preprocess``, ``backbone``, ``head`` / ``query_head`` / ``rpn_head`` / ``roi_heads``.
"""
from __future__ import annotations

import contextlib
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

POSTPROCESS = "post-processing"


# ------------------------------------------------------------------ clock and machine


class Clock:
    """Wall clock (``time.perf_counter``) that synchronises CUDA before reading the time."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def add_timing_arguments(parser, runs: int = 3, warmup: int = 1) -> None:
    """The options every timing script shares: ``--threads``, ``--device``, ``--runs``, ``--warmup``."""
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--runs", type=int, default=runs, help=f"timed interleaved runs per model (default {runs})")
    parser.add_argument("--warmup", type=int, default=warmup, help=f"warm-up runs per model (default {warmup})")


def script_device(args) -> Optional[torch.device]:
    """A timing script's device from ``args.device`` with ``args.threads`` set; ``None`` after one
    error line on stderr when CUDA is asked for and missing (the script then exits 2)."""
    try:
        device = check_device(args.device)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return None
    torch.set_num_threads(args.threads)
    return device


def check_device(device: str) -> torch.device:
    """``torch.device(device)``; raises ``ValueError`` (one line) for CUDA on a machine without it."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__}, "
                         f"built {'with' if torch.backends.cuda.is_built() else 'without'} CUDA); use --device cpu")
    return dev


def load_average() -> str:
    """1/5/15-minute load averages from /proc/loadavg, or '' when unavailable."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return ""


def busy_fraction(seconds: float = 1.0) -> Optional[float]:
    """Share of all CPUs' time spent non-idle over ``seconds`` (from /proc/stat), or None."""
    def read():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return sum(values), idle
    try:
        total0, idle0 = read()
        time.sleep(seconds)
        total1, idle1 = read()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def warn_if_busy() -> None:
    """Prints the load and warns when other processes already keep the CPUs busy."""
    load = load_average()
    busy = busy_fraction()
    if load:
        print(f"load average (1/5/15 min): {load}")
    if busy is None:
        return
    print(f"CPU busy before start (1 s sample, all CPUs): {100 * busy:.0f} %")
    if busy > 0.25:
        hint = ("" if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE" else
                "; rerun with OMP_WAIT_POLICY=PASSIVE (spinning OpenMP threads make every small op wait)")
        print("WARNING: other processes keep the machine busy: wall times are inflated and noisy; "
              f"compare the min/min and CPU-time ratios too{hint}")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_header(device: torch.device) -> str:
    import torchvision

    lines = [f"torch {torch.__version__}, torchvision {torchvision.__version__}, python {platform.python_version()}",
             f"threads: {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}",
             f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs visible)",
             f"device: {'cuda (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else 'cpu'}"]
    return "\n".join(lines)


def parse_size(text: str) -> tuple[int, int]:
    """``"800x1216"`` -> (800, 1216); raises ``ValueError`` naming the text."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"image size {text!r} is not HxW, e.g. 800x1216") from None
    if h < 1 or w < 1:
        raise ValueError(f"image size {text!r} must be positive")
    return h, w


def random_image(size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """(3, H, W) RGB float image in 0-255 (integer values, like a decoded JPEG)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, *size), generator=g).float()


# ------------------------------------------------------------------ peak memory


class PeakMemory:
    """Peak memory of one timed call: CUDA max allocated, or the process's peak resident set size
    (Linux: VmHWM, reset through /proc/self/clear_refs; elsewhere the lifetime maximum)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def reset(self) -> int:
        """Starts a new peak; returns the memory in use now (bytes), the baseline of the call."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        return self._status("VmRSS:") or 0

    def read(self) -> int:
        """Bytes."""
        if self.cuda:
            return torch.cuda.max_memory_allocated()
        peak = self._status("VmHWM:")
        if peak is None:
            import resource
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return peak

    @staticmethod
    def _status(key: str) -> Optional[int]:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(key):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None


# ------------------------------------------------------------------ parts


@dataclass
class Part:
    """A stage of a model's forward that ends when the last call of any of ``modules`` returns."""

    name: str
    modules: Sequence[nn.Module]


@dataclass
class Measure:
    """A sub-total: the summed time spent inside ``modules`` (an "of which" line)."""

    name: str
    modules: Sequence[nn.Module]


def default_parts(model: nn.Module) -> list[Part]:
    """The model's own ``benchmark_parts()`` when it has one, else preprocess / backbone+FPN / head
    from the usual attribute names (sparsedet detectors and torchvision's detection models)."""
    if hasattr(model, "benchmark_parts"):
        return [Part(name, list(modules)) for name, modules in model.benchmark_parts()]
    parts = []
    pre = getattr(model, "preprocess", None) or getattr(model, "transform", None)
    if isinstance(pre, nn.Module):
        parts.append(Part("preprocess", [pre]))
    if isinstance(getattr(model, "backbone", None), nn.Module):
        parts.append(Part("backbone+FPN", [model.backbone]))
    head = [getattr(model, name) for name in ("rpn_head", "rpn", "head", "query_head", "roi_heads")
            if isinstance(getattr(model, name, None), nn.Module)]
    if head:
        parts.append(Part("head", head))
    return parts


class _PartClock:
    """Forward hooks on the parts' modules (and their direct children, which catches towers called
    without their parent's ``forward``): end stamps per part and inside-time per measure."""

    def __init__(self, parts: Sequence[Part], measures: Sequence[Measure], clock: Clock):
        self.parts, self.measures, self.clock = list(parts), list(measures), clock
        self.ends: dict[str, float] = {}
        self.inside: dict[str, float] = {}
        self.handles = []
        for part in self.parts:
            for module in _with_children(part.modules):
                self.handles.append(module.register_forward_hook(self._end_hook(part.name)))
        for measure in self.measures:
            for module in measure.modules:
                starts = []
                self.handles.append(module.register_forward_pre_hook(lambda _m, _i, s=starts: s.append(self.clock())))
                self.handles.append(module.register_forward_hook(self._inside_hook(measure.name, starts)))

    def _end_hook(self, name):
        def hook(_module, _inputs, _output):
            self.ends[name] = self.clock()
        return hook

    def _inside_hook(self, name, starts):
        def hook(_module, _inputs, _output):
            self.inside[name] = self.inside.get(name, 0.0) + self.clock() - starts.pop()
        return hook

    def reset(self) -> None:
        self.ends.clear()
        self.inside.clear()

    def split(self, start: float, end: float) -> dict[str, float]:
        """Durations of the parts then ``post-processing``; they sum to ``end - start``."""
        out, previous = {}, start
        for part in self.parts:
            stamp = min(max(self.ends.get(part.name, previous), previous), end)
            out[part.name] = stamp - previous
            previous = stamp
        out[POSTPROCESS] = end - previous
        out.update(self.inside)
        return out

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _with_children(modules: Sequence[nn.Module]) -> list[nn.Module]:
    seen, out = set(), []
    for module in modules:
        for m in (module, *module.children()):
            if id(m) not in seen:
                seen.add(id(m))
                out.append(m)
    return out


# ------------------------------------------------------------------ the harness


@dataclass
class Candidate:
    """One thing to time: ``call()`` processes ``images`` images (one batch or several)."""

    name: str
    call: Callable[[], Any]
    images: int = 1
    parts: Sequence[Part] = ()
    measures: Sequence[Measure] = ()


@dataclass
class Result:
    name: str
    images: int
    times: list[float] = field(default_factory=list)        # wall seconds per run
    cpu_times: list[float] = field(default_factory=list)    # process CPU seconds per run
    parts: dict[str, list[float]] = field(default_factory=dict)
    peak_memory: int = 0                                    # bytes, max over the timed runs
    peak_increase: int = 0                                  # bytes: peak minus the memory in use before the call
    measure_names: set = field(default_factory=set)         # keys of ``parts`` that are "of which" sub-totals

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def max(self) -> float:
        return max(self.times)

    @property
    def images_per_s(self) -> float:
        return self.images / self.median

    def part_medians(self) -> dict[str, float]:
        return {name: statistics.median(values) for name, values in self.parts.items()}


def benchmark(candidates: Sequence[Candidate], warmup: int = 1, runs: int = 5,
              device: torch.device | str = "cpu", progress: Optional[Callable[[str], None]] = None,
              clock: Optional[Callable[[], float]] = None) -> list[Result]:
    """Warm-up, then ``runs`` interleaved timed runs of every candidate (see the module docstring).
    Calls run under ``torch.inference_mode()``. ``clock``: seconds now (default ``Clock(device)``)."""
    if runs < 1 or warmup < 0:
        raise ValueError(f"need runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    device = torch.device(device)
    clock, memory = clock or Clock(device), PeakMemory(device)
    timers = [_PartClock(c.parts, c.measures, clock) for c in candidates]
    results = [Result(c.name, c.images, measure_names={m.name for m in c.measures}) for c in candidates]
    try:
        with torch.inference_mode():
            for c in candidates:
                for _ in range(warmup):
                    c.call()
            for run in range(runs):
                if progress:
                    progress(f"run {run + 1}/{runs}")
                for c, timer, result in zip(candidates, timers, results):
                    timer.reset()
                    baseline = memory.reset()
                    cpu_start = time.process_time()
                    start = clock()
                    c.call()
                    end = clock()
                    result.cpu_times.append(time.process_time() - cpu_start)
                    result.times.append(end - start)
                    peak = memory.read()
                    result.peak_memory = max(result.peak_memory, peak)
                    result.peak_increase = max(result.peak_increase, peak - baseline)
                    if c.parts or c.measures:
                        for name, seconds in timer.split(start, end).items():
                            result.parts.setdefault(name, []).append(seconds)
    finally:
        for timer in timers:
            timer.remove()
    return results


def median_times(fns: dict[str, Callable[[], object]], warmup: int, runs: int,
                 device: torch.device | str = "cpu") -> dict[str, list[float]]:
    """``benchmark`` of plain functions: name -> wall seconds per timed run."""
    results = benchmark([Candidate(name, fn) for name, fn in fns.items()], warmup, runs, device)
    return {r.name: r.times for r in results}


# ------------------------------------------------------------------ training steps


@contextlib.contextmanager
def timed_functions(targets: Mapping[str, Sequence[tuple[Any, str]]],
                    clock: Optional[Callable[[], float]] = None) -> Iterator[dict[str, float]]:
    """Adds up the wall time of functions while the block runs.

    ``targets`` maps a name to ``(owner, attribute)`` pairs: a module whose global function the
    caller looks up at call time (``(sparsedet.models.tsp.fcos_losses, "restricted_match")``) or a
    class whose method is wrapped (``(TSPFCOS, "_assign")``). Yields ``totals``: name -> seconds
    summed over every call of its functions (``totals.clear()`` starts a new count); the original
    attributes are restored on exit. Wrap functions that do not call each other, or the time counts twice.
    """
    clock = clock or Clock()
    totals: dict[str, float] = {}
    originals = []

    def wrap(name, function):
        def timed(*args, **kwargs):
            start = clock()
            try:
                return function(*args, **kwargs)
            finally:
                totals[name] = totals.get(name, 0.0) + clock() - start
        return timed

    try:
        for name, pairs in targets.items():
            for owner, attribute in pairs:
                function = owner.__dict__[attribute] if isinstance(owner, type) else getattr(owner, attribute)
                originals.append((owner, attribute, function))
                setattr(owner, attribute, wrap(name, getattr(owner, attribute)))
        yield totals
    finally:
        for owner, attribute, function in reversed(originals):
            setattr(owner, attribute, function)


def training_step_times(step: Callable[[], Any], totals: dict[str, float], warmup: int = 1, runs: int = 3,
                        clock: Optional[Callable[[], float]] = None) -> list[tuple[float, dict[str, float]]]:
    """Runs ``step`` ``warmup`` times, then ``runs`` timed times; per timed step (wall seconds, a copy
    of ``totals`` accumulated during it), ``totals`` being the dict ``timed_functions`` yields."""
    if runs < 1 or warmup < 0:
        raise ValueError(f"need runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    clock = clock or Clock()
    out = []
    for i in range(warmup + runs):
        totals.clear()
        start = clock()
        step()
        seconds = clock() - start
        if i >= warmup:
            out.append((seconds, dict(totals)))
    return out


# ------------------------------------------------------------------ report


def format_results(results: Sequence[Result], title: str = "") -> str:
    """The comparison table (ratios against the first result) and each breakdown, as text."""
    base = results[0]
    lines = [title] if title else []
    width = max(12, *(len(r.name) for r in results))
    header = (f"{'model':<{width}} | {'median ms':>9} | {'min ms':>8} | {'max ms':>8} | {'img/s':>6} | "
              f"{'peak MB':>7} | {'+MB':>5} | {'ratio':>5} | {'min/min':>7} | {'CPU-time':>8}")
    lines += [header, "-" * len(header)]
    for r in results:
        lines.append(f"{r.name:<{width}} | {1000 * r.median:9.1f} | {1000 * r.min:8.1f} | {1000 * r.max:8.1f} | "
                     f"{r.images_per_s:6.2f} | {r.peak_memory / 2 ** 20:7.0f} | {r.peak_increase / 2 ** 20:5.0f} | {r.median / base.median:5.2f} | "
                     f"{r.min / base.min:7.2f} | "
                     f"{statistics.median(r.cpu_times) / max(statistics.median(base.cpu_times), 1e-9):8.2f}")
    lines.append(f"(median of {len(base.times)} interleaved runs; ratio = median / median of the first row; "
                 "min/min and CPU-time ratios are less sensitive to other load on the machine; peak MB: process "
                 "peak RSS (CUDA: max allocated) during the call, +MB: above the memory in use before it)")
    for r in results:
        if not r.parts:
            continue
        medians = r.part_medians()
        lines.append(f"\nbreakdown of {r.name} (median ms per part; {POSTPROCESS} = after the last part):")
        for name, seconds in medians.items():
            label = f"  of which {name}" if name in r.measure_names else name
            lines.append(f"  {label:<36} {1000 * seconds:9.1f}  {100 * seconds / r.median:5.1f} %")
        parts_total = sum(v for k, v in medians.items() if k not in r.measure_names)
        lines.append(f"  {'sum of parts (median total ' + format(1000 * r.median, '.1f') + ')':<36} "
                     f"{1000 * parts_total:9.1f}  {100 * parts_total / r.median:5.1f} %")
    return "\n".join(lines)


# ------------------------------------------------------------------ models by name (sparsedet bench)

# torchvision baselines, random init (weights=None): the cost does not depend on the weights.
TV_BASELINES = ("fasterrcnn_resnet50_fpn", "retinanet_resnet50_fpn", "fcos_resnet50_fpn")
WEIGHT_SUFFIXES = (".pth", ".pt", ".pkl")


def load_detector(spec: str, overrides: Sequence[str] = (), device: torch.device | str = "cpu") -> nn.Module:
    """An eval-mode model from ``spec``: ``tv:NAME`` (a torchvision baseline, see ``TV_BASELINES``),
    a weights file (``sparsedet.load``), or a config name / YAML path (random init)."""
    if spec.startswith("tv:"):
        name = spec[3:]
        if name not in TV_BASELINES:
            raise ValueError(f"unknown torchvision baseline {spec!r}: choose tv:{', tv:'.join(TV_BASELINES)}")
        import torchvision.models.detection as tv
        model = getattr(tv, name)(weights=None, weights_backbone=None)
        model.bench_name = spec
        return model.eval().to(device)
    from .inference import load
    from .models import build_model

    if spec.endswith(WEIGHT_SUFFIXES):
        model = load(spec, overrides=list(overrides), device=device)
    else:
        model = build_model(spec, list(overrides)).eval().to(device)
    model.bench_name = spec
    return model


def is_torchvision(model: nn.Module) -> bool:
    return getattr(model, "bench_name", "").startswith("tv:")


def model_candidate(model: nn.Module, batches: Sequence[Sequence[torch.Tensor]], name: Optional[str] = None) -> Candidate:
    """Times ``model`` over all ``batches`` (lists of RGB 0-255 (3, H, W) tensors) per run.

    torchvision baselines get the same pixels divided by 255 (converted once, outside the timer)
    and a transform whose min/max size equal the batch's sides, so they do not resize (scale 1.0).
    """
    name = name or getattr(model, "bench_name", type(model).__name__)
    if is_torchvision(model):
        scaled = [[image / 255.0 for image in batch] for batch in batches]
        sides = [(min(min(im.shape[-2:]) for im in b), max(max(im.shape[-2:]) for im in b)) for b in batches]

        def call():
            for batch, (short, long) in zip(scaled, sides):
                model.transform.min_size, model.transform.max_size = (short,), long
                model(batch)
    else:
        def call():
            for batch in batches:
                model(list(batch))
    return Candidate(name, call, sum(len(b) for b in batches), default_parts(model))


def onnx_candidate(model: nn.Module, batches: Sequence[Sequence[torch.Tensor]], folder, threads: Optional[int],
                   name: Optional[str] = None) -> Candidate:
    """Exports ``model`` (the batch size of ``batches``; dynamic H, W only when the batches hold
    several image sizes) into ``folder`` and times it in onnxruntime on the same inputs."""
    from pathlib import Path

    from .export import export_onnx, onnx_session

    if is_torchvision(model):
        raise ValueError(f"--onnx exports sparsedet models only, not {model.bench_name}")
    sizes = {len(b) for b in batches}
    if len(sizes) != 1 or any(len({tuple(im.shape) for im in b}) != 1 for b in batches):
        raise ValueError("--onnx needs batches of one size and equal-size images within a batch "
                         "(use --sizes, or --batch 1 with --images)")
    first = batches[0][0]
    base = getattr(model, "bench_name", "model").replace("/", "_").replace(":", "_")
    dynamic = len({tuple(im.shape) for b in batches for im in b}) > 1
    path = export_onnx(model.cpu(), Path(folder) / f"{Path(base).stem}.onnx", image_size=tuple(first.shape[-2:]),
                       dynamic=dynamic, batch_size=sizes.pop())
    session = onnx_session(path, threads)
    arrays = [torch.stack([im.cpu() for im in b]).numpy() for b in batches]

    def call():
        for array in arrays:
            session.run(None, {"images": array})
    csq = getattr(getattr(getattr(model, "cfg", None), "csq", None), "enabled", False)
    suffix = " (onnxruntime, dense: CSQ is not exported)" if csq else " (onnxruntime)"
    return Candidate(name or getattr(model, "bench_name", "model") + suffix, call, sum(len(b) for b in batches))


def test_scale(model: nn.Module) -> tuple[int, int]:
    """(short side, max long side) of the model's test-time resize (torchvision default 800, 1333)."""
    inp = (getattr(model, "config", None) or {}).get("input", {})
    return int(inp.get("min_size_test", 800)), int(inp.get("max_size_test", 1333))
