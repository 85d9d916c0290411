"""Runs every hostile input of ``tests/hostile_inputs.py`` through the real command line
(``python -m sparsedet``, one process each) and prints the markdown table of issue 9:
bad input -> one-line message -> exit code.

    PYTHONPATH=src python benchmarks/reliability_table.py > notes/reliability_table.md
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from hostile_inputs import build_cases  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cases = build_cases(Path(tmp) / "inputs")
        env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1", SPARSEDET_DEBUG="0")
        print("| kind | bad input | command | exit | message (last stderr line; stdout for exit 0) | as expected |")
        print("|---|---|---|---|---|---|")
        for number, case in enumerate(cases):
            run = Path(tmp) / f"run{number}"
            argv = [a.replace("{run}", str(run)) for a in case.argv]
            proc = subprocess.run([sys.executable, "-m", "sparsedet", *argv], capture_output=True, text=True,
                                  env=env, cwd=tmp, timeout=600)
            # The message: the error line, or for a run that must succeed, its summary on stdout.
            stream = proc.stderr if case.exit_code else proc.stdout
            lines = [line for line in stream.splitlines() if line.strip()]
            last = lines[-1] if lines else ""
            ok = proc.returncode == case.exit_code and case.expect in last and "Traceback" not in proc.stderr
            if case.marker is not None and case.marker.exists():
                ok = False
                last += " (CODE RAN)"
            command = f"sparsedet {argv[0]} ... " + " ".join(a for a in argv[1:] if "=" in a and not a.startswith(
                ("data.val=null", "data.num_workers", "solver.max_iter=1", "solver.images_per_batch", "model.",
                 "data.train.annotations", "data.train.images")) or a.startswith(("--device", "--resume")))
            last = last.replace(tmp, "<tmp>").replace("|", "\\|")
            print(f"| {case.kind} | {case.what} | `{command.replace(tmp, '<tmp>').strip()}` | {proc.returncode} | "
                  f"{last} | {'yes' if ok else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
