"""KL weight (beta) schedules, as functions of the optimizer step.

`cyclical` follows the DELLA appendix (after Fu et al., 2019): a period of `period_epochs`
epochs; beta stays at `low` for the first `hold_low` of the period, rises linearly to `beta` (1)
over the next `rise` of it, and stays there for the rest. Updated every optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass

from textvae.errors import TextVAEError


@dataclass
class KLSchedule:
    schedule: str = "constant"  # constant | linear | cyclical
    beta: float = 1.0  # beta of the constant schedule, and the top of the others
    warmup_steps: int = 1000  # linear: steps from 0 to `beta`
    period_epochs: float = 2.0  # cyclical: length of one cycle
    low: float = 1e-5  # cyclical: beta in the first part of a cycle
    hold_low: float = 0.5  # cyclical: fraction of the cycle at `low`
    rise: float = 0.25  # cyclical: fraction of the cycle spent rising to `beta`

    def validate(self) -> None:
        if self.schedule not in ("constant", "linear", "cyclical"):
            raise TextVAEError(f"kl.schedule must be constant, linear or cyclical, got {self.schedule!r}")
        if self.beta < 0 or self.low < 0 or self.warmup_steps < 1 or self.period_epochs <= 0:
            raise TextVAEError("kl needs beta, low >= 0, warmup_steps >= 1, period_epochs > 0")
        if not (0 <= self.hold_low and 0 < self.rise and self.hold_low + self.rise <= 1):
            raise TextVAEError("kl needs hold_low >= 0, rise > 0 and hold_low + rise <= 1")

    def __call__(self, step: int, steps_per_epoch: int) -> float:
        """Beta for optimizer step `step` (0-based)."""
        if self.schedule == "constant":
            return self.beta
        if self.schedule == "linear":
            return self.beta * min(1.0, step / self.warmup_steps)
        period = max(1, round(self.period_epochs * steps_per_epoch))
        position = (step % period) / period
        if position < self.hold_low:
            return self.low
        if position < self.hold_low + self.rise:
            return self.low + (self.beta - self.low) * (position - self.hold_low) / self.rise
        return self.beta
