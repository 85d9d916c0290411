"""Reading weight files safely and writing them atomically.

Every loader here uses ``torch.load(weights_only=True)``; detectron2 ``.pkl`` files (pickled
numpy arrays) go through an unpickler that only admits numpy array reconstruction.
"""
from __future__ import annotations

import argparse
import os
import pickle
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

StateDict = "OrderedDict[str, torch.Tensor]"


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists and numpy arrays, and refuses any other global (no code execution)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
        # pickle protocol 5 (Python 3.14's default) stores arrays via _frombuffer; protocol 2
        # written by Python 3 stores their bytes via _codecs.encode. Neither runs code.
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weights file")


def read_weights_file(path: str | os.PathLike) -> dict[str, Any]:
    """Loads a ``.pth``/``.pt`` (torch) or ``.pkl`` (detectron2, numpy) file into a dict.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file is not a dict of tensors/arrays (names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".pkl":
        with open(path, "rb") as f:
            try:
                data = _NumpyOnlyUnpickler(f, encoding="latin1").load()
            except (pickle.UnpicklingError, EOFError) as err:
                raise ValueError(f"{path}: not a detectron2 .pkl of numpy arrays ({err})") from err
    else:
        try:
            # Official ASAG (DETR-style) checkpoints pickle the training ``argparse.Namespace`` of
            # plain values beside the weights; allow that one class, nothing else.
            with torch.serialization.safe_globals([argparse.Namespace]):
                data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for corrupt or unsafe files
            raise ValueError(f"{path}: cannot be read as a PyTorch weights file ({err})") from err
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a dict of weights, got {type(data).__name__}")
    return dict(data)


def extract_state_dict(data: Mapping[str, Any], source: str = "checkpoint") -> StateDict:
    """Unwraps ``{"model": state_dict, ...}`` (detectron2/sparsedet) or ``{"state_dict": ...}``
    and converts numpy arrays to tensors."""
    for wrapper in ("model", "state_dict"):
        if wrapper in data and isinstance(data[wrapper], Mapping):
            data = data[wrapper]
            break
    state = OrderedDict()
    for key, value in data.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor")
        state[key] = value
    return state


def load_state_dict_file(path: str | os.PathLike) -> StateDict:
    """``read_weights_file`` + ``extract_state_dict``: the tensors of any supported weights file."""
    return extract_state_dict(read_weights_file(path), source=str(path))


def _write_atomically(path: str | os.PathLike, write, binary: bool) -> Path:
    """Calls ``write(file)`` on a temporary file in ``path``'s folder, then renames it over ``path``:
    a crash mid-write leaves the previous file intact, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    return _write_atomically(path, lambda f: torch.save(obj, f), binary=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Writes ``text`` to a temporary file beside ``path``, then renames it over ``path``."""
    return _write_atomically(path, lambda f: f.write(text), binary=False)
