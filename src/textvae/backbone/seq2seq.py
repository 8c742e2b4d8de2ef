"""An encoder-decoder (BART family) backbone behind the interface of the decoder-only `Backbone`.

Models lay out a conditional example the same way for every backbone (data/batching.py):

    [BOS] source... [SEP] target... [EOS]

`Seq2SeqBackbone.forward` takes that layout and splits each row at its first [SEP]: the
encoder reads `[BOS] source [SEP]` bidirectionally, the decoder reads `[SEP] target...` (the
[SEP] is its start token) and attends to the source through encoder-decoder attention (kept,
as the DELLA paper does for summarisation and paraphrase). Decoder states come back at their
layout positions, so the shared `target_nll` scores the same tokens as on a decoder-only
backbone; source positions hold zeros and are never scored. Models therefore need no
encoder-decoder code of their own.

Latent injection points are the decoder's: input embeddings (`embed_offset`), one memory
key/value position in each decoder self-attention (`memory`), the value projection of each
decoder self-attention (`v_proj`, wrapped by `inject_value_fusion`) and the last hidden state
(`head_offset`). The posterior's text encoder reads `encoder_states`: BART's encoder under
any [B, 1, T, T] mask (models/encoder.py).

BART numbers decoder positions from the self-attention cache length, so a memory position
shifts the decoder's positions by one; training, scoring and generation all see the same
shift. `position_ids` are accepted for interface compatibility and ignored.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache, PreTrainedModel

from textvae.backbone import masks
from textvae.backbone.adapters import merged_adapter
from textvae.backbone.backbone import BackboneOutput
from textvae.backbone.inject import NO_INJECTION, Injection, InjectionPoints, memory_cache
from textvae.errors import TextVAEError


@dataclass
class SourceContext:
    """The encoder's reading of a batch of sources."""

    states: tuple[torch.Tensor, ...]  # L_enc + 1 hidden states [B, S, H] (embeddings first)
    mask: torch.Tensor  # [B, S] long, 1 on real source tokens

    @property
    def last(self) -> torch.Tensor:
        return self.states[-1]

    def select(self, rows: torch.Tensor) -> "SourceContext":
        """The contexts of `rows` (e.g. a source repeated for samples or beams)."""
        return SourceContext(tuple(state[rows] for state in self.states), self.mask[rows])


class SourceCache(EncoderDecoderCache):
    """The decoder's self- and cross-attention cache, plus the sources it reads: a decoding
    step then needs only its new tokens, and beam reordering moves the sources along."""

    source: SourceContext | None = None

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.source is not None:
            self.source = self.source.select(indices)


