"""One latent vector per text (DELLA paper section 3.3).

    posterior  q(z | x) = N(mu, diag sigma^2),  [mu, log sigma^2] = W pool(H_L)
    prior      p(z) = N(0, I)
    decoder    p(x | z): the backbone with z injected at one or more places:

    embed    W_e z added to every input embedding           (Li et al., 2020: Optimus' "Embedding")
    memory   W_m^l z as one extra key/value in every layer  (Fang et al., 2021)
    softmax  W_s z added to the last hidden state           (Wang and Wan, 2019)
    optimus  embed + memory, with a per-dimension KL threshold (lambda = 0.5 by default)
    norec    the TRACE paper's "No Recurrence" row: embed under its own name

Loss per example: rec + beta * KL (dimensions under `kl_threshold` not penalised)
+ `bow_weight` * bag-of-words NLL; `mean_bn_gamma` batch-normalises mu with a fixed scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn

from textvae.backbone.inject import Injection, memory_positions
from textvae.data.batching import Batch
from textvae.errors import TextVAEError
from textvae.latent.gaussian import DiagonalGaussian
from textvae.latent.regularizers import BagOfWords, MeanBatchNorm, thresholded_kl
from textvae.models.base import ImportanceWeights, Output, TextVAE
from textvae.models.encoder import POOLINGS, TextEncoder


@dataclass
class SingleLatentConfig:
    name: str = "embed"
    latent_size: int = 32
    share_encoder: bool = True  # encoder = the decoder's weights run bidirectionally
    pooling: str = "attention"  # attention | first | mean: the encoder states' summary (models/encoder.py)
    kl_threshold: float = 0.0  # per-dimension free bits (Optimus' lambda); 0 = off
    bow_weight: float = 0.0  # weight of the bag-of-words loss; 0 = off
    mean_bn_gamma: float | None = None  # batch-norm the posterior mean with this fixed scale

    def validate(self) -> None:
        if self.latent_size < 1:
            raise TextVAEError(f"model.latent_size must be >= 1, got {self.latent_size}")
        if self.pooling not in POOLINGS:
            raise TextVAEError(f"model.pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.kl_threshold < 0 or self.bow_weight < 0:
            raise TextVAEError("model.kl_threshold and model.bow_weight must be >= 0")
        if self.mean_bn_gamma is not None and self.mean_bn_gamma <= 0:
            raise TextVAEError(f"model.mean_bn_gamma must be > 0, got {self.mean_bn_gamma}")


@dataclass
class OptimusConfig(SingleLatentConfig):
    name: str = "optimus"
    kl_threshold: float = 0.5


class SingleLatentVAE(TextVAE):
    """Shared by the single-latent rows; subclasses only name their injection points."""

    injection_points: ClassVar[tuple[str, ...]]
    config_class = SingleLatentConfig

    def __init__(self, backbone, tokenizer, config: SingleLatentConfig):
        super().__init__(backbone, tokenizer, config)
        hidden, latent = backbone.hidden_size, config.latent_size
        self.encoder = TextEncoder(backbone, layers=[backbone.num_layers], share=config.share_encoder, pooling=config.pooling)
        self.posterior_head = nn.Linear(hidden, 2 * latent)
        self.mean_norm = MeanBatchNorm(latent, config.mean_bn_gamma) if config.mean_bn_gamma else None
        if "embed" in self.injection_points:
            self.latent_to_embedding = nn.Linear(latent, hidden, bias=False)
        if "memory" in self.injection_points:
            memory_size = backbone.num_layers * 2 * backbone.value_size
            self.latent_to_memory = nn.Linear(latent, memory_size, bias=False)
        if "softmax" in self.injection_points:
            self.latent_to_head = nn.Linear(latent, hidden, bias=False)
        self.bag_of_words = BagOfWords(latent, tokenizer.vocab_size) if config.bow_weight else None
        # The latent maps start at zero, so the decoder starts as the bare backbone (embed and
        # softmax exactly; memory adds a zero key/value); nn.Linear's default init injects noise
        # far larger than a token embedding (measured in docs/architecture.md).
        for name, module in self.named_children():
            if name.startswith("latent_to_"):
                nn.init.zeros_(module.weight)

    # --- the two distributions ---------------------------------------------------------
    def posterior(self, batch: Batch) -> DiagonalGaussian:
        """q(z | x): mean and log-variance [B, P] (float32)."""
        pooled = self.encoder(self.backbone, batch.input_ids, batch.attention_mask)[:, 0]
        mean, log_var = self.posterior_head(pooled).float().chunk(2, dim=-1)
        if self.mean_norm is not None:
            mean = self.mean_norm(mean)
        return DiagonalGaussian(mean, log_var)

    def prior(self, batch: Batch) -> DiagonalGaussian:
        """p(z) = N(0, I): [B, P]."""
        return DiagonalGaussian.standard(batch.size, self.config.latent_size, batch.input_ids.device)

    # --- the decoder -----------------------------------------------------------------
    def injection(self, z: torch.Tensor) -> Injection:
        """What feeds z [B, P] to the decoder, at this model's injection points."""
        backbone, parts = self.backbone, {}
        if "embed" in self.injection_points:
            parts["embed_offset"] = self.latent_to_embedding(z)
        if "memory" in self.injection_points:
            vectors = self.latent_to_memory(z)
            parts["memory"] = memory_positions(vectors, backbone.num_layers, backbone.num_kv_heads, backbone.head_dim)
        if "softmax" in self.injection_points:
            parts["head_offset"] = self.latent_to_head(z)
        return Injection(**parts)

    def decoder_nll(self, batch: Batch, z: torch.Tensor) -> torch.Tensor:
        """-log p(x | z) of each example's targets: z [B, P] -> [B]."""
        hidden = self.backbone(batch.decoder_inputs, batch.attention_mask, injection=self.injection(z)).hidden
        return self.target_nll(hidden, batch)

    def sample_prior_latent(self, prompts: list[list[int]], device: torch.device) -> torch.Tensor:
        return torch.randn(len(prompts), self.config.latent_size, device=device)

    # --- objective and bounds ----------------------------------------------------------
    def forward(self, batch: Batch, beta: float = 1.0) -> Output:
        posterior, prior = self.posterior(batch), self.prior(batch)
        z = posterior.rsample()
        rec = self.decoder_nll(batch, z)
        kl_per_dim = posterior.kl_per_dim(prior)
        kl = kl_per_dim.sum(-1)
        loss = rec + beta * thresholded_kl(kl_per_dim, self.config.kl_threshold)
        logs = {}
        if self.bag_of_words is not None:
            bow = self.bag_of_words(z, batch.input_ids, batch.target_mask)
            loss = loss + self.config.bow_weight * bow
            logs["bow"] = bow.mean()
        return Output(loss=loss.mean(), rec=rec, kl=kl, z=z, logs=logs)

    def importance_sampler(self, batch: Batch) -> Callable[[int], ImportanceWeights]:
        """log p(x | z_i) and log p(z_i) - log q(z_i | x), z_i ~ q(z | x): [B, n] each."""
        posterior, prior = self.posterior(batch), self.prior(batch)
        ones = torch.ones(batch.size, device=batch.input_ids.device)
        body = None
        if self.injection_points == ("softmax",):  # z only shifts the head: run the body once
            body = self.backbone(batch.decoder_inputs, batch.attention_mask).hidden

        def draw(n: int) -> ImportanceWeights:
            z = posterior.rsample(n)  # [B, n, P]
            rows = torch.arange(batch.size, device=z.device).repeat_interleave(n)
            repeated = batch.select(rows)
            if body is not None:
                log_px_z = -self.target_nll(body[rows] + self.latent_to_head(z.flatten(0, 1))[:, None], repeated)
            else:
                log_px_z = -self.decoder_nll(repeated, z.flatten(0, 1))
            return ImportanceWeights(log_px_z.view(batch.size, n), prior.log_prob(z) - posterior.log_prob(z), ones)
        return draw


class Embed(SingleLatentVAE):
    name = "embed"
    injection_points = ("embed",)


class NoRecurrence(Embed):
    """The TRACE paper's "No Recurrence" row is the embed model under its own name."""

    name = "norec"


class Memory(SingleLatentVAE):
    name = "memory"
    injection_points = ("memory",)


class Softmax(SingleLatentVAE):
    name = "softmax"
    injection_points = ("softmax",)


class Optimus(SingleLatentVAE):
    name = "optimus"
    injection_points = ("embed", "memory")
    config_class = OptimusConfig
