"""How far a long evaluation has come, on stderr: a progress bar on a terminal, else (a log, a
batch job) a line each tenth of the work with the time it has taken and an estimate of the
time left. The estimate comes from the time this process spent computing batches, so batches
read back from a progress file (a resumed evaluation) count as done, and neither their work
nor their time enters the pace."""

from __future__ import annotations

import sys
from time import perf_counter

from tqdm.auto import tqdm


class Pace:
    """`work[i]`: the cost of batch i (its padded positions: every pass over it costs about
    that much). Call `done(i, computed)` after each batch; `close()` at the end."""

    def __init__(self, work: list[int], enabled: bool, what: str = "evaluate"):
        self.work, self.total, self.what = work, max(1, sum(work)), what
        self.enabled = enabled
        self.bar = (tqdm(total=sum(work), unit="pos", desc=what, dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
                    if enabled and sys.stderr.isatty() else None)
        self.finished = self.timed = 0
        self.timed_seconds = 0.0
        self.started = self.last = perf_counter()
        self.next_line = 0.1

    def done(self, index: int, computed: bool) -> None:
        """Batch `index` is finished; `computed`: here, rather than read back."""
        now = perf_counter() if self.enabled else self.last  # a quiet meter needs no clock
        self.finished += self.work[index]
        if computed:
            self.timed += self.work[index]
            self.timed_seconds += now - self.last
        self.last = now
        if self.bar is not None:
            self.bar.update(self.work[index])
            return
        if not self.enabled or self.finished < self.next_line * self.total - 1e-9:
            return
        while self.next_line * self.total <= self.finished + 1e-9:
            self.next_line += 0.1
        elapsed = now - self.started
        remaining = self.total - self.finished
        left = f", about {_clock(self.timed_seconds / self.timed * remaining)} left" if self.timed and remaining > 0 else ""
        print(f"{self.what}: {self.finished / self.total:.0%} of the work ({index + 1} of {len(self.work)} batches), "
              f"{_clock(elapsed)} so far{left}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _clock(seconds: float) -> str:
    """20 s, 12 min, 1 h 05 min (under half a minute in seconds)."""
    minutes = round(seconds / 60)
    if minutes >= 60:
        return f"{minutes // 60} h {minutes % 60:02d} min"
    return f"{minutes} min" if minutes else f"{seconds:.0f} s"
