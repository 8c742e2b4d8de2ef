"""The `TextVAE` interface shared by every model, the plain LM included (docs/architecture.md, "Models").

A model owns a `Backbone` (the Hugging Face decoder it injects latents into) and the run's
`TextTokenizer`. Subclasses implement `forward` and, when they have latents, `posterior`,
`prior`, `importance_sampler` and `injection`; decoding is shared here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from textvae.backbone.backbone import Backbone
from textvae.backbone.inject import NO_INJECTION, Injection
from textvae.data.batching import Batch
from textvae.data.tokenizer import TextTokenizer


LOGIT_ROWS = 4096  # positions projected to the vocabulary at a time (models/base.py token_nll)


@dataclass
class Output:
    """What `forward` returns. Per-example tensors are [B]; `loss` is their batch mean."""

    loss: torch.Tensor  # scalar: mean over the batch of rec + beta * kl (+ regularisers)
    rec: torch.Tensor  # [B] summed token NLL of each example's targets
    kl: torch.Tensor  # [B] total KL of each example (zeros without latents)
    kl_groups: torch.Tensor | None = None  # [B, G] KL per latent group (layer / segment)
    groups_present: torch.Tensor | None = None  # [B, G] bool: which groups exist (segments vary)
    z: Any = None  # the sampled latent(s)
    logs: dict[str, float] = field(default_factory=dict)  # extra scalars to log


@dataclass
class ImportanceWeights:
    """log p(x, z_i) - log q(z_i | x) for k posterior samples z_i, in its two parts."""

    reconstruction: torch.Tensor  # [B, k] log p(x | z_i)
    latent: torch.Tensor  # [B, k] log p(z_i) - log q(z_i | x), summed over the latent groups
    groups: torch.Tensor  # [B] latent groups of each example (layers, present segments; 1 otherwise)

    @staticmethod
    def cat(parts: list["ImportanceWeights"]) -> "ImportanceWeights":
        """The weights of the same examples' samples drawn in several parts, side by side."""
        return ImportanceWeights(torch.cat([part.reconstruction for part in parts], dim=1),
                                 torch.cat([part.latent for part in parts], dim=1), parts[0].groups)

    @property
    def total(self) -> torch.Tensor:
        """[B, k] the true log-weights."""
        return self.reconstruction + self.latent

    @property
    def group_mean(self) -> torch.Tensor:
        """[B, k] log p(x | z_i) + (log p(z_i) - log q(z_i | x)) / groups: the DELLA released
        code's convention (densities averaged over layers); not a bound on log p(x)."""
        return self.reconstruction + self.latent / self.groups[:, None].to(self.latent.dtype)


@dataclass
class DecodeState:
    """Everything a decoding loop carries between steps; rows are sequences (beams included)."""

    cache: Any  # DynamicCache
    attention_mask: torch.Tensor  # [N, cached + new] 2-D mask, memory column included
    next_position: torch.Tensor  # [N] position id of the next token
    latent: Any = None  # model-specific latent tensors, batched along dim 0

    def select(self, index: torch.Tensor) -> "DecodeState":
        """Keep / reorder / repeat rows (beam search, sample expansion)."""
        self.cache.batch_select_indices(index)  # works for reordering and repeating rows too
        return DecodeState(
            self.cache,
            self.attention_mask[index],
            self.next_position[index],
            select_rows(self.latent, index),
        )


