"""DELLA: layer-wise latent variables fused into every decoder layer by a low-rank tensor
product (DELLA paper section 4).

    latent layers  l = latent_begin .. latent_end (1-based; default every layer)
    summary        s_l = tanh(A_l s_{l-1} + B_l z_{l-1}),  s = 0 at the first latent layer
    prior          p(z_first) = N(0, I);  [mu, log sigma^2] = P_l s_l above it
    posterior      [mu, log sigma^2] = Q_l [s_l ; x_l],  x_l = pooled encoder state of layer l,
                   each position layer-normalised first (`state_norm`; false: the paper's raw states)
    KL             sum over layers of KL(q(z_l | z_<l, x) || p(z_l | z_<l)) at the sampled z_<l
    fusion         every value vector v of decoder layer l becomes
                   v' = sum_{j=1..r} (U_j [v; 1]) * (V_j [z_l; 1])   (`ltp_form: lowrank`, default:
                   the true rank-r tensor product of Liu et al. 2018), or Eq. 9 as printed,
                   v' = (sum_j W_v^j [v; 1]) * (sum_j W_z^j [z_l; 1])   (`ltp_form: paper`: a
                   product of sums, which collapses to one gate whatever r is)
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

import math
from dataclasses import dataclass

import torch
from torch import nn

from textvae.backbone import masks
from textvae.backbone.inject import Injection, inject_value_fusion
from textvae.data.batching import Batch, pad_rows
from textvae.errors import TextVAEError
from textvae.latent.gaussian import DiagonalGaussian
from textvae.latent.interface import LatentGroups
from textvae.latent.regularizers import BagOfWords, thresholded_kl
from textvae.models.base import ImportanceWeights, Output, TextVAE
from textvae.models.encoder import POOLINGS, AttentionPooling, TextEncoder


@dataclass
class DellaConfig:
    name: str = "della"
    latent_size: int = 32  # per latent layer
    rank: int = 4  # r of the low-rank tensor product
    share_encoder: bool = True
    state_norm: bool = True  # layer-normalise the per-layer encoder states x_l, c_l (see TextEncoder)
    pooling: str = "attention"  # attention | first | mean: how x_l summarises layer l (models/encoder.py)
    fusion: str = "ltp"  # ltp | add
    ltp_form: str = "lowrank"  # lowrank (sum of r products) | paper (Eq. 9: product of two sums)
    ltp_init: str = "identity"  # identity (v' = v at the start) | random (the released code)
    latent_begin: int = 1  # first layer with a latent (1-based)
    latent_end: int | None = None  # last layer with a latent (default: the top layer)
    independent: bool = False  # Separate: no summary of lower latents, priors N(0, I)
    layerwise: bool = True  # false: the -LW row, one latent (from the top layer) fused into every layer
    kl_layers: str = "all"  # all | first | last: the layers whose KL the loss penalises
    kl_reduction: str = "sum"  # sum | mean over the penalised layers (the reported KL is summed)
    kl_threshold: float = 0.0  # per-dimension free bits; 0 = off
    bow_weight: float = 0.0  # bag-of-words loss from all latents; 0 = off
    conditional: bool | None = None  # CVAE: prior and posterior read the source (None: when the data has one)

    def validate(self) -> None:
        choices = {"fusion": ("ltp", "add"), "ltp_init": ("identity", "random"), "ltp_form": ("lowrank", "paper"),
                   "pooling": POOLINGS,
                   "kl_layers": ("all", "first", "last"), "kl_reduction": ("sum", "mean")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise TextVAEError(f"model.{key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        if self.latent_size < 1 or self.rank < 1 or self.latent_begin < 1:
            raise TextVAEError("model.latent_size, model.rank and model.latent_begin must be >= 1")
        if self.latent_end is not None and self.latent_end < self.latent_begin:
            raise TextVAEError(f"model.latent_end ({self.latent_end}) is below model.latent_begin ({self.latent_begin})")
        if self.kl_threshold < 0 or self.bow_weight < 0:
            raise TextVAEError("model.kl_threshold and model.bow_weight must be >= 0")


class LowRankTensorFusion(nn.Module):
    """v' = sum_j (U_j v + u_j) * g_j with gates g_j = V_j [z; 1]: values [B, T, V], z [B, P].

    Long inputs (training, prompts) apply one per-example matrix W_b = sum_j diag(g_j) U_j to
    all T positions: (r + T) V^2 per example instead of r T V^2. Short inputs (decoding, one
    token a step) use one shared GEMM with the stacked U_j and the gates `prepare`d once."""

    def __init__(self, value_size: int, latent_size: int, rank: int, init: str):
        super().__init__()
        self.rank, self.value_size = rank, value_size
        self.value_maps = nn.Parameter(torch.empty(rank, value_size, value_size))  # U_j (out, in)
        self.value_bias = nn.Parameter(torch.zeros(rank, value_size))  # u_j
        self.gates = nn.Linear(latent_size, rank * value_size)  # V_j [z; 1]
        if init == "random":  # the released code: normal(0, 0.02) weights, zero biases
            released_init(weights=(self.value_maps, self.gates.weight), biases=(self.value_bias, self.gates.bias))
        else:  # U_1 = I, V_1 [z; 1] = 1, the rest 0: v' = v, all parts trainable
            bound = 1 / math.sqrt(value_size)
            nn.init.uniform_(self.value_maps, -bound, bound)  # nn.Linear's default for U_j, j > 1
            with torch.no_grad():
                self.value_maps[0].copy_(torch.eye(value_size))
                nn.init.zeros_(self.gates.weight)
                self.gates.bias.zero_()
                self.gates.bias[:value_size] = 1.0

    def prepare(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What z [B, P] contributes: gates [B, r, V] and the summed bias sum_j g_j u_j [B, V]."""
        gates = self.gates(latent).view(latent.shape[0], self.rank, self.value_size)
        return gates, torch.einsum("brv,rv->bv", gates, self.value_bias.to(gates.dtype))

    def forward(self, values: torch.Tensor, latent) -> torch.Tensor:
        """values [B, T, V]; latent: z [B, P], or `prepare(z)` (decoding reuses it every step)."""
        gates, bias = self.prepare(latent) if isinstance(latent, torch.Tensor) else latent
        gates, bias = gates.to(values.dtype), bias.to(values.dtype)[:, None]
        maps = self.value_maps.to(values.dtype)
        batch, length, _ = values.shape
        if length > self.rank:
            matrices = torch.einsum("brv,rvw->bvw", gates, maps)  # [B, V, V]
            return torch.einsum("btw,bvw->btv", values, matrices) + bias
        projected = (values @ maps.flatten(0, 1).T).view(batch, length, self.rank, self.value_size)
        return (projected * gates[:, None]).sum(2) + bias


