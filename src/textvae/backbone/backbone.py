"""`Backbone`: one interface over Hugging Face decoder-only models (the families of
backbone/families.py: GPT-2, Llama-style).

It runs the model with
any latent `Injection` (backbone/inject.py: embedding offset, memory key/values, value-fusion
latents, head offset) and attention mask ([B, T] padding mask for causal attention, or a
[B, 1, T, T] boolean mask).

Logits are computed separately (`logits`) so callers project only the positions they score.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from textvae.backbone import masks
from textvae.backbone.adapters import ENCODER, NewTokenRows, active_adapter, merged_adapter
from textvae.backbone.inject import Injection, InjectionPoints, memory_cache


@dataclass
class BackboneOutput:
    hidden: torch.Tensor  # [B, T, H] last hidden state (final norm and head_offset applied)
    hidden_states: tuple[torch.Tensor, ...] | None  # L + 1 states [B, T, H] when requested
    cache: DynamicCache | None


class Backbone(InjectionPoints, nn.Module):
    """A decoder-only Hugging Face causal LM (GPT-2, Llama, SmolLM2) behind one interface:
    `forward(input_ids [B, T], attention_mask [B, T] or [B, T, T], injection=...)` returns its
    final states [B, T, H] (and, when asked, every layer's and the key/value cache), with the
    latents an `Injection` carries added at the points `InjectionPoints` wraps."""

    is_encoder_decoder = False

    def __init__(self, causal_lm: PreTrainedModel):
        super().__init__()
        self.causal_lm = causal_lm
        family = self.read_shape(causal_lm)
        self.value_parts = (family.attention, family.values, family.fused_qkv)
        # set by models/registry.py when the base is frozen (backbone/adapters.py)
        self.new_tokens: NewTokenRows | None = None  # trainable rows of tokens added to a frozen vocabulary
        self.has_encoder_adapter = False  # encoder passes run under their own LoRA adapter
        self.base_fingerprint: str | None = None  # of the frozen base this run trains over

    def encoder_pass(self):
        """A context for the posterior's encoder passes: its own adapter when it has one."""
        return active_adapter(self.causal_lm, ENCODER) if self.has_encoder_adapter else nullcontext()

    def merged_adapter(self):
        """A context for no-grad float32 passes with the decoder's LoRA pairs merged into the
        base weights (the same numbers, faster; backbone/adapters.py)."""
        return merged_adapter(self.causal_lm)

    @property
    def config(self):
        return self.causal_lm.config

    def value_projection(self, layer: int) -> tuple[nn.Module, str, int]:
        """(parent module, attribute name, offset of the values in its output) for `layer`."""
        attention, values, fused_qkv = self.value_parts
        return self.layers[layer].get_submodule(attention), values, 2 * self.hidden_size if fused_qkv else 0

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, T, H] (GPT-2 adds its position embeddings inside the model)."""
        embeddings = self.causal_lm.get_input_embeddings()(input_ids)
        return embeddings if self.new_tokens is None else self.new_tokens.embed(input_ids, embeddings)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head: [..., H] -> [..., V]."""
        head = self.causal_lm.get_output_embeddings()
        return head(hidden) if self.new_tokens is None else self.new_tokens.logits(hidden, head)

    def positions_left(self, prompt_length: int) -> int:
        """How many tokens may follow a prompt of `prompt_length` (a memory position takes none)."""
        return self.max_positions - prompt_length

    def new_cache(self, memory: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> DynamicCache:
        """An empty KV cache, or one holding a memory position per layer."""
        return memory_cache(memory, self.config)

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None,
            injection: Injection, cache: DynamicCache | None, output_hidden_states: bool) -> BackboneOutput:
        """`forward`: run the body. With `cache`, `attention_mask` covers cached and new positions and
        `position_ids` must be given; with memory (no cache) a memory column is prepended."""
        inputs_embeds = self.add_offset(self.embed(input_ids), injection.embed_offset)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand_as(input_ids)
        cache, attention_mask = self.with_memory(injection.memory, cache, attention_mask)
        if attention_mask.dim() == 4 and self.attn_implementation != "sdpa":
            attention_mask = masks.to_bias(attention_mask, torch.float32)
        with self.value_latents(injection.value_latents):
            out = self.causal_lm.base_model(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=cache is not None,
                output_hidden_states=output_hidden_states,
            )
        hidden = self.add_offset(out.last_hidden_state, injection.head_offset)
        return BackboneOutput(hidden, out.hidden_states if output_hidden_states else None, out.past_key_values)
