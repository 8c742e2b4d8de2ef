"""Diagonal Gaussian distributions over latent vectors: sampling, densities and KL.

Shapes: `mean` and `log_var` are [..., P]; densities and KL are summed over P.
"""

from __future__ import annotations

import math

import torch

from textvae.latent.interface import LatentGroups

LOG_2PI = math.log(2 * math.pi)


class DiagonalGaussian:
    """One Gaussian latent per example (`latent/interface.py`)."""

    segment_counts = None  # every latent has the same shape (see SegmentChain.segment_counts)

    def __init__(self, mean: torch.Tensor, log_var: torch.Tensor):
        if mean.shape != log_var.shape:
            raise ValueError(f"mean {tuple(mean.shape)} and log_var {tuple(log_var.shape)} differ")
        self.mean = mean
        self.log_var = log_var

    @classmethod
    def standard(cls, batch: int, size: int, device: torch.device | str) -> "DiagonalGaussian":
        """N(0, I) over [batch, size] (float32)."""
        zeros = torch.zeros(batch, size, device=device)
        return cls(zeros, zeros)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.log_var)

    def rsample(self, num: int | None = None) -> torch.Tensor:
        """Reparameterised sample [..., P], or `num` samples [..., num, P]."""
        if num is None:
            return self.mean + self.std * torch.randn_like(self.mean)
        shape = (*self.mean.shape[:-1], num, self.mean.shape[-1])
        noise = torch.randn(shape, dtype=self.mean.dtype, device=self.mean.device)
        return self.mean.unsqueeze(-2) + self.std.unsqueeze(-2) * noise

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z; mean, var) summed over P. z: [..., P] or [..., k, P] -> [...] or [..., k]."""
        mean, log_var = self.mean, self.log_var
        if z.dim() == mean.dim() + 1:
            mean, log_var = mean.unsqueeze(-2), log_var.unsqueeze(-2)
        return -0.5 * (LOG_2PI + log_var + (z - mean) ** 2 * torch.exp(-log_var)).sum(-1)

    def cross_log_prob(self, z: torch.Tensor, owner: "DiagonalGaussian") -> torch.Tensor:
        """log q(z_i | x_j) for every example j here and every z_i [B_i, P]: [B_j, B_i]."""
        return self.log_prob(z[None].expand(self.mean.shape[0], *z.shape))

    @property
    def activity_means(self) -> torch.Tensor:
        """[B, P]: one observation of the latent space per example (for AU)."""
        return self.mean

    def grouped(self) -> LatentGroups:
        """One group: [B, 1, P]."""
        present = torch.ones(self.mean.shape[0], 1, dtype=torch.bool, device=self.mean.device)
        return LatentGroups(self.mean[:, None], self.log_var[:, None], present)

    def entropy(self) -> torch.Tensor:
        """Differential entropy summed over P: [...]."""
        return 0.5 * (LOG_2PI + 1.0 + self.log_var).sum(-1)

    def conditional_entropy(self, z: torch.Tensor) -> torch.Tensor:
        """The entropy (one group, nothing to condition on; z [..., P] is not read): [...]."""
        return self.entropy()

    def kl_per_dim(self, other: "DiagonalGaussian") -> torch.Tensor:
        """KL(self || other) of each dimension: [..., P]."""
        var_ratio = torch.exp(self.log_var - other.log_var)
        mean_term = (self.mean - other.mean) ** 2 * torch.exp(-other.log_var)
        return 0.5 * (var_ratio + mean_term - 1.0 - (self.log_var - other.log_var))

    def kl(self, other: "DiagonalGaussian") -> torch.Tensor:
        """KL(self || other) summed over P: [...]."""
        return self.kl_per_dim(other).sum(-1)