class ProductOfSumsFusion(nn.Module):
    """Eq. 9 as printed: v' = (sum_j (W_v^j v + b_v^j)) * (sum_j (W_z^j z + b_z^j)) for values
    [B, T, V], z [B, P]. The sums are taken before the product, so this is one value map times
    one latent gate for any r (r only changes the parametrisation)."""

    def __init__(self, value_size: int, latent_size: int, rank: int, init: str):
        super().__init__()
        self.value_maps = nn.Parameter(torch.empty(rank, value_size, value_size))  # W_v^j (out, in)
        self.value_bias = nn.Parameter(torch.zeros(rank, value_size))
        self.gate_maps = nn.Parameter(torch.empty(rank, value_size, latent_size))  # W_z^j (out, in)
        self.gate_bias = nn.Parameter(torch.zeros(rank, value_size))
        if init == "random":
            released_init(weights=(self.value_maps, self.gate_maps), biases=(self.value_bias, self.gate_bias))
        else:  # sum_j W_v^j = I, sum_j W_z^j z = 0, sum_j b_z^j = 1: v' = v
            with torch.no_grad():
                self.value_maps.zero_()
                self.value_maps[0].copy_(torch.eye(value_size))
                self.gate_maps.zero_()
                self.gate_bias[0] = 1.0

    def prepare(self, latent: torch.Tensor) -> tuple[torch.Tensor]:
        """The gate (sum_j W_z^j) z + sum_j b_z^j: ([B, V],)."""
        return (latent @ self.gate_maps.sum(0).to(latent.dtype).T + self.gate_bias.sum(0).to(latent.dtype),)

    def forward(self, values: torch.Tensor, latent) -> torch.Tensor:
        """values [B, T, V]; latent: z [B, P], or `prepare(z)`."""
        (gate,) = self.prepare(latent) if isinstance(latent, torch.Tensor) else latent
        mapped = values @ self.value_maps.sum(0).to(values.dtype).T + self.value_bias.sum(0).to(values.dtype)
        return mapped * gate[:, None].to(values.dtype)


