"""Console and file logging for the command line and the trainer."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional


def setup_logging(log_file: Optional[Path] = None, main_process: bool = True, verbose: bool = False) -> None:
    """INFO (DEBUG with ``verbose``) to stderr from the main process, WARNING from the others;
    everything the main process logs also goes to ``log_file`` when given."""
    root = logging.getLogger("sparsedet")
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.DEBUG if verbose else logging.INFO if main_process else logging.WARNING)
    console.setFormatter(logging.Formatter("%(message)s" if main_process else "[rank] %(message)s"))
    root.addHandler(console)
    if log_file is not None and main_process:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        root.addHandler(file_handler)
    root.propagate = False
