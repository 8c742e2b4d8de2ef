"""TRACE's constraints on its heads: the residual posterior's normalisation (Eq. 11, Theorem 1)
and the spectral cap on TRACE-P's z-to-z maps."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResidualNorm(nn.Module):
    """Normalises the residual posterior's output [d_mu, log d_sigma^2] ([..., 2P]) with a
    fixed scale gamma (never trained) and a shift beta, fixed at 0 or learned from 0:

        over    mean: d_mu alone (P values) | both: all 2P values together (Eq. 11 as printed)
        kind    ln: per latent vector; bn: per dimension over the batch's present slots; none
        shift   zero | learned (BN-VAE's learned beta, which Theorem 1's proof cites)

    `ln` + `mean` + `zero` makes Theorem 1's floor exact: sum_d d_mu_d^2 = P gamma^2 (up to
    layer_norm's eps) for every vector. A learned shift, or normalising both halves, lets the
    KL go below it."""

    def __init__(self, kind: str, size: int, gamma: float, over: str, shift: str):
        super().__init__()
        self.kind, self.size, self.gamma, self.over = kind, size, gamma, over
        width = size if over == "mean" else 2 * size
        self.shift = nn.Parameter(torch.zeros(width)) if shift == "learned" and kind != "none" else None
        if kind == "bn":
            self.batch_norm = nn.BatchNorm1d(width, affine=False)

    def forward(self, residual: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """residual [B, L, 2P] (float32), present [B, L] -> [B, L, 2P]."""
        if self.kind == "none":
            return residual
        if self.over == "mean":
            mean, log_var = residual.split(self.size, dim=-1)
            return torch.cat([self.normalise(mean, present), log_var], dim=-1)
        return self.normalise(residual, present)

    def normalise(self, values: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        if self.kind == "ln":
            normed = self.gamma * F.layer_norm(values, values.shape[-1:])
        else:
            rows = values[present]
            norm = self.batch_norm
            use_batch = self.training and rows.shape[0] > 1
            rows = F.batch_norm(rows, norm.running_mean, norm.running_var, training=use_batch, momentum=norm.momentum, eps=norm.eps)
            normed = values.masked_scatter(present[..., None], self.gamma * rows)
        return normed if self.shift is None else normed + self.shift


class SpectralCap(nn.Module):
    """Weight parametrisation W -> W / max(1, ||W||_2): the spectral norm never exceeds 1."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.matrix_norm(weight.float(), ord=2)
        return weight / torch.clamp(norm, min=1.0).to(weight.dtype)
