"""DELLA: layer-wise latent variables fused into every decoder layer by a low-rank tensor
product (DELLA paper section 4).

    latent layers  l = latent_begin .. latent_end (1-based; default every layer)
    summary        s_l = tanh(A_l s_{l-1} + B_l z_{l-1}),  s = 0 at the first latent layer
    prior          p(z_first) = N(0, I);  [mu, log sigma^2] = P_l s_l above it
    posterior      [mu, log sigma^2] = Q_l [s_l ; x_l],  x_l = pooled encoder state of layer l,
                   each position layer-normalised first (`state_norm`; false: the paper's raw states)
    KL             sum over layers of KL(q(z_l | z_<l, x) || p(z_l | z_<l)) at the sampled z_<l
    fusion         every value vector v of decoder layer l becomes a fusion of v and z_l
                   (fusion.py: the rank-r tensor product, Eq. 9 as printed, or additive)
    conditional    (section 4.4, .jsonl data) posterior and prior also read c_l, the pooled
                   encoder state of the source: Q_l [s_l; x_l; c_l], P_l [s_l; c_l]

Ablations (config): `fusion: add` (v' = v + W z_l, the -LTP row), `layerwise: false` (one
latent, inferred from the top latent layer, fused into every layer: -LW), `latent_begin/latent_end`,
`independent: true` (no s_l, every prior N(0, I): "Separate"), `kl_layers: first | last`
(penalise one layer's KL only), `ltp_init: random` (the released code's initialisation,
normal(0, 0.02) weights and zero biases, instead of the identity v' = v), `pooling: first`
(x_l is the first token's state, as in the paper; default: attention pooling) and
`kl_reduction: mean` (the released code averages the KL over layers; the reported KL is
always the sum, the true KL of the chain).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from textvae.backbone import masks
from textvae.backbone.inject import Injection, inject_value_fusion
from textvae.data.batching import Batch, pad_rows
from textvae.errors import TextVAEError
from textvae.latent.regularizers import BagOfWords, thresholded_kl
from textvae.models.base import ImportanceWeights, Output, TextVAE
from textvae.models.della.chain import LatentChain, LayerwiseLatents
from textvae.models.della.config import DellaConfig
from textvae.models.della.fusion import make_fusion
from textvae.models.encoder import AttentionPooling, TextEncoder


class Della(TextVAE):
    name = "della"
    config_class = DellaConfig
    latent_groups = "layer"

    def __init__(self, backbone, tokenizer, config: DellaConfig):
        super().__init__(backbone, tokenizer, config)
        end = config.latent_end or backbone.num_layers
        if end > backbone.num_layers or config.latent_begin > end:
            raise TextVAEError(f"model.latent_begin..latent_end = {config.latent_begin}..{end} must lie in the "
                               f"backbone's layers 1..{backbone.num_layers}")
        self.latent_layers = list(range(config.latent_begin, end + 1))  # fused layers, 1-based
        # layers whose pooled encoder state infers a latent: all of them, or the top one (-LW)
        self.inference_layers = self.latent_layers if config.layerwise else self.latent_layers[-1:]
        size = config.latent_size
        self.conditional = bool(config.conditional)
        if self.conditional and config.pooling == "first":  # the first token belongs to the source
            raise TextVAEError("model.pooling=first is for unconditional DELLA: on a conditional run the first token is the source's")
        self.encoder = TextEncoder(backbone, layers=self.inference_layers, share=config.share_encoder,
                                   normalize=config.state_norm, pooling=config.pooling)
        if self.conditional:  # c_l: pooled over the source prefix of the same encoder pass
            self.condition_pooling = AttentionPooling(backbone.hidden_size, len(self.inference_layers))
        self.latents = LayerwiseLatents(len(self.inference_layers), size, backbone.hidden_size, config.independent, self.conditional)
        fusions: list[nn.Module | None] = [None] * backbone.num_layers
        for layer in self.latent_layers:
            fusions[layer - 1] = make_fusion(config.fusion, config.ltp_form, backbone.value_size, size, config.rank, config.ltp_init)
        inject_value_fusion(backbone, fusions)  # the wrappers own the fusions' parameters
        self.bag_of_words = BagOfWords(size * len(self.inference_layers), tokenizer.vocab_size) if config.bow_weight else None

    @property
    def latent_group_sizes(self) -> list[int]:
        return [self.config.latent_size] * len(self.inference_layers)

    # --- the two distributions ---------------------------------------------------------
    def encode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pooled per-layer states [B, n, H] of the text x and (conditional) of the source c.

        Conditional: one encoder pass where the prefix ([BOS] source [SEP]) sees only itself
        and the target sees everything; c is pooled over the prefix, x over the whole text."""
        if not self.conditional:
            return self.encoder(self.backbone, batch.input_ids, batch.attention_mask), None
        segments = batch.target_mask.long()  # 0: prefix, 1: target
        states = self.encoder.states(self.backbone, batch.input_ids, masks.block(segments, batch.attention_mask, "extra"))
        prefix = batch.attention_mask.bool() & ~batch.target_mask
        return self.encoder.pooling(states, batch.attention_mask), self.condition_pooling(states, prefix)

    def posterior(self, batch: Batch) -> LatentChain:
        """q(z_1..z_n | x[, c]), the chain over the n latent layers: its samples are [B, nP]."""
        return self.latents.posterior(*self.encode(batch))

    def prior(self, batch: Batch) -> LatentChain:
        """p(z_1..z_n[ | c]): the chain of prior heads (standard normals when independent), [B, nP]."""
        condition = self.encode(batch)[1] if self.conditional else None
        return self.latents.prior(batch.size, batch.input_ids.device, condition)

    def _distributions(self, batch: Batch) -> tuple[LatentChain, LatentChain]:
        """Posterior and prior from one encoder pass."""
        text, condition = self.encode(batch)
        return self.latents.posterior(text, condition), self.latents.prior(batch.size, batch.input_ids.device, condition)

    # --- the decoder -----------------------------------------------------------------
    def injection(self, z: torch.Tensor) -> Injection:
        """z [B, nP] -> one latent per decoder layer for the value fusions (None elsewhere)."""
        parts = z.split(self.config.latent_size, dim=-1)
        if not self.config.layerwise:
            parts = parts * len(self.latent_layers)  # the one latent goes to every fused layer
        per_layer: list[torch.Tensor | None] = [None] * self.backbone.num_layers
        for layer, part in zip(self.latent_layers, parts, strict=True):
            per_layer[layer - 1] = part
        return Injection(value_latents=per_layer)

    def decoder_nll(self, batch: Batch, z: torch.Tensor) -> torch.Tensor:
        """-log p(x | z) of each example's targets: z [B, nP] -> [B]."""
        hidden = self.backbone(batch.decoder_inputs, batch.attention_mask, injection=self.injection(z)).hidden
        return self.target_nll(hidden, batch)

    def sample_prior_latent(self, prompts: list[list[int]], device: torch.device) -> torch.Tensor:
        """z ~ p(z) per prompt, or p(z | c) with c the prompt ([BOS] source [SEP]): [N, nP]."""
        if not self.conditional:
            return self.latents.prior(len(prompts), device).rsample()
        ids, mask = pad_rows(prompts, self.tokenizer.pad_id, device)
        states = self.encoder.states(self.backbone, ids, masks.bidirectional(mask))
        return self.latents.prior(len(prompts), device, self.condition_pooling(states, mask)).rsample()

    def decoding_state(self, latent: torch.Tensor) -> list:
        """Decoding feeds one token at a time: map each z_l to its fusion's gates once per
        sequence instead of at every step (`LowRankTensorFusion.prepare`); per layer, None
        where there is no fusion."""
        per_layer = self.injection(latent).value_latents
        return [None if z is None else self._fusion(layer).prepare(z) for layer, z in enumerate(per_layer)]

    def step_injection(self, state: list) -> Injection:
        return Injection(value_latents=state)

    def _fusion(self, layer: int) -> nn.Module:
        return self.backbone.fusion_wrapper(layer).fusion  # the wrapper owns it

    # --- objective and bounds ----------------------------------------------------------
    def forward(self, batch: Batch, beta: float = 1.0) -> Output:
        posterior, prior = self._distributions(batch)
        z = posterior.rsample()
        rec = self.decoder_nll(batch, z)
        kl_per_dim = torch.stack(  # [B, n, P], each layer at the sampled z_<l
            [q.kl_per_dim(p) for (q, _), (p, _) in zip(posterior.layers_along(z), prior.layers_along(z))], dim=1
        )
        kl_groups = kl_per_dim.sum(-1)
        penalised = thresholded_kl(kl_per_dim, self.config.kl_threshold)  # [B, n]
        if self.config.kl_layers == "first":
            penalised = penalised[:, :1]
        elif self.config.kl_layers == "last":
            penalised = penalised[:, -1:]
        penalty = penalised.mean(1) if self.config.kl_reduction == "mean" else penalised.sum(1)
        loss = rec + beta * penalty
        # per-layer KL in the training log (metrics.jsonl, TensorBoard), named by backbone layer
        logs = {f"kl_layer_{layer}": value for layer, value in zip(self.inference_layers, kl_groups.detach().mean(0))}
        if self.bag_of_words is not None:
            bow = self.bag_of_words(z, batch.input_ids, batch.target_mask)
            loss = loss + self.config.bow_weight * bow
            logs["bow"] = bow.mean()
        return Output(loss=loss.mean(), rec=rec, kl=kl_groups.sum(1), kl_groups=kl_groups, z=z, logs=logs)

    def importance_sampler(self, batch: Batch) -> Callable[[int], ImportanceWeights]:
        """log p(x | z_i) and log p(z_i) - log q(z_i | x) along the chain, z_i ~ q(z | x):
        [B, n] each; one group per latent layer."""
        posterior, prior = self._distributions(batch)
        groups = torch.full((batch.size,), float(len(self.inference_layers)), device=batch.input_ids.device)

        def draw(n: int) -> ImportanceWeights:
            z = posterior.rsample(n)  # [B, n, nP]
            repeated = batch.select(torch.arange(batch.size, device=z.device).repeat_interleave(n))
            log_px_z = -self.decoder_nll(repeated, z.flatten(0, 1)).view(batch.size, n)
            return ImportanceWeights(log_px_z, prior.log_prob(z) - posterior.log_prob(z), groups)
        return draw
