"""The per-segment latent distributions of the segment-wise models, with TRACE's optional
recurrence over segments (a `latent.interface.LatentDistribution`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from textvae.latent.gaussian import DiagonalGaussian
from textvae.latent.interface import LatentGroups


class SegmentChain:
    """Per-slot Gaussians over z [B, L, P] (or [B, k, L, P]) with an optional recurrence:

        [mu_t, log var_t] = base_t + recurrent(z_{t-1}) (+ residual_t),   z_0 = 0

    `base` and `residual` [B, L, 2P] hold what depends on the text; absent slots (`present`
    False) are ignored by densities, and their text terms (read at padding) are replaced by 0,
    so that whatever padding gives (an overflow) reaches neither a sum nor a gradient. Without a
    recurrence every slot is independent."""

    def __init__(self, base: torch.Tensor, present: torch.Tensor, recurrent: nn.Module | None = None,
                 residual: torch.Tensor | None = None):
        base = absent_as_zero(base.float(), present)
        residual = None if residual is None else absent_as_zero(residual, present)
        self.base, self.present, self.recurrent, self.residual = base, present, recurrent, residual

    def _params(self, previous: torch.Tensor | None, slot: slice | int) -> tuple[torch.Tensor, torch.Tensor]:
        params = self.base[:, slot]
        if self.residual is not None:
            params = params + self.residual[:, slot]
        if self.recurrent is not None and previous is not None:
            if previous.dim() > params.dim():  # k samples per example
                params = params.unsqueeze(1)
            params = params + self.recurrent(previous).float()
        return params.chunk(2, dim=-1)

    def conditionals(self, z: torch.Tensor) -> DiagonalGaussian:
        """The slots' distributions with z_{t-1} read from z (teacher forcing), shaped like z
        ([B, L, P] or [B, k, L, P])."""
        previous = None
        if self.recurrent is not None:
            previous = torch.cat([torch.zeros_like(z[..., :1, :]), z[..., :-1, :]], dim=-2)
        mean, log_var = self._params(previous, slice(None))
        if mean.dim() < z.dim():
            mean, log_var = mean.unsqueeze(1), log_var.unsqueeze(1)
        return DiagonalGaussian(mean.expand_as(z), log_var.expand_as(z))

    def rsample(self, num: int | None = None) -> torch.Tensor:
        """[B, L, P] or [B, num, L, P]; ancestral over slots when recurrent."""
        batch, slots, size = self.base.shape[0], self.base.shape[1], self.base.shape[2] // 2
        shape = (batch, slots, size) if num is None else (batch, num, slots, size)
        noise = torch.randn(shape, device=self.base.device)
        if self.recurrent is None:
            mean, log_var = self._params(None, slice(None))
            if num is not None:
                mean, log_var = mean[:, None], log_var[:, None]
            return mean + torch.exp(0.5 * log_var) * noise
        previous, drawn = torch.zeros(shape[:-2] + (size,), device=self.base.device), []
        for slot in range(slots):  # T small products, vectorised over examples and samples
            mean, log_var = self._params(previous, slot)
            previous = mean + torch.exp(0.5 * log_var) * noise[..., slot, :]
            drawn.append(previous)
        return torch.stack(drawn, dim=-2)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Log density of z [B, L, P] or [B, k, L, P] summed over present slots: [B] or [B, k]."""
        per_slot = self.conditionals(z).log_prob(z)  # [.., L]
        present = self.present if z.dim() == 3 else self.present[:, None]
        return absent_as_zero(per_slot, present).sum(-1)

    def conditional_entropy(self, z: torch.Tensor) -> torch.Tensor:
        """sum_t H(q(z_t | z_{t-1})) over present slots, z_{t-1} read from z [B, L, P]: [B]."""
        return absent_as_zero(self.conditionals(z).entropy(), self.present).sum(-1)

    @property
    def segment_counts(self) -> torch.Tensor:
        """Latent slots of each example [B]: latents of different counts live in different
        spaces (the mutual information is taken given the count)."""
        return self.present.sum(1)

    def cross_log_prob(self, z: torch.Tensor, owner: "SegmentChain") -> torch.Tensor:
        """log q(z_i | x_j) for every example j here and every latent z_i [B_i, L_i, P] drawn
        by `owner`: [B_j, B_i]; -inf where the slot counts differ (no mass there)."""
        mine, theirs = self.segment_counts, owner.segment_counts
        width = self.base.shape[1]
        aligned = z[:, :width] if z.shape[1] >= width else F.pad(z, (0, 0, 0, width - z.shape[1]))
        expanded = aligned[None].expand(self.base.shape[0], -1, -1, -1)  # [B_j, B_i, L, P]
        log_q = self.log_prob(expanded)
        return log_q.masked_fill(mine[:, None] != theirs[None, :], float("-inf"))

    @property
    def mean(self) -> torch.Tensor:
        """Per-slot means along the chain run on means: [B, L, P] (absent slots hold what the
        chain gives there; see `present`)."""
        if self.recurrent is None:
            return self._params(None, slice(None))[0]
        previous, steps = None, []
        for slot in range(self.base.shape[1]):
            previous = self._params(previous, slot)[0]
            steps.append(previous)
        return torch.stack(steps, dim=1)

    @property
    def activity_means(self) -> torch.Tensor:
        """[slots in batch, P]: each present slot is one observation of the same P-dim latent
        space (for AU)."""
        return self.mean[self.present]

    def grouped(self) -> LatentGroups:
        """Each slot's mean and log-variance given the means of the slots before it: [B, L, P]."""
        along_means = self.conditionals(self.mean)
        return LatentGroups(along_means.mean, along_means.log_var, self.present.bool())


def absent_as_zero(values: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """`values` [..., L] or [..., L, P] (per dimension: `values` has one axis more than
    `present` [..., L]) with absent slots set to 0: selected, not multiplied, so that an
    absent slot's inf or NaN (its padding read as text) cannot reach the sum."""
    present = present.bool()
    if values.dim() == present.dim() + 1:
        present = present[..., None]
    return torch.where(present, values, torch.zeros((), dtype=values.dtype, device=values.device))
