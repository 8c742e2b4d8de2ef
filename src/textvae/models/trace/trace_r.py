"""TRACE-R: the exact recurrence over segment latents (TRACE section 3.2).

    prior       p(z_t | z_<t, x_<t) = N(mu_t, sigma_t^2),  [mu_t, log sigma_t^2] = F [z_{t-1}; x_<t]
    posterior   q(z_t | z_<t, x_<=t) = N(mu_t + d_mu_t, sigma_t^2 d_sigma_t^2)
                (-RP, `residual_posterior: false`: N(d_mu_t, d_sigma_t^2), the prior not read)

With the residual mean normalised alone and no shift, KL_t >= P gamma^2 / (2 max_d sigma_t,d^2)
cannot vanish (Theorem 1; `ResidualNorm`).
"""

from __future__ import annotations

from textvae.models.trace.chain import SegmentChain
from textvae.models.trace.residual import ResidualPosteriorVAE


class TraceR(ResidualPosteriorVAE):
    """Exact recurrence: prior F [z_{t-1}; x_<t], residual posterior from G x_t."""

    name = "trace-r"

    def chains(self, states, layout):
        base, residual = self.text_terms(states, layout)
        prior = SegmentChain(base, layout.slots, self.prior_from_latent)
        if not self.config.residual_posterior:  # -RP: the posterior ignores the prior
            return SegmentChain(residual, layout.slots), prior
        return SegmentChain(base, layout.slots, self.prior_from_latent, residual), prior

    def next_prior(self, before, previous, first):
        return self.prior_step(before, previous, first)
