"""What every posterior and prior object offers (`DiagonalGaussian`, DELLA's `LatentChain`,
TRACE's `SegmentChain`), declared once so that callers need no probes.

A latent z is drawn in the distribution's own layout (`rsample`): [B, D] for one vector per text
(D = all layers concatenated for DELLA), [B, L, P] for one vector per segment. `grouped()`
gives every kind in one layout, [B, G, P] with the groups (the single latent, DELLA's layers,
TRACE's segments) along G, for the Python API and plots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class LatentGroups:
    """Means and log-variances of each latent group along the chain run on means (for chains,
    group g's parameters given the means of the groups before it)."""

    mean: torch.Tensor  # [B, G, P]
    log_var: torch.Tensor  # [B, G, P]
    present: torch.Tensor  # [B, G] bool: which groups the text has (segments vary in number)


class LatentDistribution(Protocol):
    def rsample(self, num: int | None = None) -> torch.Tensor:
        """A reparameterised draw in the own layout, or `num` per example (after dim 0)."""

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Log density of z (one or k per example), summed over all latent groups: [B] or [B, k]."""

    def conditional_entropy(self, z: torch.Tensor) -> torch.Tensor:
        """Sum over groups of each group's entropy given the groups before it, read from z: [B]."""

    def cross_log_prob(self, z: torch.Tensor, owner: "LatentDistribution") -> torch.Tensor:
        """log q(z_i | x_j) for every example j here and every z_i drawn by `owner`: [B_j, B_i]."""

    @property
    def segment_counts(self) -> torch.Tensor | None:
        """[B] which latent space each example's z lives in (its segment count), or None when all share one."""

    @property
    def activity_means(self) -> torch.Tensor:
        """[N, P'] one row per observation of a latent space (per text, or per present segment), for AU."""

    def grouped(self) -> LatentGroups:
        """Means and log-variances by latent group, [B, G, P]."""
