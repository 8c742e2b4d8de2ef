"""What a model feeds its decoder besides the tokens (`Injection`), and the injection points
that live inside the backbone's layers, as module wrappers.

Injections at the model's edges need no wrapper: `Backbone.forward` adds an offset to the
input embeddings (`embed_offset`), prepends per-layer memory key/value positions (`memory`)
and adds an offset to the last hidden state before the LM head (`head_offset`). The value
projection sits inside every attention layer, so it is wrapped, PEFT style:
`inject_value_fusion` replaces each layer's value projection with a `ValueFusion` that owns
its fusion module and reads the current layer's latent, set for the duration of one forward
call from `Injection.value_latents`.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from textvae.backbone.families import Family, family_of


@dataclass
class Injection:
    """Latent inputs of one decoder pass; every part is optional (the LM has none)."""

    embed_offset: torch.Tensor | None = None  # [B, H] or [B, T, H]: added to the input token embeddings
    memory: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer (key, value) [B, KV, 1, D]
    value_latents: list[torch.Tensor | None] | None = None  # per layer [B, P] or None: for the ValueFusion wrappers
    head_offset: torch.Tensor | None = None  # [B, H] or [B, T, H]: added to the last hidden state

    def without_memory(self) -> "Injection":
        """The same injection once its memory positions are in a KV cache."""
        return dataclasses.replace(self, memory=None)

    def map_offsets(self, function) -> "Injection":
        """Apply `function` to the two offsets (where they are not None)."""
        return dataclasses.replace(self, embed_offset=None if self.embed_offset is None else function(self.embed_offset),
                                   head_offset=None if self.head_offset is None else function(self.head_offset))


NO_INJECTION = Injection()


def memory_cache(memory: list[tuple[torch.Tensor, torch.Tensor]] | None, config) -> DynamicCache:
    """A KV cache holding one memory position per layer (empty without memory)."""
    cache = DynamicCache(config=config)
    for layer, (key, value) in enumerate(memory or []):
        cache.update(key, value, layer)
    return cache


class ValueFusion(nn.Module):
    """Wraps a projection whose output ends with the value vectors (`value_start` onward).

    With no latent set (encoder passes, or a model without latents) it is the plain
    projection; with a latent set, the value part becomes `fusion(values, latent)`.
    """

    def __init__(self, projection: nn.Module, fusion: nn.Module, value_start: int):
        super().__init__()
        self.projection = projection
        self.fusion = fusion
        self.value_start = value_start
        self.latent: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.projection(hidden)
        if self.latent is None:
            return out
        if self.value_start == 0:
            return self.fusion(out, self.latent)
        head, values = out[..., : self.value_start], out[..., self.value_start :]
        return torch.cat([head, self.fusion(values, self.latent)], dim=-1)


class InjectionPoints:
    """What every backbone does at its injection points: offsets at the edges, a memory
    column, and the wrapped value projections' latents set around one forward call.
    Needs `config`, `new_cache(memory)`, `value_projection(layer)` and `run` (the forward pass
    itself); `read_shape` sets the sizes every backbone kind shares."""

    def read_shape(self, model) -> Family:
        """Set the family name, the decoder's layers and its sizes (heads, key/value heads,
        hidden, positions, head and value widths) from Hugging Face `model`; returns its
        `Family` (backbone/families.py)."""
        config = model.config
        self.family = config.model_type
        family = family_of(self.family)
        self.layers = model.base_model.get_submodule(family.layers)
        self.num_layers = len(self.layers)
        self.num_heads = getattr(config, family.heads)
        self.num_kv_heads = getattr(config, family.kv_heads, None) or self.num_heads
        self.hidden_size = getattr(config, family.hidden)
        self.max_positions = getattr(config, family.positions)
        self.head_dim = getattr(config, "head_dim", None) or self.hidden_size // self.num_heads
        self.value_size = self.num_kv_heads * self.head_dim
        return family

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                injection: Injection = NO_INJECTION, cache=None, output_hidden_states: bool = False):
        """Run the decoder over `input_ids` [B, T] with `injection`; returns a `BackboneOutput`
        (hidden [B, T, H]). The one signature every backbone kind implements (`run`)."""
        return self.run(input_ids, attention_mask, position_ids, injection, cache, output_hidden_states)

    @property
    def attn_implementation(self) -> str:
        return self.config._attn_implementation

    @staticmethod
    def add_offset(states: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
        """states [B, T, H] + offset ([B, H]: the same at every position, or [B, T, H])."""
        if offset is None:
            return states
        return states + (offset[:, None] if offset.dim() == 2 else offset)

    def with_memory(self, memory, cache, attention_mask: torch.Tensor):
        """(cache, attention_mask) for a forward call: with `memory`, a fresh cache holding it
        and a memory column prepended to the mask."""
        if memory is None:
            return cache, attention_mask
        if cache is not None:
            raise ValueError("pass memory either directly or inside the cache, not both")
        ones = attention_mask.new_ones(attention_mask.shape[0], 1)
        return self.new_cache(memory), torch.cat([ones, attention_mask], dim=1)

    @contextmanager
    def value_latents(self, latents: list[torch.Tensor | None] | None):
        """Set each layer's value-fusion latent for the duration of one forward call."""
        if latents is None:
            yield
            return
        wrappers = [self.fusion_wrapper(layer) for layer in range(self.num_layers)]
        try:
            for wrapper, latent in zip(wrappers, latents, strict=True):
                if wrapper is None and latent is not None:
                    raise ValueError("a latent was given for a layer without a value fusion")
                if wrapper is not None:
                    wrapper.latent = latent
            yield
        finally:
            for wrapper in wrappers:
                if wrapper is not None:
                    wrapper.latent = None

    def injected_parameters(self) -> list[nn.Parameter]:
        """The parameters of the latent fusions wrapped into this backbone's layers: what a model
        added, not the backbone's own (its base weights, adapters and new token rows)."""
        wrappers = [self.fusion_wrapper(layer) for layer in range(self.num_layers)]
        return [parameter for wrapper in wrappers if wrapper is not None for parameter in wrapper.fusion.parameters()]

    def fusion_wrapper(self, layer: int) -> ValueFusion | None:
        parent, name, _ = self.value_projection(layer)
        module = getattr(parent, name)
        return module if isinstance(module, ValueFusion) else None


