"""The plain language model: the backbone fine-tuned with cross-entropy (the "GPT-2" row).

It has no latent: KL is zero and log p(x) is exact, so its IW-PPL is its exact PPL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from textvae.data.batching import Batch
from textvae.models.base import ImportanceWeights, Output, TextVAE


@dataclass
class LMConfig:
    name: str = "lm"

    def validate(self) -> None:
        """Nothing to check: the plain LM has no options."""


class LanguageModel(TextVAE):
    name = "lm"
    config_class = LMConfig
    has_latent = False
    latent_groups = None

    def forward(self, batch: Batch, beta: float = 1.0) -> Output:
        hidden = self.backbone(batch.decoder_inputs, batch.attention_mask).hidden
        rec = self.target_nll(hidden, batch)
        return Output(loss=rec.mean(), rec=rec, kl=torch.zeros_like(rec))

    def importance_sampler(self, batch: Batch) -> Callable[[int], ImportanceWeights]:
        """Exact log p(x), computed once and repeated n times: [B, n]; no latent part."""
        log_px = -self.forward(batch).rec
        ones = torch.ones(batch.size, device=log_px.device)

        def draw(n: int) -> ImportanceWeights:
            repeated = log_px[:, None].expand(-1, n)
            return ImportanceWeights(repeated, torch.zeros_like(repeated), ones)
        return draw
