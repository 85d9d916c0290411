"""The hostile-input suite (issue 9): every broken image, annotation file, checkpoint (a pickle
that would run code included), config, device and output folder that ``hostile_inputs.py`` builds
at test time goes through the command line; each must end with the expected exit code and one
line ``sparsedet <command>: error: <message>`` (no traceback), run no code, and write nothing
outside its run folder."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from hostile_inputs import build_cases
from sparsedet.cli import main


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def test_every_hostile_input_is_one_line_and_an_exit_code(tmp_path, monkeypatch, capsys, single_thread):
    monkeypatch.delenv("SPARSEDET_DEBUG", raising=False)
    inputs, sandbox = tmp_path / "inputs", tmp_path / "sandbox"
    cases = build_cases(inputs)
    sandbox.mkdir()
    monkeypatch.chdir(sandbox)  # default outputs (runs/, outputs/) would land here
    failures = []
    for number, case in enumerate(cases):
        if case.kind == "device" and torch.cuda.is_available():
            continue
        run = sandbox / f"run{number}"
        before_inputs, before_sandbox = _tree(inputs), _tree(sandbox)
        code = main([a.replace("{run}", str(run)) for a in case.argv])
        captured = capsys.readouterr()
        lines = [line for line in captured.err.splitlines() if line.strip()]
        last = lines[-1] if lines else ""
        if code != case.exit_code:
            failures.append(f"{case.what}: exit {code}, expected {case.exit_code} ({last})")
        elif code and not (last.startswith(f"sparsedet {case.argv[0]}: error: ") and case.expect in last):
            failures.append(f"{case.what}: last stderr line {last!r} lacks {case.expect!r}")
        elif not code and case.expect not in captured.out:
            failures.append(f"{case.what}: stdout lacks {case.expect!r}")
        if "Traceback" in captured.err:
            failures.append(f"{case.what}: a traceback was printed")
        if case.marker is not None and case.marker.exists():
            failures.append(f"{case.what}: the pickle's code ran")
        if _tree(inputs) != before_inputs:
            failures.append(f"{case.what}: an input file was changed or added")
        outside = {k for k in set(_tree(sandbox)) - set(before_sandbox) if not k.startswith(f"run{number}")}
        if outside:
            failures.append(f"{case.what}: wrote outside its run folder: {sorted(outside)}")
    assert not failures, "\n".join(failures)
    assert len(cases) >= 40


def test_debug_flag_and_env_var_show_the_traceback(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "random.pth"
    bad.write_bytes(os.urandom(256))
    argv = ["eval", str(bad), "--output", str(tmp_path / "run")]
    monkeypatch.delenv("SPARSEDET_DEBUG", raising=False)
    assert main(argv) == 1
    with pytest.raises(ValueError, match="not a weights file sparsedet can read safely"):
        main(argv + ["--debug"])
    monkeypatch.setenv("SPARSEDET_DEBUG", "1")
    with pytest.raises(ValueError):
        main(argv)
    capsys.readouterr()
