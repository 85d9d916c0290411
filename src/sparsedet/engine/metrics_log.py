"""Training metrics written as JSON lines and TensorBoard scalars (main process only).

``metrics.jsonl`` holds one object per line, of two kinds::

    {"type": "train", "iteration": 20, "lr": 2.5e-05, "total_loss": 3.1, "loss_ce": 0.4, ..., "time": 0.8}
    {"type": "eval", "iteration": 500, "AP": 0.31, "AP50": 0.52, ...}

``sparsedet.visualize.plot_training_curves`` draws it; ``tensorboard --logdir OUTPUT_DIR`` shows the
same scalars. On resume the file is appended to, after dropping lines past the resumed iteration
(they belong to the interrupted run's unsaved steps).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping

log = logging.getLogger("sparsedet.train")


class MetricsLog:
    def __init__(self, output_dir: str | Path, enabled: bool = True, resume_iteration: int | None = None,
                 tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_iteration is None:
            self.path.write_text("")
        elif self.path.exists():
            self._truncate_after(resume_iteration)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._writer = SummaryWriter(str(self.path.parent / "tensorboard"),
                                             purge_step=resume_iteration)
            except ImportError:  # tensorboard is a declared dependency, but keep training without it
                log.warning("tensorboard is not installed: writing metrics.jsonl only")

    def _truncate_after(self, iteration: int) -> None:
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("iteration", 0) <= iteration:
                    kept.append(line)
            except json.JSONDecodeError:
                continue
        self.path.write_text("".join(f"{line}\n" for line in kept))

    def write(self, kind: str, iteration: int, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"type": kind, "iteration": iteration, **{k: float(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in values.items():
                self._writer.add_scalar(f"{kind}/{key}", float(value), iteration)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
