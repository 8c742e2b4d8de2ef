"""Writing files: every output is whole or absent (written beside itself and renamed), a failed
write is a one-line `TextVAEError`, and every file and folder a run holds gets the mode the
user's umask gives new files (0644 / 0755 under the usual 022), whatever wrote it (safetensors
and mkdtemp make theirs private)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
from pathlib import Path

from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file, save_model

from textvae.errors import TextVAEError


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> None:
    """`write(temporary)` beside `path`, then rename onto it: the file is whole or absent, and
    readers never see it half-written. A failed write (a full disk, an unwritable folder, `path`
    a folder) removes the temporary file and raises a one-line `TextVAEError`."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(temporary)
        os.replace(temporary, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise TextVAEError(f"could not write {path} ({err.strerror or err})") from None


def check_writable(path: str | Path | None, flag: str) -> None:
    """Refuse, before any long work, an output path that cannot become a file: a folder, a
    path under a file, or under a folder this user cannot write (`None`: nothing asked)."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise TextVAEError(f"{flag} {path} is a folder, not a file")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:  # the folders write_atomically would make
        folder = folder.parent
    if not folder.is_dir():
        raise TextVAEError(f"{flag} {path}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise TextVAEError(f"{flag} {path}: {folder} is not writable")


def write_text_atomically(path: str | Path, text: str) -> None:
    """`text` to `path` as UTF-8, whole or absent (`write_atomically`)."""
    write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


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
