"""The segment-wise baselines of TRACE's Table 2 (section 4):

    ind   p(z_t) = N(0, I), q(z_t | x_<=t) from the extra pass
    cgd   p(z_t | x_<t) from the extra pass, q(z_t | x) from the full (bidirectional) pass
"""

from __future__ import annotations

import torch
from torch import nn

from textvae.latent.gaussian import DiagonalGaussian
from textvae.models.trace.chain import SegmentChain
from textvae.models.trace.config import SegmentLatentConfig
from textvae.models.trace.segment_vae import SegmentLatentVAE


class Independent(SegmentLatentVAE):
    """IND: p(z_t) = N(0, I), q(z_t | x_<=t) from the extra pass at closer t."""

    name = "ind"
    passes = ("extra",)
    prior_reads_text = False

    def __init__(self, backbone, tokenizer, config: SegmentLatentConfig):
        super().__init__(backbone, tokenizer, config)
        self.posterior_head = nn.Linear(backbone.hidden_size, 2 * config.latent_size)

    def chains(self, states, layout):
        slots = layout.slots
        upto = states["extra"][:, layout.offset :]
        posterior = SegmentChain(self.posterior_head(upto), slots)
        return posterior, SegmentChain(torch.zeros_like(posterior.base), slots)

    def next_prior(self, before, previous, first):
        return DiagonalGaussian.standard(before.shape[0], self.config.latent_size, before.device)


class ContextConditioned(SegmentLatentVAE):
    """CGD, context-conditioned Gaussians: p(z_t | x_<t) from the extra pass, q(z_t | x) from a
    bidirectional pass."""

    name = "cgd"
    passes = ("extra", "full")

    def __init__(self, backbone, tokenizer, config: SegmentLatentConfig):
        super().__init__(backbone, tokenizer, config)
        hidden, size = backbone.hidden_size, config.latent_size
        self.prior_head = nn.Linear(hidden, 2 * size)
        self.posterior_head = nn.Linear(hidden, 2 * size)

    def chains(self, states, layout):
        slots = layout.slots
        prior = SegmentChain(self.prior_head(states["before"]), slots)
        posterior = SegmentChain(self.posterior_head(states["full"][:, layout.offset :]), slots)
        return posterior, prior

    def next_prior(self, before, previous, first):
        return DiagonalGaussian(*self.prior_head(before).float().chunk(2, dim=-1))
