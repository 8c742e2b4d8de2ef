"""The networks TRACE-R and TRACE-P share (TRACE section 3.2):

    prior heads          F = [F_text, F_latent]: [mu_t, log sigma_t^2] = F_text x_<t + F_latent z_{t-1}
                         (p(z_1) = N(0, I) without a source)
    residual posterior   [d_mu_t, log d_sigma_t^2] = Norm(G x_t)   (`ResidualNorm`)
                         q(z_t | ...) = N(mu_t + d_mu_t, sigma_t^2 d_sigma_t^2)

Each model decides how F_latent is used: TRACE-R as an exact recurrence over z, TRACE-P as the
parallel sampler's increments.
"""

from __future__ import annotations

import torch
from torch import nn

from textvae.latent.gaussian import DiagonalGaussian
from textvae.models.trace.config import SegmentLatentConfig
from textvae.models.trace.layout import SegmentLayout
from textvae.models.trace.norm import ResidualNorm
from textvae.models.trace.segment_vae import SegmentLatentVAE


class ResidualPosteriorVAE(SegmentLatentVAE):
    """A segment-wise model with TRACE's prior heads and normalised residual posterior."""

    passes = ("extra", "intra")

    def __init__(self, backbone, tokenizer, config: SegmentLatentConfig):
        super().__init__(backbone, tokenizer, config)
        hidden, size = backbone.hidden_size, config.latent_size
        self.prior_from_text = nn.Linear(hidden, 2 * size)  # F's x_<t part (and its bias)
        self.prior_from_latent = nn.Linear(size, 2 * size, bias=False)  # F's z_{t-1} part
        # starts at zero: a random map whose norm exceeds 1 makes z_t (and, through the
        # log-variance, sigma_t) grow geometrically over the segments of a long text
        nn.init.zeros_(self.prior_from_latent.weight)
        self.residual_from_text = nn.Linear(hidden, 2 * size)  # G
        self.residual_norm = ResidualNorm(config.posterior_norm, size, config.ln_gamma, config.norm_over, config.norm_shift)

    def text_terms(self, states: dict[str, torch.Tensor], layout: SegmentLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """What the text gives every latent slot, [B, L, 2P] each: the prior's F_text x_<t (zero
        at the first slot without a source, where p(z_1) = N(0, I)) and the normalised
        residual Norm(G x_t)."""
        own = states["intra"][:, layout.offset :]
        residual = self.residual_norm(self.residual_from_text(own).float(), layout.slots)
        base = self.prior_from_text(states["before"]).float()
        if not self.conditional:
            base = torch.cat([torch.zeros_like(base[:, :1]), base[:, 1:]], dim=1)
        return base, residual

    def prior_step(self, before: torch.Tensor, previous: torch.Tensor | None, first: bool) -> DiagonalGaussian:
        """p(z_t | x_<t[, z_{t-1}]) for one slot: before [N, H], previous [N, P] or None."""
        if first and not self.conditional:
            return DiagonalGaussian.standard(before.shape[0], self.config.latent_size, before.device)
        params = self.prior_from_text(before).float()
        if previous is not None:
            params = params + self.prior_from_latent(previous).float()
        return DiagonalGaussian(*params.chunk(2, dim=-1))
