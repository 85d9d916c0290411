"""Ctrl-C during ``sparsedet demo``: a clean stop with exit 130 and a continue command that works
as printed, then the report's "continue training" command from another folder (issue 10, 1 and 3).

The demo runs on a shrunken data set (6 + 3 images of 96x96, 3 steps); the first run is a real
process that receives SIGINT from the test once its first step is logged."""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from sparsedet.cli import main

REPO = Path(__file__).resolve().parents[1]


def _first_step_logged(metrics: Path) -> bool:
    try:
        return any(json.loads(line).get("type") == "train" for line in metrics.read_text().splitlines())
    except (OSError, ValueError):
        return False


def _interrupted_demo(folder: Path) -> tuple[int, str, str]:
    """Starts the demo in ``folder``, sends SIGINT after its first training step; (rc, stdout, stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "sparsedet", "demo", "--output", "out", "--iterations", "3",
               "--num-train", "6", "--num-val", "3", "--image-size", "96"]
    with open(folder / "stdout.txt", "w") as out, open(folder / "stderr.txt", "w") as err:
        process = subprocess.Popen(command, cwd=folder, env=env, stdout=out, stderr=err)
        try:
            deadline = time.time() + 240
            while not _first_step_logged(folder / "out" / "train" / "metrics.jsonl"):
                assert process.poll() is None, (folder / "stderr.txt").read_text()[-3000:]
                assert time.time() < deadline, "the demo did not log its first step in 240 s"
                time.sleep(0.2)
            process.send_signal(signal.SIGINT)
            returncode = process.wait(timeout=240)
        finally:
            if process.poll() is None:
                process.kill()
    return returncode, (folder / "stdout.txt").read_text(), (folder / "stderr.txt").read_text()


def test_ctrl_c_in_demo_stops_cleanly_and_the_printed_commands_continue(tmp_path, monkeypatch, single_thread):
    returncode, stdout, stderr = _interrupted_demo(tmp_path)
    assert returncode == 130, stdout + stderr
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "saved out/train/last.pth" in stdout
    checkpoint = torch.load(tmp_path / "out" / "train" / "last.pth", weights_only=True)
    assert 1 <= checkpoint["iteration"] < 3
    printed = re.search(r"continue with: (.+)", stdout)
    assert printed, stdout

    # The continue command, run as printed from the same folder, finishes the demo.
    words = shlex.split(printed.group(1))
    assert words[:2] == ["sparsedet", "demo"] and "--resume" in words
    monkeypatch.chdir(tmp_path)
    assert main(words[1:]) == 0
    assert torch.load(tmp_path / "out" / "train" / "last.pth", weights_only=True)["iteration"] == 3
    report = (tmp_path / "out" / "report.md").read_text()
    assert re.search(r"speed-up [\d.]+x \(median of 5 interleaved rounds over 3 images; rounds ranged "
                     r"[\d.]+x-[\d.]+x", report), report
    assert "*Where Cascade Sparse Query computed" in report  # the CSQ figure's caption
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["speed_up"]["min"] <= metrics["speed_up"]["median"] <= metrics["speed_up"]["max"]
    saved = yaml.safe_load((tmp_path / "out" / "train" / "config.yaml").read_text())
    assert Path(saved["data"]["train"]["annotations"]).is_absolute()
    assert "depth" not in saved["model"]["backbone"] and "layout" not in saved["model"]["backbone"]

    # The report's "continue training" command works from any folder.
    train_command = re.search(r"^    (sparsedet train .+)$", report, re.MULTILINE)
    assert train_command, report
    words = shlex.split(train_command.group(1))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    words = [w if not w.startswith("solver.max_iter=") else "solver.max_iter=4" for w in words]
    assert main(words[1:] + ["--no-progress"]) == 0
    assert torch.load(tmp_path / "out" / "train" / "last.pth", weights_only=True)["iteration"] == 4
