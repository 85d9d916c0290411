"""Output folders that do not overwrite an earlier run."""
from __future__ import annotations

from pathlib import Path


def next_free_folder(base: str | Path) -> Path:
    """``base`` when it does not exist yet, else the first of ``base2``, ``base3``, ... that does not
    (``outputs/predict`` -> ``outputs/predict2``); the caller creates it."""
    base = Path(base)
    candidate, number = base, 1
    while candidate.exists():
        number += 1
        candidate = base.with_name(f"{base.name}{number}")
    return candidate
