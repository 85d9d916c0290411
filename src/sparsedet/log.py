"""Console and file logging for the command line and the trainer.

Every line the trainer reports goes to ``train.log``. The console gets the same lines, except
those logged with ``extra=FILE_ONLY`` (e.g. the periodic loss lines while a progress bar shows
the loss already). Console lines are written through ``tqdm.write`` so that they do not tear an
active progress bar.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

# logging ``extra`` for a record that belongs in the log file but not on the console
FILE_ONLY = {"file_only": True}


class _ConsoleHandler(logging.StreamHandler):
    """stderr, above any tqdm progress bar; skips ``FILE_ONLY`` records."""

    def __init__(self):
        super().__init__(sys.stderr)
        self.addFilter(lambda record: not getattr(record, "file_only", False))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # logging must never raise
            self.handleError(record)


def setup_logging(log_file: Optional[Path] = None, main_process: bool = True, verbose: bool = False) -> None:
    """INFO (DEBUG with ``verbose``) to stderr from the main process, WARNING from the others;
    everything the main process logs also goes to ``log_file`` when given."""
    root = logging.getLogger("sparsedet")
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    console = _ConsoleHandler()
    console.setLevel(logging.DEBUG if verbose else logging.INFO if main_process else logging.WARNING)
    console.setFormatter(logging.Formatter("%(message)s" if main_process else "[rank] %(message)s"))
    root.addHandler(console)
    if log_file is not None and main_process:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        root.addHandler(file_handler)
    root.propagate = False
