"""Errors a user can cause and fix: bad configs, data, checkpoints, devices, output folders.

The command line prints any of these as one line (``sparsedet <command>: error: <message>``) and
exits with the error's ``exit_code``; ``--debug`` or ``SPARSEDET_DEBUG=1`` shows the traceback
instead. Everything else that escapes is a bug in sparsedet and keeps its traceback.

Messages name what is wrong (the file, the config key, the value) and what to do about it.
"""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path


class UserError(Exception):
    """An expected error caused by an input the user controls (exit code 1)."""

    exit_code = 1


class UsageError(UserError):
    """The command line asks for something that cannot be, e.g. a CUDA device that is not there
    (exit code 2, as argparse's own usage errors)."""

    exit_code = 2


class InvalidInputError(UserError, ValueError):
    """A file or value the user supplied is invalid (a ``ValueError`` too, for library callers
    that catch those)."""


class ConfigError(InvalidInputError):
    """A config file, override or key is invalid; the message names the file and the field."""


# Errors raised by library code written before ``UserError`` existed, and by the OS for files the
# user named (missing, unreadable, no space): also expected, also one line.
EXPECTED_ERRORS = (UserError, ValueError, FileNotFoundError, PermissionError, OSError, FloatingPointError,
                   TypeError)


def is_expected(err: BaseException) -> bool:
    """True for errors the CLI reports as one line (see the module docstring)."""
    return isinstance(err, EXPECTED_ERRORS)


def exit_code(err: BaseException) -> int:
    """2 for command-line usage errors (``UsageError``), 1 for every other expected error."""
    return int(getattr(err, "exit_code", 1))


def one_line(err: BaseException) -> str:
    """The error's message on one line (an OSError without its own text gets strerror + path)."""
    text = str(err)
    if isinstance(err, OSError) and err.filename and (not text or text.startswith("[Errno")):
        text = f"{err.strerror or text}: {err.filename}"
    return " ".join(text.split()) or type(err).__name__


def check_writable_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Creates ``path`` if needed and checks a file can be written in it, so that a read-only or
    full output folder fails before data are read or a model is built.

    Raises:
        UserError: naming the folder and the reason.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        reason = "no space left on device" if err.errno == errno.ENOSPC else (err.strerror or str(err))
        raise UserError(f"cannot write to the {what} {path}: {reason}; choose another with --output") from err
    return path


def check_device(device: str | None) -> None:
    """Refuses ``cuda``/``cuda:N`` when no such CUDA device is visible (before any work is done).

    Raises:
        UsageError: saying what is visible and what to do.
    """
    if not device or not str(device).startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is visible to PyTorch (torch "
                         f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}). Use --device cpu, or "
                         "check the GPU driver, CUDA_VISIBLE_DEVICES and that torch was installed with CUDA")
    index = str(device).partition(":")[2]
    if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
        raise UsageError(f"--device {device}: {torch.cuda.device_count()} CUDA device(s) visible, "
                         f"valid: {', '.join(f'cuda:{i}' for i in range(torch.cuda.device_count()))}")
