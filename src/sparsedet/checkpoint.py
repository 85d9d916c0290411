"""Reading weight files safely and writing them atomically.

Every loader here uses ``torch.load(weights_only=True)``; detectron2 ``.pkl`` files (pickled
numpy arrays) go through an unpickler that only admits numpy array reconstruction. A file that is
neither (random bytes, a pickle that would run code) is refused with a ``UserError`` that never
suggests ``weights_only=False``.

Writes go to a temporary file beside the target, then a rename: a kill or a full disk mid-write
leaves the previous file intact. Written files get the permissions of the umask, like any other
file the user creates.
"""
from __future__ import annotations

import argparse
import errno
import os
import pickle
import re
import shutil
import tempfile
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from .errors import InvalidInputError, UserError

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
            with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # torch's pickle-protocol notes: the error says enough
                data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for corrupt or unsafe files
            raise InvalidInputError(f"{path} is not a weights file sparsedet can read safely "
                            f"({_unreadable_reason(err)})") from err
    if not isinstance(data, Mapping):
        raise InvalidInputError(f"{path}: expected a dict of weights, got {type(data).__name__}")
    return dict(data)


def _unreadable_reason(err: Exception) -> str:
    """Why torch refused a file, without torch's advice to load it unsafely."""
    text = str(err)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"it refers to {found.group(1)}, which is not tensor data: refused, as loading it could run code"
    found = re.search(r"Unsupported operand (\d+)", text)
    if found:
        return f"not a PyTorch checkpoint of tensors: unsupported pickle opcode {found.group(1)}"
    if "weights_only" in text or "Weights only load failed" in text:
        return "it holds objects other than tensors, numbers and containers: refused, as loading it could run code"
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return f"not a PyTorch zip or pickle file: {first[:160]}"


def load_model_weights(model: nn.Module, state: Mapping[str, torch.Tensor], source: str | os.PathLike,
                       strict: bool = True) -> tuple[list[str], list[str]]:
    """``model.load_state_dict(state)`` with the shape check first, so that a checkpoint of another
    architecture or class count gives one message naming the first mismatching tensors.

    Returns:
        (missing, unexpected) keys (both empty when ``strict``).

    Raises:
        UserError: shapes differ, or (``strict``) keys are missing or unexpected.
    """
    own = model.state_dict()
    mismatched = [f"{k} {tuple(v.shape)} in the file, {tuple(own[k].shape)} in the model"
                  for k, v in state.items() if k in own and hasattr(v, "shape") and v.shape != own[k].shape]
    if mismatched:
        more = f" and {len(mismatched) - 2} more" if len(mismatched) > 2 else ""
        raise InvalidInputError(f"{source}: {len(mismatched)} tensor(s) do not fit the model built from the config: "
                        f"{'; '.join(mismatched[:2])}{more} (another architecture, size or model.num_classes?)")
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if strict and (missing or unexpected):
        raise InvalidInputError(f"{source}: does not fit the model built from its config: "
                        f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                        f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    model.load_state_dict(state, strict=False)
    return missing, unexpected


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


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Less free space than this after a failed write is taken as "the disk is full": torch's zip
# writer reports a failed write as a RuntimeError without the OS error number.
_FULL_DISK_BYTES = 1 << 20


def _is_disk_full(err: BaseException, folder: Path) -> bool:
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        err = err.__cause__ or err.__context__
    try:
        return shutil.disk_usage(folder).free < _FULL_DISK_BYTES
    except OSError:
        return False


def temporary_prefix(name: str) -> str:
    """Temporary files of an atomic write of ``name`` are ``.<name>.<random>.tmp``."""
    return f".{name}."


def remove_stale_temporaries(folder: str | os.PathLike, names: tuple[str, ...]) -> list[Path]:
    """Deletes the temporary files that killed atomic writes of ``names`` left in ``folder``
    (only those: other files are never touched). Returns the deleted paths."""
    removed = []
    for name in names:
        for stale in Path(folder).glob(f"{temporary_prefix(name)}*.tmp"):
            try:
                stale.unlink()
                removed.append(stale)
            except OSError:
                pass
    return removed


def _write_atomically(path: str | os.PathLike, write, binary: bool) -> Path:
    """Calls ``write(file)`` on a temporary file in ``path``'s folder, then renames it over ``path``:
    a crash mid-write leaves the previous file intact, never a truncated one.

    Raises:
        UserError: the disk is full or the folder not writable (the previous file is intact).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path.name), suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}") from err
    try:
        # mkstemp creates 0600 files; give the file the mode any new file of the user gets.
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        previous = "the previous file is intact" if path.exists() else "no previous file existed"
        if isinstance(err, (OSError, RuntimeError)) and _is_disk_full(err, path.parent):
            raise UserError(f"no space left on device writing {path}; {previous}") from err
        if isinstance(err, OSError):
            raise UserError(f"cannot write {path}: {err.strerror or err}; {previous}") from err
        raise
    return path


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    return _write_atomically(path, lambda f: torch.save(obj, f), binary=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Writes ``text`` to a temporary file beside ``path``, then renames it over ``path``."""
    return _write_atomically(path, lambda f: f.write(text), binary=False)
