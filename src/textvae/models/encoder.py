"""The posterior's text encoder: the backbone run with a bidirectional mask, then a pooling
of every requested layer's hidden states over the non-pad positions: a learned attention
pooling (the default), the first token's state (the DELLA paper's "hidden state of the first
token" / "state of a special token": the BOS position), or the mean.

Both papers share the encoder's weights with the decoder (`share_encoder: true`); with
`share_encoder: false` the encoder is a separate copy of the backbone made at construction,
before any latent injection, so it never carries decoder-side wrappers. On an encoder-decoder
backbone the text encoder is the backbone's own encoder (BART's, run under the same masks),
already separate from the decoder, as in the DELLA paper's summarisation and paraphrase setup.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from textvae.backbone import masks
from textvae.backbone.backbone import Backbone
from textvae.errors import TextVAEError


class AttentionPooling(nn.Module):
    """score_t = w · h_t, softmax over the non-pad positions, weighted sum of h_t; one w per
    pooled layer. The scores start at zero, i.e. as mean pooling."""

    def __init__(self, hidden_size: int, num_states: int):
        super().__init__()
        self.score = nn.Parameter(torch.zeros(num_states, hidden_size))

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """hidden: [B, S, T, H] (S pooled states), attention_mask: [B, T] -> [B, S, H]."""
        scores = torch.einsum("bsth,sh->bst", hidden.float(), self.score.float())
        scores = scores.masked_fill(~attention_mask.bool()[:, None, :], float("-inf"))
        weights = torch.softmax(scores, dim=-1).to(hidden.dtype)
        return torch.einsum("bst,bsth->bsh", weights, hidden)


class FirstTokenPooling(nn.Module):
    """The state of each text's first real position (its BOS): no parameters."""

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """hidden: [B, S, T, H], attention_mask: [B, T] -> [B, S, H]."""
        first = attention_mask.long().argmax(-1)  # padding may sit on either side
        index = first[:, None, None, None].expand(-1, hidden.shape[1], 1, hidden.shape[-1])
        return hidden.gather(2, index)[:, :, 0]


class MeanPooling(nn.Module):
    """The mean state over the real positions: no parameters."""

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """hidden: [B, S, T, H], attention_mask: [B, T] -> [B, S, H]."""
        weights = attention_mask.to(hidden.dtype)
        return torch.einsum("bt,bsth->bsh", weights, hidden) / weights.sum(-1)[:, None, None]


POOLINGS = ("attention", "first", "mean")


def make_pooling(kind: str, hidden_size: int, num_states: int) -> nn.Module:
    """One of POOLINGS for `num_states` pooled layers of width `hidden_size`."""
    if kind == "attention":
        return AttentionPooling(hidden_size, num_states)
    if kind == "first":
        return FirstTokenPooling()
    if kind == "mean":
        return MeanPooling()
    raise TextVAEError(f"model.pooling must be one of {', '.join(POOLINGS)}, got {kind!r}")


class TextEncoder(nn.Module):
    """Pooled bidirectional states of layers `layers` (1-based; L = the final, normalised one)."""

    def __init__(self, backbone: Backbone, layers: list[int], share: bool = True, pooled: bool = True,
                 normalize: bool = False, pooling: str = "attention"):
        super().__init__()
        # Pre-norm backbones (GPT-2, Llama) hand out un-normalised residual streams below the top
        # layer; their scale grows with depth (SmolLM2: rms 2 -> 35, single entries near 700), too
        # large for a freshly initialised posterior. `normalize` layer-normalises every position's
        # state (no parameters) before pooling.
        self.normalize = normalize
        if not layers or min(layers) < 1 or max(layers) > backbone.num_layers:
            raise TextVAEError(f"encoder layers must lie in 1..{backbone.num_layers}, got {layers}")
        self.layers = list(layers)
        # segment-wise models read states at given positions and need no pooling
        self.pooling = make_pooling(pooling, backbone.hidden_size, len(self.layers)) if pooled else None
        self.own_backbone = None
        if not share and backbone.is_encoder_decoder:
            raise TextVAEError("model.share_encoder=false is for decoder-only backbones: an encoder-decoder "
                               "backbone's posterior already reads its own encoder")
        if not share and not backbone.has_encoder_adapter:  # with LoRA: its own adapter over the same base
            self.own_backbone = copy.deepcopy(backbone)
            self.own_backbone.causal_lm.lm_head = nn.Identity()  # an encoder needs no LM head

    def states(
        self, backbone: Backbone, input_ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Hidden states [B, S, T, H] of the requested layers under a [B, 1, T, T] `mask`, run
        with the decoder's `backbone` (or the encoder's own copy); each position's state
        layer-normalised when `normalize`."""
        body = self.own_backbone if self.own_backbone is not None else backbone
        with body.encoder_pass():
            stacked = self._states(body, input_ids, mask, position_ids)
        return F.layer_norm(stacked, stacked.shape[-1:]) if self.normalize else stacked

    def _states(self, body: Backbone, input_ids, mask, position_ids) -> torch.Tensor:
        if body.is_encoder_decoder:  # BART's encoder; it numbers positions itself
            states = body.encoder_states(input_ids, mask)
            return torch.stack([states[body.encoder_layer(layer)] for layer in self.layers], dim=1)
        if self.layers == [body.num_layers]:
            return body(input_ids, mask, position_ids=position_ids).hidden[:, None]
        out = body(input_ids, mask, position_ids=position_ids, output_hidden_states=True)
        return torch.stack([out.hidden_states[layer] for layer in self.layers], dim=1)

    def forward(self, backbone: Backbone, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Bidirectional encoding of [B, T] token ids, pooled over real tokens -> [B, S, H]."""
        states = self.states(backbone, input_ids, masks.bidirectional(attention_mask))
        return self.pooling(states, attention_mask)
