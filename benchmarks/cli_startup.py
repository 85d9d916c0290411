"""How long the command line takes to answer ``--help``, ``--version`` and ``configs``.

Each command runs as a fresh ``python -m sparsedet ...`` process; its wall time is compared with
``python -c pass`` (the interpreter's own start-up), timed interleaved with it run by run so that
background load hits both alike. Prints the median, min and max over ``--runs`` runs, the ratio of
medians, and the peak memory of the process (``ru_maxrss``). Target: under 1 s each.

    python benchmarks/cli_startup.py                 # 7 runs of each command
    python benchmarks/cli_startup.py --runs 15 --commands="--help,train --help"

A benchmark, not a test: start-up time depends on the machine and its load.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
DEFAULT_COMMANDS = ["--help", "--version", "configs", "train --help", "convert --help"]
TARGET_SECONDS = 1.0


def _time_process(arguments: list[str], env: dict) -> float:
    """Wall seconds of one child process."""
    begin = time.perf_counter()
    result = subprocess.run(arguments, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - begin
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(arguments)} failed ({result.returncode}): {result.stderr[-500:]}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7, help="timed runs per command (default: %(default)s)")
    parser.add_argument("--commands", default=",".join(DEFAULT_COMMANDS),
                        help="comma-separated sparsedet argument strings to time; write it as "
                             "--commands=... since they start with '-' (default: %(default)s)")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    baseline_cmd = [sys.executable, "-c", "pass"]
    commands = {text: [sys.executable, "-m", "sparsedet", *text.split()] for text in args.commands.split(",")}
    for arguments in [baseline_cmd, *commands.values()]:  # warm the file cache once
        _time_process(arguments, env)
    times: dict[str, list[float]] = {"python -c pass": [], **{text: [] for text in commands}}
    for _ in range(args.runs):
        times["python -c pass"].append(_time_process(baseline_cmd, env))
        for text, arguments in commands.items():
            times[text].append(_time_process(arguments, env))
    # Peak memory separately, one helper process each (children's ru_maxrss is a running maximum).
    memory = {text: _peak_memory_kib(arguments, env) for text, arguments in commands.items()}

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {load:.2f}, {args.runs} runs each")
    baseline = statistics.median(times["python -c pass"])
    print(f"{'command':<22} {'median s':>9} {'min s':>7} {'max s':>7} {'x python':>9} {'peak MiB':>9}  target")
    print(f"{'python -c pass':<22} {baseline:9.3f} {min(times['python -c pass']):7.3f} "
          f"{max(times['python -c pass']):7.3f} {1.0:9.1f} {'':>9}")
    failed = False
    for text in commands:
        median = statistics.median(times[text])
        verdict = "PASS" if median < TARGET_SECONDS else "over 1 s"
        failed |= median >= TARGET_SECONDS and text in ("--help", "--version", "configs")
        print(f"{'sparsedet ' + text:<22} {median:9.3f} {min(times[text]):7.3f} {max(times[text]):7.3f} "
              f"{median / baseline:9.1f} {memory[text] / 1024:9.0f}  {verdict}")
    return 1 if failed else 0


def _peak_memory_kib(arguments: list[str], env: dict) -> int:
    """Peak resident memory of one run, measured in a fresh helper process (whose children's
    maximum is then this command's alone)."""
    code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, *arguments], env=env, capture_output=True, text=True)
    return int(out.stdout.strip() or 0)


if __name__ == "__main__":
    sys.exit(main())
