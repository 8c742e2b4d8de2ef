"""Latent operations on texts: reconstruct through the posterior, and walk the straight line
between two texts' posterior means, decoding a sentence at every point."""

from __future__ import annotations

import torch

from textvae.data.batching import Encoded, collate
from textvae.errors import TextVAEError
from textvae.generation.decode import DecodingConfig, decode


def _require_latent(model) -> None:
    if not model.has_latent:
        raise TextVAEError(f"model {model.name!r} has no latent variable to encode texts into")
    if hasattr(model, "segmenter"):
        raise TextVAEError(f"model {model.name!r} has one latent per segment; reconstruction and interpolation "
                           "need a single latent path (use generate to sample)")


def _posterior(model, texts: list[str], max_length: int):
    """q(z | x) of each text, read as an unconditional target: [BOS] text [EOS], cut to
    `max_length` tokens."""
    tokenizer = model.tokenizer
    device = next(model.parameters()).device
    items = []
    for text in texts:
        ids = [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id]
        items.append(Encoded(ids[:max_length], 1))
    return model.posterior(collate(items, tokenizer.pad_id).to(device))


def _decode_latents(model, latents: torch.Tensor, config: DecodingConfig, seed: int) -> list[str]:
    tokenizer = model.tokenizer
    generator = torch.Generator(device=latents.device).manual_seed(seed)
    prompts = [[tokenizer.bos_id]] * latents.shape[0]
    return [tokenizer.decode(tokens) for tokens in decode(model, prompts, latents, config, generator)]


@torch.no_grad()
def reconstruct_texts(
    model, texts: list[str], config: DecodingConfig, max_length: int, use_mean: bool = True, seed: int = 0
) -> list[str]:
    """Decode each text from its posterior mean, or from one posterior sample."""
    _require_latent(model)
    model.eval()
    torch.manual_seed(seed)
    posterior = _posterior(model, texts, max_length)
    latents = posterior.mean if use_mean else posterior.rsample()
    return _decode_latents(model, latents, config, seed)


@torch.no_grad()
def interpolate_texts(
    model, text_a: str, text_b: str, points: int, config: DecodingConfig, max_length: int, seed: int = 0
) -> list[tuple[float, str]]:
    """`points` (>= 2) evenly spaced z = (1 - t) mu_a + t mu_b, t from 0 to 1, each decoded."""
    _require_latent(model)
    if points < 2:
        raise TextVAEError("--steps must be >= 2 (the two end points are included)")
    model.eval()
    means = _posterior(model, [text_a, text_b], max_length).mean  # [2, D]
    weights = torch.linspace(0, 1, points, device=means.device)[:, None]
    latents = (1 - weights) * means[0] + weights * means[1]
    texts = _decode_latents(model, latents, config, seed)
    return [(float(t), text) for t, text in zip(weights[:, 0], texts)]