@dataclass
class LayoutSplit:
    """Where the encoder's and the decoder's tokens sit in a layout batch [B, T]: index maps
    [B, S] / [B, D] into T (right-padded) with their masks."""

    source_index: torch.Tensor
    source_mask: torch.Tensor
    decoder_index: torch.Tensor
    decoder_mask: torch.Tensor

    @classmethod
    def at_separator(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor, sep_id: int) -> "LayoutSplit":
        """Split every row at its first real [SEP] (which both parts keep)."""
        real = attention_mask.bool()
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        first_sep = torch.where((input_ids == sep_id) & real, positions, input_ids.shape[1]).min(1).values
        if bool((first_sep == input_ids.shape[1]).any()):
            raise TextVAEError("an encoder-decoder backbone needs a source in every example ([BOS] source [SEP] target)")
        source_index, source_mask = _compact(real & (positions <= first_sep[:, None]))
        decoder_index, decoder_mask = _compact(real & (positions >= first_sep[:, None]))
        return cls(source_index, source_mask, decoder_index, decoder_mask)

    @staticmethod
    def gather(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """values [B, T, ...] at `index` [B, W] -> [B, W, ...]."""
        expanded = index.view(*index.shape, *([1] * (values.dim() - 2))).expand(*index.shape, *values.shape[2:])
        return values.gather(1, expanded)

    def scatter_decoder(self, states: torch.Tensor, length: int) -> torch.Tensor:
        """Decoder states [B, D, H] back to layout positions [B, length, H] (zeros elsewhere)."""
        states = states * self.decoder_mask[..., None].to(states.dtype)  # padding writes zeros
        index = self.decoder_index[..., None].expand_as(states)
        return states.new_zeros(states.shape[0], length, states.shape[2]).scatter(1, index, states)


def _compact(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions where `keep` [B, T] is true, moved to the front in order: index [B, W]
    (W = the most kept in a row; the rest of a row points at unkept positions) and mask [B, W]."""
    order = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)
    index = order[:, : max(int(keep.sum(1).max()), 1)]
    return index, keep.gather(1, index).long()


class Seq2SeqBackbone(InjectionPoints, nn.Module):
    """An encoder-decoder Hugging Face model (BART) behind `Backbone`'s interface: the source
    before [SEP] goes to its encoder, the target after it to its decoder, so that the models
    built on `Backbone` run on it unchanged."""

    is_encoder_decoder = True

    def __init__(self, seq2seq_lm: PreTrainedModel, sep_id: int):
        super().__init__()
        self.seq2seq_lm = seq2seq_lm
        self.sep_id = sep_id
        family = self.read_shape(seq2seq_lm)
        self.value_parts = (family.attention, family.values)
        self.num_encoder_layers = len(seq2seq_lm.get_encoder().layers)
        self.has_encoder_adapter = False  # BART's encoder is already the posterior's own
        self.base_fingerprint: str | None = None  # of a frozen base (models/registry.py)

    def merged_adapter(self):
        """A context for no-grad float32 passes with the LoRA pairs merged into the base
        weights (the same numbers, faster; backbone/adapters.py)."""
        return merged_adapter(self.seq2seq_lm)

    @property
    def config(self):
        return self.seq2seq_lm.config

    def encoder_pass(self):
        """The posterior reads BART's own encoder: no adapter to switch."""
        return nullcontext()

    def value_projection(self, layer: int) -> tuple[nn.Module, str, int]:
        """(parent module, attribute name, value offset) of decoder layer `layer`'s self-attention."""
        attention, values = self.value_parts
        return self.layers[layer].get_submodule(attention), values, 0

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Decoder token embeddings [B, T, H], BART's embedding scale applied (positions are
        added inside the decoder)."""
        return self.seq2seq_lm.get_decoder().embed_tokens(input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head (with BART's final logits bias): [..., H] -> [..., V]."""
        logits = self.seq2seq_lm.get_output_embeddings()(hidden)
        bias = getattr(self.seq2seq_lm, "final_logits_bias", None)
        return logits + bias.to(logits.dtype) if bias is not None else logits

    def encoder_layer(self, layer: int) -> int:
        """The encoder state read for decoder layer `layer` (1-based): the same depth, scaled
        when the encoder is deeper or shallower than the decoder."""
        return layer * self.num_encoder_layers // self.num_layers

    def encoder_states(self, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every encoder layer's states (L_enc + 1, each [B, T, H]) of `input_ids` [B, T] under
        `mask`: [B, T] padding, or a [B, 1, T, T] boolean may-attend mask."""
        if mask.dim() == 4 and self.attn_implementation != "sdpa":
            mask = masks.to_bias(mask, torch.float32)
        encoder = self.seq2seq_lm.get_encoder()
        return tuple(encoder(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states)

    def encode(self, source_ids: torch.Tensor, source_mask: torch.Tensor) -> SourceContext:
        """Read right-padded sources [B, S] bidirectionally: every encoder layer's states."""
        return SourceContext(self.encoder_states(source_ids, source_mask), source_mask)

    def positions_left(self, prompt_length: int) -> int:
        """How many tokens the decoder may generate after its [SEP] (the prompt's source is the
        encoder's; a memory position shifts the decoder's positions by one)."""
        return self.max_positions - 2

    def new_cache(self, memory: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> SourceCache:
        """An empty cache (self- and cross-attention), or one whose self-attention part holds
        a memory position per decoder layer."""
        return SourceCache(memory_cache(memory, self.config), DynamicCache(config=self.config))

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None,
            injection: Injection, cache: SourceCache | None, output_hidden_states: bool) -> BackboneOutput:
        """`forward`: run layout rows [B, T] (see the module docstring); hidden states [B, T, H] at layout
        positions. With a `cache` that already holds the sources (a decoding step),
        `input_ids` are new decoder tokens only and `attention_mask` is not read (decoder
        tokens are never padding in decoding)."""
        if cache is not None and cache.source is not None:
            mask = torch.ones(input_ids.shape[0], cache.get_seq_length() + input_ids.shape[1],
                              dtype=torch.long, device=input_ids.device)
            return self.run_decoder(input_ids, mask, source=cache.source, injection=injection, cache=cache,
                                    output_hidden_states=output_hidden_states)
        length = input_ids.shape[1]
        if cache is not None:  # decoding's first pass: a memory column may already be cached
            attention_mask = attention_mask[:, cache.get_seq_length():]
        split = LayoutSplit.at_separator(input_ids, attention_mask, self.sep_id)
        source = self.encode(LayoutSplit.gather(input_ids, split.source_index), split.source_mask)
        decoder_mask = split.decoder_mask
        if cache is not None:
            cache.source = source
            decoder_mask = torch.cat([decoder_mask.new_ones(len(decoder_mask), cache.get_seq_length()), decoder_mask], 1)

        def at_decoder(offset):  # per-position offsets follow their tokens
            return LayoutSplit.gather(offset, split.decoder_index) if offset.dim() == 3 else offset

        out = self.run_decoder(
            LayoutSplit.gather(input_ids, split.decoder_index), decoder_mask, source=source,
            injection=injection.map_offsets(at_decoder), cache=cache, output_hidden_states=output_hidden_states,
        )
        states = None
        if out.hidden_states is not None:
            states = tuple(split.scatter_decoder(state, length) for state in out.hidden_states)
        return BackboneOutput(split.scatter_decoder(out.hidden, length), states, out.cache)

    def run_decoder(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        source: SourceContext,
        injection: Injection = NO_INJECTION,
        cache: SourceCache | None = None,
        output_hidden_states: bool = False,
    ) -> BackboneOutput:
        """Run the decoder over right-padded decoder tokens [B, D] reading `source`. With
        `cache`, `attention_mask` covers cached and new positions; with memory (no cache) a
        memory column is prepended."""
        inputs_embeds = self.add_offset(self.embed(input_ids), injection.embed_offset)
        cache, attention_mask = self.with_memory(injection.memory, cache, attention_mask)
        with self.value_latents(injection.value_latents):
            out = self.seq2seq_lm.get_decoder()(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                encoder_hidden_states=source.last,
                encoder_attention_mask=source.mask,
                past_key_values=cache,
                use_cache=cache is not None,
                output_hidden_states=output_hidden_states,
            )
        hidden = self.add_offset(out.last_hidden_state, injection.head_offset)
        return BackboneOutput(hidden, out.hidden_states if output_hidden_states else None, out.past_key_values)
