"""File modes: every file and folder a run holds gets the mode the user's umask gives new files
(0644 / 0755 under the usual 022), whatever wrote it (safetensors and mkdtemp make theirs private).
And safetensors writes that fail as every other write does, with an OSError."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file, save_model


def umask() -> int:
    """The process's umask (read without changing it for longer than the call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def usual_mode(path: Path, folder: bool = False) -> None:
    """Give `path` the mode a plain new file (or folder) would have: 0666 (0777) less the umask."""
    os.chmod(path, (0o777 if folder else 0o666) & ~umask())


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file`, with the usual mode; a failed write raises OSError."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as err:
        raise as_os_error(err) from None
    usual_mode(path)


def save_module_tensors(module: torch.nn.Module, path: Path) -> None:
    """safetensors' `save_model` (tied tensors stored once), with the usual mode; a failed
    write raises OSError."""
    try:
        save_model(module, str(path))
    except SafetensorError as err:
        raise as_os_error(err) from None
    usual_mode(path)


def as_os_error(err: SafetensorError) -> OSError:
    """safetensors reports a failed write, a full disk included, as its own error type
    ("Error while serializing: I/O error: No space left on device (os error 28)", seen on a
    full tmpfs): the OSError it stands for, so callers handle every failed write alike."""
    code = re.search(r"os error (\d+)", str(err))
    if code:
        return OSError(int(code.group(1)), os.strerror(int(code.group(1))))
    return OSError(errno.EIO, str(err))
