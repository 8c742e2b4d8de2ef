"""An encoder-decoder (BART family) backbone with the decoder-side interface of `Backbone`.

The source is read once by the encoder (`encode`); the decoder then runs like a decoder-only
backbone whose layers also attend to the source (encoder-decoder attention kept, as the DELLA
paper does for summarisation and paraphrase). The latent injection points are the decoder's:
input embeddings (`embed_offset`), one memory key/value position in each decoder
self-attention (`memory`), the value projection of each decoder self-attention (`v_proj`,
wrapped by `inject_value_fusion`) and the last hidden state (`head_offset`).

BART computes decoder positions from the self-attention cache length, so a memory position
shifts the decoder's positions by one; training, scoring and generation all see the same
shift.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache, PreTrainedModel

from textvae.backbone.backbone import BackboneOutput
from textvae.backbone.inject import LatentSites


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


class Seq2SeqBackbone(LatentSites, nn.Module):
    is_encoder_decoder = True

    def __init__(self, seq2seq_lm: PreTrainedModel):
        super().__init__()
        self.seq2seq_lm = seq2seq_lm
        config = seq2seq_lm.config
        if not config.is_encoder_decoder or not hasattr(seq2seq_lm.get_decoder(), "layers"):
            raise ValueError(f"unsupported encoder-decoder family {config.model_type!r}")
        self.family = config.model_type
        self.layers = seq2seq_lm.get_decoder().layers
        self.num_heads = config.decoder_attention_heads
        self.num_kv_heads = config.decoder_attention_heads
        self.hidden_size = config.d_model
        self.max_positions = config.max_position_embeddings
        self.head_dim = self.hidden_size // self.num_heads
        self.num_layers = len(self.layers)
        self.value_size = self.num_kv_heads * self.head_dim
        self.num_encoder_layers = len(seq2seq_lm.get_encoder().layers)

    @property
    def config(self):
        return self.seq2seq_lm.config

    def value_projection(self, layer: int) -> tuple[nn.Module, str, int]:
        """(parent module, attribute name, value offset) of decoder layer `layer`'s self-attention."""
        return self.layers[layer].self_attn, "v_proj", 0

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Decoder token embeddings [B, T, H], BART's embedding scale applied (positions are
        added inside the decoder)."""
        return self.seq2seq_lm.get_decoder().embed_tokens(input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head (with BART's final logits bias): [..., H] -> [..., V]."""
        logits = self.seq2seq_lm.get_output_embeddings()(hidden)
        bias = getattr(self.seq2seq_lm, "final_logits_bias", None)
        return logits + bias.to(logits.dtype) if bias is not None else logits

    def encode(self, source_ids: torch.Tensor, source_mask: torch.Tensor) -> SourceContext:
        """Read the sources [B, S] bidirectionally: every encoder layer's states."""
        out = self.seq2seq_lm.get_encoder()(input_ids=source_ids, attention_mask=source_mask, output_hidden_states=True)
        return SourceContext(tuple(out.hidden_states), source_mask)

    def new_cache(self, memory: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> EncoderDecoderCache:
        """An empty cache (self- and cross-attention), or one whose self-attention part holds
        a memory position per decoder layer."""
        self_attention = DynamicCache(config=self.config)
        for layer, (key, value) in enumerate(memory or []):
            self_attention.update(key, value, layer)
        return EncoderDecoderCache(self_attention, DynamicCache(config=self.config))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        source: SourceContext,
        embed_offset: torch.Tensor | None = None,
        memory: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        value_latents: list[torch.Tensor | None] | None = None,
        head_offset: torch.Tensor | None = None,
        cache: EncoderDecoderCache | None = None,
        output_hidden_states: bool = False,
    ) -> BackboneOutput:
        """Run the decoder over `input_ids` [B, T] reading `source`. With `cache`,
        `attention_mask` covers cached and new positions; with `memory` (no cache) a memory
        column is prepended."""
        inputs_embeds = self.add_offset(self.embed(input_ids), embed_offset)
        cache, attention_mask = self.with_memory(memory, cache, attention_mask)
        with self.value_latents(value_latents):
            out = self.seq2seq_lm.get_decoder()(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                encoder_hidden_states=source.last,
                encoder_attention_mask=source.mask,
                past_key_values=cache,
                use_cache=cache is not None,
                output_hidden_states=output_hidden_states,
            )
        hidden = self.add_offset(out.last_hidden_state, head_offset)
        return BackboneOutput(hidden, out.hidden_states if output_hidden_states else None, out.past_key_values)
