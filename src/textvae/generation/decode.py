"""Batched decoding with a KV cache: greedy, sampling (temperature, top-k, top-p) and beam search.

The loops only need a model's `decode_start` / `decode_next`, `DecodeState.select` (see
models/base.py) and `backbone.positions_left`, so every model, with or without latents,
decodes the same way.
A model's latent for each sequence travels in the state and follows beam reordering.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from textvae.data.batching import pad_rows
from textvae.errors import TextVAEError
from textvae.models.base import select_rows

STRATEGIES = ("greedy", "sample", "top-k", "top-p", "beam")


@dataclass
class DecodingConfig:
    strategy: str = "top-p"  # greedy | sample | top-k | top-p | beam
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 0.9
    num_beams: int = 4
    length_penalty: float = 1.0  # beam score = sum log p / length ** length_penalty
    max_new_tokens: int = 64

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise TextVAEError(f"decoding must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.temperature <= 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise TextVAEError("need temperature > 0, top-k >= 0 and 0 < top-p <= 1")
        if self.num_beams < 1 or self.max_new_tokens < 1:
            raise TextVAEError("need num-beams >= 1 and max-new-tokens >= 1")


@torch.no_grad()
def decode(
    model,
    prompts: list[list[int]],
    latent: Any,
    config: DecodingConfig,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Continue each prompt; returns the new tokens of each row, EOS excluded.

    `latent` holds one latent per prompt row (batched along dim 0), or None. Generation stops
    at `config.max_new_tokens` or where the backbone runs out of positions: each row at its
    own (its positions count from its first real token, padding takes none), or for beam
    search, whose rows step together, at the longest prompt's.
    """
    device = next(model.parameters()).device
    ids, mask = pad_rows(prompts, model.tokenizer.pad_id, device, left=True)
    rooms = [model.backbone.positions_left(len(prompt)) for prompt in prompts]
    if min(rooms) < 1:
        longest = max(len(prompt) for prompt in prompts)
        raise TextVAEError(f"a prompt of {longest} tokens leaves no room in the backbone's {model.backbone.max_positions} positions")
    if config.strategy == "beam":
        return _beam_search(model, ids, mask, latent, dataclasses.replace(config, max_new_tokens=min(config.max_new_tokens, min(rooms))))
    config = dataclasses.replace(config, max_new_tokens=min(config.max_new_tokens, max(rooms)))
    return _sample_or_greedy(model, ids, mask, latent, config, generator, torch.tensor(rooms, device=device))


def _sample_or_greedy(model, ids, mask, latent, config, generator, rooms: torch.Tensor) -> list[list[int]]:
    """`rooms` [N]: the new tokens each row's positions leave room for."""
    eos = model.tokenizer.eos_id
    logits, state = model.decode_start(ids, mask, latent)
    rows = ids.shape[0]
    finished = torch.zeros(rows, dtype=torch.bool, device=ids.device)
    outputs = []
    for step in range(config.max_new_tokens):
        tokens = choose_tokens(_finite(logits), config, generator)
        tokens = torch.where(finished, torch.full_like(tokens, eos), tokens)
        outputs.append(tokens)
        finished |= (tokens == eos) | (rooms <= step + 1)  # a row out of positions ends here
        if bool(finished.all()) or step + 1 == config.max_new_tokens:  # no pass for a token never chosen
            break
        logits = model.decode_next(state, tokens)
    generated = torch.stack(outputs, dim=1).tolist()
    return [_until_eos(row, eos) for row in generated]


def _finite(logits: torch.Tensor) -> torch.Tensor:
    """The model's next-token scores [N, V], refused when any is NaN or infinite (damaged
    weights, or a diverged run): no token can be chosen from them."""
    if not bool(torch.isfinite(logits).all()):
        raise TextVAEError("the model's next-token scores are not finite (NaN or inf): its weights are damaged or "
                           "its training diverged")
    return logits


