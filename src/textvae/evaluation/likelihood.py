"""Likelihood metrics. Conventions (docs/metrics.md):

* tokens counted: each target's tokens and its EOS; never BOS, padding or a source prefix;
* log p(x) ~= logsumexp_i log_weights_i - log k over k posterior samples (exact for the LM);
* `nll`: mean over examples of -log p(x), in nats; `ppl` = exp(total -log p(x) / total tokens).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from textvae.data.batching import Encoded, collate, eval_batches
from textvae.models.base import TextVAE


@torch.no_grad()
def log_marginal(model: TextVAE, batch, k: int, chunk: int = 20) -> torch.Tensor:
    """Importance-weighted log p(x) of each example: [B]. Samples are drawn `chunk` at a time
    so memory stays bounded for large k."""
    if not model.has_latent:
        return model.log_weights(batch, 1)[:, 0]
    parts = [model.log_weights(batch, min(chunk, k - start)) for start in range(0, k, chunk)]
    return torch.logsumexp(torch.cat(parts, dim=1), dim=1) - math.log(k)


@torch.no_grad()
def evaluate_likelihood(
    model: TextVAE,
    data: list[Encoded],
    batch_size: int = 32,
    iw_samples: int = 100,
    bf16: bool = False,
) -> dict:
    """PPL, NLL, token and example counts of `model` on `data`."""
    model.eval()
    device = next(model.parameters()).device
    total_nll, tokens = 0.0, 0
    for rows in eval_batches([len(item.ids) for item in data], batch_size):
        batch = collate([data[i] for i in rows], model.tokenizer.pad_id).to(device)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        with autocast:
            log_px = log_marginal(model, batch, iw_samples)
        total_nll -= float(log_px.double().sum())
        tokens += int(batch.target_mask.sum())
    return {
        "ppl": math.exp(total_nll / tokens),
        "nll": total_nll / len(data),
        "tokens": tokens,
        "examples": len(data),
    }
