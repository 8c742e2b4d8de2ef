"""DELLA's latent chain over the decoder layers (section 4.1):

    summary    s_l = tanh(A_l s_{l-1} + B_l z_{l-1}),  s = 0 at the first latent layer
    prior      p(z_first) = N(0, I);  [mu, log sigma^2] = P_l s_l above it
    posterior  [mu, log sigma^2] = Q_l [s_l ; x_l]
    condition  (section 4.4) Q_l [s_l; x_l; c_l], P_l [s_l; c_l]
"""

from __future__ import annotations

import torch
from torch import nn

from textvae.latent.gaussian import DiagonalGaussian
from textvae.latent.interface import LatentGroups


class LatentChain:
    """The prior or the posterior over all latent layers, as one distribution over the
    concatenation z = [z_1; ...; z_n] ([..., n P]) with ancestral structure:

        [mu_l, log sigma_l^2] = terms_l + summary_heads_l(s_l)

    `terms` hold what does not depend on z, [B, 2P] per layer: Q_l's text (and condition)
    part for the posterior, the condition part of a conditional prior, None for N(0, I) at
    the bottom of an unconditional prior. Scoring many latents per example ([B, k, nP]) thus
    never copies them."""

    segment_counts = None  # every latent has the same shape (see SegmentChain.segment_counts)

    def __init__(self, latents: "LayerwiseLatents", terms: list[torch.Tensor] | None, summary_heads, batch: int, device):
        self.latents, self.terms, self.summary_heads = latents, terms, summary_heads
        self.batch, self.device = batch, device

    def layer(self, index: int, summary: torch.Tensor | None) -> DiagonalGaussian:
        """The distribution of latent layer `index` given the summary s of the layers below
        ([..., P]; None at the first layer and for independent layers)."""
        params = None if self.terms is None else self.terms[index].float()
        if summary is not None:
            from_summary = self.summary_heads[index - 1](summary).float()
            if params is None:
                params = from_summary
            else:
                params = (params[:, None] if summary.dim() == 3 else params) + from_summary
        if params is None:  # N(0, I)
            return DiagonalGaussian.standard(self.batch, self.latents.latent_size, self.device)
        return DiagonalGaussian(*params.chunk(2, -1))

    def _summary(self, index: int, summary, below):
        if index == 0 or self.latents.independent:
            return None
        return self.latents.summarise(index, summary, below)

    def rsample(self, num: int | None = None) -> torch.Tensor:
        """Ancestral sample: [B, nP], or `num` per example [B, num, nP]."""
        summary, below, drawn = None, None, []
        for index in range(self.latents.num_latent_layers):
            summary = self._summary(index, summary, below)
            distribution = self.layer(index, summary)
            has_sample_dim = distribution.mean.dim() == 3
            below = distribution.rsample(None if (num is None or has_sample_dim) else num)
            drawn.append(below)
        return torch.cat(drawn, dim=-1)

    def layers_along(self, z: torch.Tensor) -> list[tuple[DiagonalGaussian, torch.Tensor]]:
        """(distribution of z_l given the z_<l read from z, z_l) for every latent layer."""
        parts = z.split(self.latents.latent_size, dim=-1)
        summary, result = None, []
        for index, part in enumerate(parts):
            summary = self._summary(index, summary, parts[index - 1] if index else None)
            result.append((self.layer(index, summary), part))
        return result

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Log density of z [B, nP] or [B, k, nP] along the chain: [B] or [B, k]."""
        return sum(distribution.log_prob(part) for distribution, part in self.layers_along(z))

    def conditional_entropy(self, z: torch.Tensor) -> torch.Tensor:
        """sum_l H(q(z_l | z_<l)) with z_<l read from z [B, nP]: [B] (its mean over z ~ q is
        the chain's entropy)."""
        return sum(distribution.entropy() for distribution, _ in self.layers_along(z))

    def cross_log_prob(self, z: torch.Tensor, owner: "LatentChain") -> torch.Tensor:
        """log q(z_i | x_j) for every example j here and every z_i [B_i, nP]: [B_j, B_i]."""
        return self.log_prob(z[None].expand(self.batch, *z.shape))

    @property
    def activity_means(self) -> torch.Tensor:
        """[B, nP]: one observation of the latent space per example (for AU)."""
        return self.mean

    def grouped(self) -> LatentGroups:
        """Each layer's mean and log-variance given the means of the layers below: [B, n, P]."""
        layers = [distribution for distribution, _ in self.layers_along(self.mean)]
        mean = torch.stack([d.mean.expand(self.batch, -1) for d in layers], dim=1)
        log_var = torch.stack([d.log_var.expand(self.batch, -1) for d in layers], dim=1)
        return LatentGroups(mean, log_var, torch.ones(mean.shape[:2], dtype=torch.bool, device=mean.device))

    @property
    def mean(self) -> torch.Tensor:
        """The chain run on means (each z_<l at its conditional mean): [B, nP]. For AU and
        interpolation; for a non-linear chain it is not exactly E[z]."""
        summary, below, means = None, None, []
        for index in range(self.latents.num_latent_layers):
            summary = self._summary(index, summary, below)
            below = self.layer(index, summary).mean
            means.append(below)
        return torch.cat(means, dim=-1)


class LayerwiseLatents(nn.Module):
    """The small networks of the chain: summaries (A_l, B_l), the prior heads P_l and the
    posterior heads Q_l, each Q_l split into its text part and its summary part; with a
    condition c, extra maps from c_l into both (paper section 4.4)."""

    def __init__(self, num_latent_layers: int, latent_size: int, hidden_size: int, independent: bool, conditional: bool):
        super().__init__()
        self.num_latent_layers, self.latent_size, self.independent = num_latent_layers, latent_size, independent
        above = num_latent_layers - 1  # layers that have latents below them

        def maps(count, inputs, bias=True):
            return nn.ModuleList(nn.Linear(inputs, 2 * latent_size, bias=bias) for _ in range(count))

        self.posterior_from_text = maps(num_latent_layers, hidden_size)
        if conditional:
            self.posterior_from_condition = maps(num_latent_layers, hidden_size, bias=False)
            self.prior_from_condition = maps(num_latent_layers, hidden_size)
        self.prior_heads: nn.ModuleList | None = None  # independent latents: no chain, no summaries
        self.posterior_from_summary: nn.ModuleList | None = None
        if not independent:  # A_l exists from the third latent layer up: s of the first is 0
            self.summary_from_summary = nn.ModuleList(nn.Linear(latent_size, latent_size, bias=False) for _ in range(above - 1))
            self.summary_from_latent = nn.ModuleList(nn.Linear(latent_size, latent_size) for _ in range(above))
            self.prior_heads = maps(above, latent_size)
            self.posterior_from_summary = maps(above, latent_size, bias=False)

    def summarise(self, index: int, summary: torch.Tensor | None, below: torch.Tensor) -> torch.Tensor:
        """s_l = tanh(A_l s_{l-1} + B_l z_{l-1}) for latent layer `index` >= 1: [..., P]."""
        pre = self.summary_from_latent[index - 1](below)
        if summary is not None:
            pre = pre + self.summary_from_summary[index - 2](summary)
        return torch.tanh(pre)

    def posterior(self, text: torch.Tensor, condition: torch.Tensor | None = None) -> LatentChain:
        """q(z | x[, c]) from pooled encoder states [B, n, H] of the latent layers."""
        terms = [head(text[:, index]) for index, head in enumerate(self.posterior_from_text)]
        if condition is not None:
            terms = [term + head(condition[:, index]) for index, (term, head) in enumerate(zip(terms, self.posterior_from_condition))]
        return LatentChain(self, terms, self.posterior_from_summary, text.shape[0], text.device)

    def prior(self, batch: int, device, condition: torch.Tensor | None = None) -> LatentChain:
        """p(z[ | c]); `condition`: pooled encoder states [B, n, H] of the condition."""
        terms = None
        if condition is not None:
            terms = [head(condition[:, index]) for index, head in enumerate(self.prior_from_condition)]
        return LatentChain(self, terms, self.prior_heads, batch, device)