def choose_tokens(logits: torch.Tensor, config: DecodingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Pick the next token of each row from logits [N, V] -> [N]."""
    if config.strategy == "greedy":
        return logits.argmax(dim=-1)
    logits = logits / config.temperature
    if config.strategy == "top-k" and 0 < config.top_k < logits.shape[-1]:
        kth = torch.topk(logits, config.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.strategy == "top-p" and config.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first is always kept)
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= config.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probabilities = logits.softmax(dim=-1)
    return torch.multinomial(probabilities, 1, generator=generator)[:, 0]


def _beam_search(model, ids, mask, latent, config) -> list[list[int]]:
    """Beam search with early stopping: a prompt is done once it has `num_beams` finished
    hypotheses. An EOS candidate only finishes a hypothesis when ranked within the beam
    width, so `num_beams=1` follows the greedy path exactly."""
    eos, beams = model.tokenizer.eos_id, config.num_beams
    prompts = ids.shape[0]
    expand = torch.arange(prompts, device=ids.device).repeat_interleave(beams)
    logits, state = model.decode_start(ids[expand], mask[expand], select_rows(latent, expand))
    scores = torch.zeros(prompts, beams, device=ids.device)
    scores[:, 1:] = float("-inf")  # all beams start identical: keep one alive at first
    sequences = [[[] for _ in range(beams)] for _ in range(prompts)]
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(prompts)]
    done = [False] * prompts
    for step in range(config.max_new_tokens):
        log_probs = _finite(logits).log_softmax(dim=-1).view(prompts, beams, -1)
        vocab = log_probs.shape[-1]
        candidates = (scores[:, :, None] + log_probs).view(prompts, -1)
        top_scores, top_index = candidates.topk(2 * beams, dim=-1)
        top_scores, top_index = top_scores.tolist(), top_index.tolist()
        next_rows, next_tokens, next_scores, next_sequences = [], [], [], []
        for prompt in range(prompts):
            live = []
            if not done[prompt]:
                for rank, (score, flat) in enumerate(zip(top_scores[prompt], top_index[prompt])):
                    beam, token = divmod(flat, vocab)
                    if score == float("-inf"):
                        break
                    if token == eos:
                        if rank < beams:
                            hypothesis = sequences[prompt][beam]
                            finished[prompt].append((score / (len(hypothesis) + 1) ** config.length_penalty, hypothesis))
                        continue
                    live.append((score, beam, token))
                    if len(live) == beams:
                        break
                done[prompt] = len(finished[prompt]) >= beams
            if done[prompt] or not live:  # keep shapes: park finished prompts on a dead beam
                done[prompt] = True
                live = [(float("-inf"), 0, eos)] * beams
            while len(live) < beams:
                live.append((float("-inf"), live[0][1], eos))
            for score, beam, token in live:
                next_rows.append(prompt * beams + beam)
                next_tokens.append(token)
                next_scores.append(score)
                next_sequences.append(sequences[prompt][beam] + [token])
        if all(done):
            break
        sequences = [next_sequences[p * beams : (p + 1) * beams] for p in range(prompts)]
        scores = torch.tensor(next_scores, device=ids.device).view(prompts, beams)
        state = state.select(torch.tensor(next_rows, device=ids.device))
        if step + 1 < config.max_new_tokens:
            logits = model.decode_next(state, torch.tensor(next_tokens, device=ids.device))
    results = []
    for prompt in range(prompts):
        if not done[prompt]:  # ran out of length: live beams compete with finished ones
            for beam in range(beams):
                score = float(scores[prompt, beam])
                if score > float("-inf"):
                    finished[prompt].append((score / len(sequences[prompt][beam]) ** config.length_penalty, sequences[prompt][beam]))
        results.append(max(finished[prompt], key=lambda item: item[0])[1] if finished[prompt] else [])
    return results


def _until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def unconditional_prompts(model, count: int) -> list[list[int]]:
    """`count` prompts of [BOS] alone; an encoder-decoder model decodes only from sources."""
    if model.backbone.is_encoder_decoder:
        raise TextVAEError("an encoder-decoder run decodes from sources: pass them (--prompts FILE)")
    return [[model.tokenizer.bos_id]] * count


def source_prompts(tokenizer, sources: list[str], max_source_length: int | None) -> tuple[list[list[int]], int]:
    """`[BOS] source [SEP]` prompts, each source cut to `max_source_length` tokens as in
    training (data/batching.py); also how many sources were cut."""
    prompts, truncated = [], 0
    for ids in tokenizer.encode_batch(sources):
        if max_source_length is not None and len(ids) > max_source_length:
            ids, truncated = ids[:max_source_length], truncated + 1
        prompts.append([tokenizer.bos_id, *ids, tokenizer.sep_id])
    return prompts, truncated


@torch.no_grad()
def generate_texts(
    model,
    num: int,
    config: DecodingConfig,
    seed: int = 0,
    sources: list[str] | None = None,
    max_source_length: int | None = None,
    batch_size: int = 32,
) -> list[str]:
    """`num` texts from the model (latents drawn from its prior), or `num` per source when
    `sources` are given (the decoder reads `[BOS] source [SEP]` as its prompt), in source
    order: texts [i * num, (i + 1) * num) belong to source i. The rows of a batch share one
    random stream, so the texts depend on `seed` and `batch_size` (the default is the
    API's and the CLI's, so `generate` and `evaluate --generate` give the same texts)."""
    tokenizer = model.tokenizer
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    torch.manual_seed(seed)  # latents are drawn with the global generator
    if sources is None:
        prompts = unconditional_prompts(model, num)
    else:
        prompts = [p for p in source_prompts(tokenizer, sources, max_source_length)[0] for _ in range(num)]
    texts = []
    with model.backbone.merged_adapter():  # LoRA folded into the base in float32 (a no-op otherwise)
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            latent = model.sample_prior_latent(chunk, device)
            for tokens in decode(model, chunk, latent, config, generator):
                texts.append(tokenizer.decode(tokens))
    return texts