class TextVAE(nn.Module):
    name: ClassVar[str]
    config_class: ClassVar[type]
    has_latent: ClassVar[bool] = True
    supports_encoder_decoder: ClassVar[bool] = True  # runs on `Seq2SeqBackbone` (BART) too
    # what one latent group is: "single" (one vector per text), "layer" (DELLA: one per
    # decoder layer) or "segment" (TRACE and its baselines: one per segment); None without latents
    latent_groups: ClassVar[str | None] = "single"
    segmenter = None  # segment-wise models: how a text is cut into segments (data/segment.py)

    def __init__(self, backbone: Backbone, tokenizer: TextTokenizer, config):
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.config = config

    def added_parameters(self) -> list[nn.Parameter]:
        """What this model adds to its backbone (posterior and prior heads, fusions, memory
        maps, TRACE's heads): every parameter but the backbone's own (base, adapters, new token
        rows). `train.added_lr` trains these at their own learning rate."""
        own = {id(parameter) for parameter in self.backbone.parameters()}
        own -= {id(parameter) for parameter in self.backbone.injected_parameters()}
        return [parameter for parameter in self.parameters() if id(parameter) not in own]

    # --- training and scoring -------------------------------------------------------
    def forward(self, batch: Batch, beta: float = 1.0) -> Output:
        raise NotImplementedError

    @property
    def latent_group_sizes(self) -> list[int]:
        """Sizes of the latent groups (layers, segments) that make up z's last dimension."""
        return [self.config.latent_size]

    def posterior(self, batch: Batch):
        """q(z | x) for every example, as an object with `rsample(num)`, `log_prob(z)` and
        `mean` over all latent groups (z: [B, D] or [B, k, D], D = all groups concatenated).
        `log_prob` also scores latents drawn for other examples, which MI needs."""
        raise NotImplementedError(f"{self.name} has no latent variables")

    def prior(self, batch: Batch):
        """p(z) (or p(z | condition)) for every example, with the same interface."""
        raise NotImplementedError(f"{self.name} has no latent variables")

    def importance_sampler(self, batch: Batch) -> Callable[[int], ImportanceWeights]:
        """A function drawing n posterior samples z_i for every example of `batch` and returning
        their `ImportanceWeights` [B, n]. What every draw shares (the posterior, the encoder's
        passes, a decoder body that z does not change) is computed once, when it is made."""
        raise NotImplementedError(f"{self.name} has no importance sampler")

    def importance_weights(self, batch: Batch, k: int, chunk: int | None = None) -> ImportanceWeights:
        """The two parts of log p(x, z_i) - log q(z_i | x) for k posterior samples z_i, [B, k].
        The decoder scores `chunk` samples of every example at a time (all k when None): memory
        grows with B x chunk, not with k. The samples are drawn chunk by chunk, as separate calls
        of `chunk` samples each would draw them from the same seed."""
        step = k if chunk is None else chunk
        if k < 1 or step < 1:
            raise ValueError(f"importance_weights needs k >= 1 and chunk >= 1, got k={k}, chunk={chunk}")
        draw = self.importance_sampler(batch)
        return ImportanceWeights.cat([draw(min(step, k - start)) for start in range(0, k, step)])

    def log_weights(self, batch: Batch, k: int) -> torch.Tensor:
        """[B, k] log p(x, z_i) - log q(z_i | x) for k posterior samples z_i."""
        return self.importance_weights(batch, k).total

    def target_nll(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Summed NLL of each example's target tokens. hidden: [B, T, H] -> [B]."""
        return self.token_nll(hidden, batch).sum(1)

    def token_nll(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        """NLL of each target token: hidden [B, T, H] -> [B, T - 1], entry t for the token at
        position t + 1 (which position t predicts), 0 where no target is scored.

        Only scored targets are projected to the vocabulary.
        """
        scored = batch.target_mask[:, 1:]
        states, targets = hidden[:, :-1][scored], batch.input_ids[:, 1:][scored]  # [N, H], [N]
        # in slices: [N, V] float32 logits of a 49k vocabulary are GBs at evaluation's k x batch rows
        token_nll = torch.cat([
            F.cross_entropy(self.backbone.logits(part).float(), part_targets, reduction="none")
            for part, part_targets in zip(states.split(LOGIT_ROWS), targets.split(LOGIT_ROWS))
        ]) if len(targets) else hidden.new_zeros(0, dtype=torch.float32)
        return torch.zeros(scored.shape, device=hidden.device).masked_scatter_(scored, token_nll)

    # --- decoding (see generation/decode.py) -------------------------------------------
    def injection(self, latent: Any) -> Injection:
        """What feeds `latent` to the decoder (nothing for the LM)."""
        return NO_INJECTION

    def prompt_injection(self, latent: Any, prompt_ids: torch.Tensor) -> Injection:
        """The injection of decoding's prompt pass [N, T] (by default the same at every
        position; segment-wise models keep a source prefix latent-free)."""
        return self.injection(latent)

    def latent_to_groups(self, z: torch.Tensor) -> torch.Tensor:
        """A latent from `posterior(...).rsample` [..., D] in the grouped layout [..., G, P] of
        `LatentGroups` (groups: the single latent, layers, segments)."""
        sizes = self.latent_group_sizes
        return z.unflatten(-1, (len(sizes), sizes[0]))

    def latent_from_groups(self, z: torch.Tensor) -> torch.Tensor:
        """The inverse of `latent_to_groups`: [..., G, P] -> the model's own layout."""
        return z.flatten(-2)

    def decoding_latent(self, z: torch.Tensor, present: torch.Tensor, prompts: list[list[int]], device) -> Any:
        """What `decode` carries to decode from given latents z [N, G, P] (`present` [N, G]
        marks each row's groups), one row per prompt."""
        return self.latent_from_groups(z.to(device))

    def sample_prior_latent(self, prompts: list[list[int]], device: torch.device) -> Any:
        """Latents drawn from the prior, one per prompt (token ids; a conditional model's
        prior reads them). None for the LM."""
        return None

    def decoding_state(self, latent: Any) -> Any:
        """What decoding carries per row after the prompt pass (`DecodeState.latent`): by
        default the latent itself; a model may precompute what every step reuses."""
        return latent

    def step_injection(self, state: Any) -> Injection:
        """The injection of one decoding step from `decoding_state`'s value."""
        return self.injection(state)

    @torch.no_grad()
    def decode_start(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, latent: Any) -> tuple[torch.Tensor, DecodeState]:
        """Run left-padded prompts [N, T]; returns next-token logits [N, V] and the state."""
        injection = self.prompt_injection(latent, prompt_ids)
        cache = self.backbone.new_cache(injection.memory)  # the memory positions live in the cache from here on
        mask = prompt_mask
        if injection.memory is not None:
            mask = torch.cat([prompt_mask.new_ones(prompt_mask.shape[0], 1), prompt_mask], dim=1)
        positions = (prompt_mask.cumsum(1) - 1).clamp(min=0)
        out = self.backbone(prompt_ids, mask, position_ids=positions, cache=cache, injection=injection.without_memory())
        state = DecodeState(out.cache, mask, positions[:, -1] + 1, self.decoding_state(latent))
        return self.backbone.logits(out.hidden[:, -1]).float(), state

    @torch.no_grad()
    def decode_next(self, state: DecodeState, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row [N]; returns next-token logits [N, V] and advances `state`."""
        state.attention_mask = torch.cat([state.attention_mask, state.attention_mask.new_ones(len(tokens), 1)], 1)
        # a row that has run out of positions is finished and only fed padding EOS while others go on
        positions = state.next_position.clamp(max=self.backbone.max_positions - 1)
        out = self.backbone(
            tokens[:, None],
            state.attention_mask,
            position_ids=positions[:, None],
            cache=state.cache,
            injection=self.step_injection(state.latent).without_memory(),  # memory: already in the cache
        )
        state.next_position = state.next_position + 1
        return self.backbone.logits(out.hidden[:, -1]).float()


def select_rows(latent: Any, index: torch.Tensor) -> Any:
    """Index dim 0 of a latent that is a tensor or a (nested) list/tuple/dict of tensors."""
    if latent is None:
        return None
    if isinstance(latent, torch.Tensor):
        return latent[index]
    if isinstance(latent, (list, tuple)):
        return type(latent)(select_rows(item, index) for item in latent)
    if isinstance(latent, dict):
        return {key: select_rows(value, index) for key, value in latent.items()}
    raise TypeError(f"cannot select rows of a latent of type {type(latent).__name__}")
