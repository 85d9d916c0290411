"""Kill test (issue 9): a training run killed with SIGKILL at random moments, once in the middle of
a checkpoint write, and resumed each time, ends with exactly the losses and weights of an
uninterrupted run; last.pth is readable after every kill, and the temporary file of the killed
write is removed by the next run."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from sparsedet.data.synthetic import write_synthetic_coco
from sparsedet.engine.trainer import Trainer

from test_reliability import tiny_config

REPO = Path(__file__).resolve().parents[1]
MAX_ITER = 6


def _losses(output: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r["total_loss"] for r in rows if r["type"] == "train"}


def _start(config: Path, output: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "sparsedet", "train", str(config), "--output", str(output), "--no-progress"]
    if (output / "last.pth").is_file():
        argv.append("--resume")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_when(proc: subprocess.Popen, condition, timeout: float) -> bool:
    """SIGKILLs ``proc`` as soon as ``condition()`` holds; False if it ended first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if condition():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    return False


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path, single_thread):
    data = write_synthetic_coco(tmp_path / "data", num_train=8, num_val=4, seed=0, height=96, width=128)
    config = tiny_config(data, val=False, max_iter=MAX_ITER, checkpoint_period=1, base_lr=1e-3, warmup_iters=2)
    Trainer(config, tmp_path / "straight", progress=False).train()
    straight = _losses(tmp_path / "straight")

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "killed"
    rng = random.Random(0)
    temporaries = lambda: list(out.glob(".last.pth.*.tmp"))  # noqa: E731
    kills = []
    finished = False
    # First kill: in the middle of a checkpoint write (its temporary file exists); then two at
    # random moments after the process starts (start-up, data reading, a step or a save).
    for delay in (None, rng.uniform(2.0, 10.0), rng.uniform(2.0, 10.0)):
        proc = _start(path, out)
        started = time.monotonic()
        if delay is None:
            what, condition = "during a checkpoint write", lambda: bool(temporaries())
        else:
            what, condition = f"{delay:.1f} s after start", lambda: time.monotonic() - started > delay
        if _kill_when(proc, condition, timeout=300):
            kills.append(what)
            if delay is None:
                assert temporaries(), "the kill during the write left no temporary file to clean up"
            if (out / "last.pth").is_file():  # never a truncated file
                assert torch.load(out / "last.pth", weights_only=True)["iteration"] >= 1
        else:
            assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
            finished = True
            break
    assert kills and kills[0] == "during a checkpoint write"
    if not finished:  # the last start was killed too: one more resume runs to the end
        proc = _start(path, out)
        assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-2000:]
    assert not temporaries()

    resumed = _losses(out)
    assert sorted(resumed) == sorted(straight) == list(range(1, MAX_ITER + 1))
    assert resumed == straight, (kills, resumed, straight)
    a = torch.load(tmp_path / "straight" / "last.pth", weights_only=True)["model"]
    b = torch.load(out / "last.pth", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
