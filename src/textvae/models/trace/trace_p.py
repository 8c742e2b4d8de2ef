"""TRACE-P: TRACE-R's networks (residual.py) as the latent-variable model that the parallel
sampler of section 4.2 / appendix B.2 defines. Latents v_t and u_t; the decoder reads z_t = v_t + sum_{i<t} u_i
(a product with a strictly lower-triangular matrix of ones):

    q(v_t | x)    = N(F_mu2 x_<t + d_mu_t, exp(F_sig2 x_<t) d_sigma_t^2)   (the paper's v_t)
    p(v_t | x_<t) = N(F_mu2 x_<t, exp(F_sig2 x_<t))       (N(0, I) first, without a source)
    u_t | v_t     = F_mu1 v_t + (F_sig1 v_t) * xi_t        (in both; xi_t ~ N(0, I))

q(v) and p(v) factorise over segments given the text, so training, the KL (per segment, the same
residual form and fixed-gamma floor as TRACE-R) and the bound need no recurrence; u_t has
the same law under q and p, so it cancels from log p(v, u) - log q(v, u) and the IW bound is
exact for this model: log w = log p(x | z(v, u)) + log p(v) - log q(v | x). MI and AU are
those of v (x reaches u only through v). Generation draws v_t from p at each [SEP] and
keeps the running sum of u; decoding given v's (reconstruction from posterior means,
interpolation) takes each u at its mean given v, F_mu1 v. We do not score TRACE-P with TRACE-R's exact recursion
z_t ~ N(F [z_{t-1}; x_<t], ...): the sampler never trains it, and run on a trained TRACE-P
it diverges (the log-variance is linear in z and exponentiated; docs/architecture.md).
With the z-to-z maps at zero, u = 0 and z_t is TRACE-R's sample for the same noise. [F_mu1; F_sig1] has its spectral norm capped at 1
(`spectral_norm`; W / max(1, ||W||_2)) rather than set to exactly 1 as torch's
spectral_norm does, so the map starts at zero like TRACE-R's.
"""

from __future__ import annotations

import torch
from torch.nn.utils import parametrize

from textvae.models.trace.chain import SegmentChain
from textvae.models.trace.norm import SpectralCap
from textvae.models.trace.residual import ResidualPosteriorVAE


class TraceP(ResidualPosteriorVAE):
    """TRACE-P: the parallel sampler's model over v (z = v + cumulative increments u)."""

    name = "trace-p"

    def __init__(self, backbone, tokenizer, config):
        super().__init__(backbone, tokenizer, config)
        if config.spectral_norm:
            parametrize.register_parametrization(self.prior_from_latent, "weight", SpectralCap())

    def chains(self, states, layout):
        base, residual = self.text_terms(states, layout)  # both chains without the z-to-z term
        if not self.config.residual_posterior:  # -RP
            return SegmentChain(residual, layout.slots), SegmentChain(base, layout.slots)
        return SegmentChain(base, layout.slots, residual=residual), SegmentChain(base, layout.slots)

    def increments(self, v: torch.Tensor, noise: bool = True) -> torch.Tensor:
        """u = F_mu1 v + (F_sig1 v) * xi for v [..., P] (fresh noise xi; without `noise`, its
        mean given v, F_mu1 v): same shape."""
        maps = self.prior_from_latent(v).float()
        size = self.config.latent_size
        if not noise:
            return maps[..., :size]
        return maps[..., :size] + maps[..., size:] * torch.randn_like(maps[..., :size])

    def decoder_latent(self, latent: torch.Tensor, noise: bool = True) -> torch.Tensor:
        """z = v + (strictly lower-triangular ones) u over the slot axis: [..., L, P] (u at its
        mean given v without `noise`)."""
        slots = latent.shape[-2]
        strictly_lower = torch.ones(slots, slots, device=latent.device).tril(-1)
        return latent + torch.einsum("ts,...sp->...tp", strictly_lower, self.increments(latent, noise))

    def next_prior(self, before, previous, first):
        return self.prior_step(before, None, first)  # p(v_t | x_<t): no z-to-z term

    def chain_state(self, drawn, previous, given=False):
        # decoding given v's (posterior means, interpolations): u at its mean given v, so that
        # the text depends on the v's alone, not on fresh noise
        if previous is None:
            carried = torch.zeros_like(drawn)
        else:
            carried = previous["carried"] + self.increments(previous["v"], noise=not given)
        return {"z": drawn + carried, "v": drawn, "carried": carried}