def released_init(weights: tuple[torch.Tensor, ...], biases: tuple[torch.Tensor, ...]) -> None:
    """The released DELLA code's initialisation: weights normal(0, 0.02), biases 0."""
    with torch.no_grad():
        for weight in weights:
            weight.normal_(0.0, 0.02)
        for bias in biases:
            bias.zero_()


class AdditiveFusion(nn.Module):
    """v' = v + W z (the -LTP ablation); W starts at zero, so v' = v at the start."""

    def __init__(self, value_size: int, latent_size: int):
        super().__init__()
        self.project = nn.Linear(latent_size, value_size, bias=False)
        nn.init.zeros_(self.project.weight)

    def prepare(self, latent: torch.Tensor) -> tuple[torch.Tensor]:
        """The per-example shift W z: ([B, V],)."""
        return (self.project(latent),)

    def forward(self, values: torch.Tensor, latent) -> torch.Tensor:
        """values [B, T, V]; latent: z [B, P], or `prepare(z)`."""
        (shift,) = self.prepare(latent) if isinstance(latent, torch.Tensor) else latent
        return values + shift[:, None].to(values.dtype)


class LatentChain:
    """The prior or the posterior over all latent layers, as one distribution over the
    concatenation z = [z_1; ...; z_n] ([..., n P]) with ancestral structure:

        [mu_l, log sigma_l^2] = terms_l + summary_heads_l(s_l)

    `terms` hold what does not depend on z, [B, 2P] per layer: Q_l's text (and condition)
    part for the posterior, the condition part of a conditional prior, None for N(0, I) at
    the bottom of an unconditional prior. Scoring many latents per example ([B, k, nP]) thus
    never copies them."""

    segment_counts = None  # every latent has the same shape (see SegmentChain.segment_counts)

    def __init__(self, latents: "LayerwiseLatents", terms: list[torch.Tensor] | None, summary_heads, batch: int, device):
        self.latents, self.terms, self.summary_heads = latents, terms, summary_heads
        self.batch, self.device = batch, device

    def layer(self, index: int, summary: torch.Tensor | None) -> DiagonalGaussian:
        """The distribution of latent layer `index` given the summary s of the layers below
        ([..., P]; None at the first layer and for independent layers)."""
        params = None if self.terms is None else self.terms[index].float()
        if summary is not None:
            from_summary = self.summary_heads[index - 1](summary).float()
            if params is None:
                params = from_summary
            else:
                params = (params[:, None] if summary.dim() == 3 else params) + from_summary
        if params is None:  # N(0, I)
            return DiagonalGaussian.standard(self.batch, self.latents.latent_size, self.device)
        return DiagonalGaussian(*params.chunk(2, -1))

    def _summary(self, index: int, summary, below):
        if index == 0 or self.latents.independent:
            return None
        return self.latents.summarise(index, summary, below)

    def rsample(self, num: int | None = None) -> torch.Tensor:
        """Ancestral sample: [B, nP], or `num` per example [B, num, nP]."""
        summary, below, drawn = None, None, []
        for index in range(self.latents.num_latent_layers):
            summary = self._summary(index, summary, below)
            distribution = self.layer(index, summary)
            has_sample_dim = distribution.mean.dim() == 3
            below = distribution.rsample(None if (num is None or has_sample_dim) else num)
            drawn.append(below)
        return torch.cat(drawn, dim=-1)

    def layers_along(self, z: torch.Tensor) -> list[tuple[DiagonalGaussian, torch.Tensor]]:
        """(distribution of z_l given the z_<l read from z, z_l) for every latent layer."""
        parts = z.split(self.latents.latent_size, dim=-1)
        summary, result = None, []
        for index, part in enumerate(parts):
            summary = self._summary(index, summary, parts[index - 1] if index else None)
            result.append((self.layer(index, summary), part))
        return result

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Log density of z [B, nP] or [B, k, nP] along the chain: [B] or [B, k]."""
        return sum(distribution.log_prob(part) for distribution, part in self.layers_along(z))

    def conditional_entropy(self, z: torch.Tensor) -> torch.Tensor:
        """sum_l H(q(z_l | z_<l)) with z_<l read from z [B, nP]: [B] (its mean over z ~ q is
        the chain's entropy)."""
        return sum(distribution.entropy() for distribution, _ in self.layers_along(z))

    def cross_log_prob(self, z: torch.Tensor, owner: "LatentChain") -> torch.Tensor:
        """log q(z_i | x_j) for every example j here and every z_i [B_i, nP]: [B_j, B_i]."""
        return self.log_prob(z[None].expand(self.batch, *z.shape))

    @property
    def activity_means(self) -> torch.Tensor:
        """[B, nP]: one observation of the latent space per example (for AU)."""
        return self.mean

    def grouped(self) -> LatentGroups:
        """Each layer's mean and log-variance given the means of the layers below: [B, n, P]."""
        layers = [distribution for distribution, _ in self.layers_along(self.mean)]
        mean = torch.stack([d.mean.expand(self.batch, -1) for d in layers], dim=1)
        log_var = torch.stack([d.log_var.expand(self.batch, -1) for d in layers], dim=1)
        return LatentGroups(mean, log_var, torch.ones(mean.shape[:2], dtype=torch.bool, device=mean.device))

    @property
    def mean(self) -> torch.Tensor:
        """The chain run on means (each z_<l at its conditional mean): [B, nP]. For AU and
        interpolation; for a non-linear chain it is not exactly E[z]."""
        summary, below, means = None, None, []
        for index in range(self.latents.num_latent_layers):
            summary = self._summary(index, summary, below)
            below = self.layer(index, summary).mean
            means.append(below)
        return torch.cat(means, dim=-1)


class LayerwiseLatents(nn.Module):
    """The small networks of the chain: summaries (A_l, B_l), the prior heads P_l and the
    posterior heads Q_l, each Q_l split into its text part and its summary part; with a
    condition c, extra maps from c_l into both (paper section 4.4)."""

    def __init__(self, num_latent_layers: int, latent_size: int, hidden_size: int, independent: bool, conditional: bool):
        super().__init__()
        self.num_latent_layers, self.latent_size, self.independent = num_latent_layers, latent_size, independent
        above = num_latent_layers - 1  # layers that have latents below them

        def maps(count, inputs, bias=True):
            return nn.ModuleList(nn.Linear(inputs, 2 * latent_size, bias=bias) for _ in range(count))

        self.posterior_from_text = maps(num_latent_layers, hidden_size)
        if conditional:
            self.posterior_from_condition = maps(num_latent_layers, hidden_size, bias=False)
            self.prior_from_condition = maps(num_latent_layers, hidden_size)
        if not independent:  # A_l exists from the third latent layer up: s of the first is 0
            self.summary_from_summary = nn.ModuleList(nn.Linear(latent_size, latent_size, bias=False) for _ in range(above - 1))
            self.summary_from_latent = nn.ModuleList(nn.Linear(latent_size, latent_size) for _ in range(above))
            self.prior_heads = maps(above, latent_size)
            self.posterior_from_summary = maps(above, latent_size, bias=False)

    def summarise(self, index: int, summary: torch.Tensor | None, below: torch.Tensor) -> torch.Tensor:
        """s_l = tanh(A_l s_{l-1} + B_l z_{l-1}) for latent layer `index` >= 1: [..., P]."""
        pre = self.summary_from_latent[index - 1](below)
        if summary is not None:
            pre = pre + self.summary_from_summary[index - 2](summary)
        return torch.tanh(pre)

    def posterior(self, text: torch.Tensor, condition: torch.Tensor | None = None) -> LatentChain:
        """q(z | x[, c]) from pooled encoder states [B, n, H] of the latent layers."""
        terms = [head(text[:, index]) for index, head in enumerate(self.posterior_from_text)]
        if condition is not None:
            terms = [term + head(condition[:, index]) for index, (term, head) in enumerate(zip(terms, self.posterior_from_condition))]
        return LatentChain(self, terms, getattr(self, "posterior_from_summary", None), text.shape[0], text.device)

    def prior(self, batch: int, device, condition: torch.Tensor | None = None) -> LatentChain:
        """p(z[ | c]); `condition`: pooled encoder states [B, n, H] of the condition."""
        terms = None
        if condition is not None:
            terms = [head(condition[:, index]) for index, head in enumerate(self.prior_from_condition)]
        return LatentChain(self, terms, getattr(self, "prior_heads", None), batch, device)


class Della(TextVAE):
    name = "della"
    config_class = DellaConfig
    latent_groups = "layer"

    def __init__(self, backbone, tokenizer, config: DellaConfig):
        super().__init__(backbone, tokenizer, config)
        end = config.latent_end or backbone.num_layers
        if end > backbone.num_layers:
            raise TextVAEError(f"model.latent_end={end} but the backbone has {backbone.num_layers} layers")
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
            if config.fusion == "ltp":
                form = LowRankTensorFusion if config.ltp_form == "lowrank" else ProductOfSumsFusion
                fusions[layer - 1] = form(backbone.value_size, size, config.rank, config.ltp_init)
            else:
                fusions[layer - 1] = AdditiveFusion(backbone.value_size, size)
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
        return self.latents.posterior(*self.encode(batch))

    def prior(self, batch: Batch) -> LatentChain:
        condition = self.encode(batch)[1] if self.conditional else None
        return self.latents.prior(batch.size, batch.input_ids.device, condition)

    def _distributions(self, batch: Batch) -> tuple[LatentChain, LatentChain]:
        """Posterior and prior from one encoder pass."""
        text, condition = self.encode(batch)
        return self.latents.posterior(text, condition), self.latents.prior(batch.size, batch.input_ids.device, condition)

    # --- the decoder -----------------------------------------------------------------
    def injection(self, z) -> Injection:
        """z [B, nP] -> one latent per decoder layer for the value fusions (None elsewhere).
        In decoding z arrives already prepared by `decode_start`."""
        if isinstance(z, dict):
            return Injection(value_latents=z["prepared"])
        parts = z.split(self.config.latent_size, dim=-1)
        if not self.config.layerwise:
            parts = parts * len(self.latent_layers)  # the one latent goes to every fused layer
        per_layer: list[torch.Tensor | None] = [None] * self.backbone.num_layers
        for layer, part in zip(self.latent_layers, parts, strict=True):
            per_layer[layer - 1] = part
        return Injection(value_latents=per_layer)

    def decoder_nll(self, batch: Batch, z: torch.Tensor) -> torch.Tensor:
        """-log p(x | z) of each example's targets: z [B, nP] -> [B]."""
        hidden = self.backbone(batch.input_ids, batch.attention_mask, injection=self.injection(z)).hidden
        return self.target_nll(hidden, batch)

    def sample_prior_latent(self, prompts: list[list[int]], device: torch.device) -> torch.Tensor:
        """z ~ p(z) per prompt, or p(z | c) with c the prompt ([BOS] source [SEP]): [N, nP]."""
        if not self.conditional:
            return self.latents.prior(len(prompts), device).rsample()
        ids, mask = pad_rows(prompts, self.tokenizer.pad_id, device)
        states = self.encoder.states(self.backbone, ids, masks.bidirectional(mask))
        return self.latents.prior(len(prompts), device, self.condition_pooling(states, mask)).rsample()

    @torch.no_grad()
    def decode_start(self, prompt_ids, prompt_mask, latent):
        """Decoding feeds one token at a time: map each z_l to its fusion's gates once per
        sequence instead of at every step (`LowRankTensorFusion.prepare`)."""
        per_layer = self.injection(latent).value_latents
        prepared = [None if z is None else self._fusion(layer).prepare(z) for layer, z in enumerate(per_layer)]
        return super().decode_start(prompt_ids, prompt_mask, {"prepared": prepared})

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

    def importance_weights(self, batch: Batch, k: int) -> ImportanceWeights:
        """log p(x | z_i) and log p(z_i) - log q(z_i | x) along the chain, z_i ~ q(z | x):
        [B, k] each; one group per latent layer."""
        posterior, prior = self._distributions(batch)
        z = posterior.rsample(k)  # [B, k, nP]
        repeated = batch.select(torch.arange(batch.size, device=z.device).repeat_interleave(k))
        log_px_z = -self.decoder_nll(repeated, z.flatten(0, 1)).view(batch.size, k)
        groups = torch.full((batch.size,), float(len(self.inference_layers)), device=z.device)
        return ImportanceWeights(log_px_z, prior.log_prob(z) - posterior.log_prob(z), groups)

