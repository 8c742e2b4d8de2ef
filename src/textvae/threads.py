"""How many CPU threads a textvae process computes with, and a warning when the machine's
cores are already busy: two processes with default threads on 2 cores run ~10x slower each,
not 2x (docs/performance.md).

The count is a machine setting, not part of a run's config: `--threads N`, else
OMP_NUM_THREADS (torchrun sets 1 per process), else torch's default (the physical cores).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from textvae.errors import TextVAEError


def configure_threads(requested: int | None) -> int:
    """Set torch's intra-op threads to `requested` (when given); returns the count in use."""
    import torch

    if requested is not None:
        if requested < 1:
            raise TextVAEError(f"--threads must be >= 1, got {requested}")
        torch.set_num_threads(requested)
    return torch.get_num_threads()


def oversubscription_warning(threads: int, samples: int = 5, loadavg: Path = Path("/proc/loadavg")) -> str | None:
    """One line when other processes' running threads plus ours exceed the cores, else None.
    Runnable threads are read from `loadavg` (ours excluded; the median of a few samples)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    others = []
    for _ in range(samples):
        try:
            running = int(loadavg.read_text().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return None  # not Linux: no cheap way to tell
        others.append(max(0, running - 1))  # the reading thread itself is running
        time.sleep(0.01)
    busy = sorted(others)[len(others) // 2]
    if busy + threads <= cores:
        return None
    return (f"textvae: warning: {busy} other threads are running on {cores} cores and this process uses {threads}; "
            f"shared cores slow every process far more than in proportion (use --threads or OMP_NUM_THREADS)")