def inject_value_fusion(backbone, fusions: list[nn.Module | None]) -> list[ValueFusion | None]:
    """Wrap the value projection of every layer `l` with `fusions[l]` (None: leave the layer
    as it is); returns the wrappers."""
    if len(fusions) != backbone.num_layers:
        raise ValueError(f"need one fusion (or None) per layer ({backbone.num_layers}), got {len(fusions)}")
    wrappers = []
    for layer, fusion in enumerate(fusions):
        if fusion is None:
            wrappers.append(None)
            continue
        parent, name, value_start = backbone.value_projection(layer)
        projection = getattr(parent, name)
        if isinstance(projection, ValueFusion):
            raise ValueError(f"layer {layer} already has a value fusion")
        wrapper = ValueFusion(projection, fusion, value_start)
        setattr(parent, name, wrapper)
        wrappers.append(wrapper)
    return wrappers


def memory_positions(
    vectors: torch.Tensor, num_layers: int, num_kv_heads: int, head_dim: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split per-example memory vectors into one key/value position per layer.

    vectors: [B, num_layers * 2 * num_kv_heads * head_dim] -> per layer (key, value), each
    [B, num_kv_heads, 1, head_dim], the layout of a Hugging Face KV cache entry.
    """
    batch = vectors.shape[0]
    parts = vectors.view(batch, num_layers, 2, num_kv_heads, 1, head_dim)
    return [(parts[:, layer, 0], parts[:, layer, 1]) for layer in range(num_layers)]
