"""File modes: every file and folder a run holds gets the mode the user's umask gives new files
(0644 / 0755 under the usual 022), whatever wrote it (safetensors and mkdtemp make theirs private)."""

from __future__ import annotations

import os
from pathlib import Path


def umask() -> int:
    """The process's umask (read without changing it for longer than the call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def usual_mode(path: Path, folder: bool = False) -> None:
    """Give `path` the mode a plain new file (or folder) would have: 0666 (0777) less the umask."""
    os.chmod(path, (0o777 if folder else 0o666) & ~umask())
