"""Segment-wise latent variables: TRACE (recurrent, exact and parallel), IND and CGD (TRACE
paper sections 3.2 and 4).

The target is cut into segments closed by [SEP] (data/segment.py); latent slot t belongs to
target segment t (with a `.jsonl` source, segment 0 is the source: the condition, no latent).
The encoder (the decoder's weights) runs with block masks and is read at each segment's
closing position:

    extra pass   a token sees its own and earlier segments: x_<=t at closer t; x_<t at closer
                 t-1 (a learned start vector before the first segment, the source if any)
    intra pass   a token sees its own segment only: x_t at closer t
    full pass    bidirectional over the whole text (CGD's posterior)

    trace-r  p(z_t | z_<t, x_<t) = N(mu_t, sigma_t^2), [mu_t, log sigma_t^2] = F [z_{t-1}; x_<t]
             (p(z_1) = N(0, I) without a source); residual posterior
             q(z_t | z_<t, x_<=t) = N(mu_t + d_mu_t, sigma_t^2 d_sigma_t^2),
             [d_mu_t, log d_sigma_t^2] = Norm(G x_t) (`ResidualNorm`: which part is normalised,
             with a fixed scale gamma and a fixed or learned shift beta); with d_mu alone and
             beta = 0, KL_t >= P gamma^2 / (2 max_d sigma_t,d^2) cannot vanish (Theorem 1)
    trace-p  the model defined by the parallel sampler of section 4.2 / appendix B.2: q(v)
             and p(v) factorise over segments given the text (trace-r's heads without the
             z-to-z term), u_t from v_t, z_t = v_t + sum_{i<t} u_i
    ind      p(z_t) = N(0, I), q(z_t | x_<=t) from the extra pass
    cgd      p(z_t | x_<t) from the extra pass, q(z_t | x) from the full pass

Decoder: W z_t is added to the input embedding of every position whose next token lies in
segment t; in generation a new z is drawn from the prior each time [SEP] is emitted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from textvae.backbone import masks
from textvae.backbone.inject import Injection
from textvae.data.batching import Batch, pad_rows
from textvae.data.segment import Segmenter, segment_closers, segment_ids
from textvae.errors import TextVAEError
from textvae.latent.gaussian import DiagonalGaussian
from textvae.latent.interface import LatentGroups
from textvae.latent.regularizers import thresholded_kl
from textvae.models.base import DecodeState, ImportanceWeights, Output, TextVAE
from textvae.models.encoder import TextEncoder


@dataclass
class SegmentLatentConfig:
    name: str = "trace-r"
    latent_size: int = 32
    segment: str = "fixed"  # fixed | sentence
    segment_length: int = 10  # tokens per segment (fixed)
    share_encoder: bool = True
    posterior_norm: str = "ln"  # ln | bn | none: normalisation of TRACE's residual posterior
    norm_over: str = "mean"  # mean (d_mu only) | both ([d_mu, log d_sigma^2] together, Eq. 11)
    norm_shift: str = "zero"  # zero | learned: the normalisation's shift beta (BN-VAE learns it)
    ln_gamma: float = 3.0  # its fixed scale
    residual_posterior: bool = True  # false: Table 5's -RP, q(z_t | x_t) = N(d_mu_t, d_sigma_t^2)
    spectral_norm: bool = True  # trace-p: on the z-to-z maps F_mu1, F_sig1
    kl_threshold: float = 0.0  # per-dimension free bits; 0 = off
    conditional: bool | None = None  # the source is segment 0 (None: when the data has one)

    def validate(self) -> None:
        Segmenter(self.segment, self.segment_length).validate()
        if self.posterior_norm not in ("ln", "bn", "none"):
            raise TextVAEError(f"model.posterior_norm must be ln, bn or none, got {self.posterior_norm!r}")
        if self.norm_over not in ("mean", "both"):
            raise TextVAEError(f"model.norm_over must be mean or both, got {self.norm_over!r}")
        if self.norm_shift not in ("zero", "learned"):
            raise TextVAEError(f"model.norm_shift must be zero or learned, got {self.norm_shift!r}")
        if self.posterior_norm == "none" and self.norm_shift == "learned":
            raise TextVAEError("model.norm_shift=learned needs a normalisation (model.posterior_norm ln or bn)")
        if self.latent_size < 1 or self.ln_gamma <= 0 or self.kl_threshold < 0:
            raise TextVAEError("model.latent_size >= 1, model.ln_gamma > 0 and model.kl_threshold >= 0 needed")


@dataclass
class SegmentLayout:
    """Where the segments of a batch are. S = segments in the widest row, L = latent slots."""

    segments: torch.Tensor  # [B, T] segment of every position
    closers: torch.Tensor  # [B, S] last position of each segment
    present: torch.Tensor  # [B, S] which segments exist
    offset: int  # 1 when segment 0 is a source (no latent), else 0

    @classmethod
    def of(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor, sep_id: int, offset: int) -> "SegmentLayout":
        segments = segment_ids(input_ids, sep_id)
        closers, present = segment_closers(segments, attention_mask)
        if offset and closers.shape[1] < 2:  # a source and no target segment yet: one empty slot
            closers = F.pad(closers, (0, 1))
            present = F.pad(present, (0, 1))
        return cls(segments, closers, present, offset)

    @property
    def slots(self) -> torch.Tensor:
        """[B, L] which latent slots exist."""
        return self.present[:, self.offset :]

    def read(self, states: torch.Tensor) -> torch.Tensor:
        """States [B, T, H] at every segment's closer: [B, S, H]."""
        return states.gather(1, self.closers[..., None].expand(-1, -1, states.shape[-1]))

    def next_token_slot(self) -> torch.Tensor:
        """[B, T] latent slot of the token each position predicts (-1: none, e.g. a source)."""
        following = torch.cat([self.segments[:, 1:], self.segments[:, -1:]], dim=1)
        return following - self.offset


class SegmentChain:
    """Per-slot Gaussians over z [B, L, P] (or [B, k, L, P]) with an optional recurrence:

        [mu_t, log var_t] = base_t + recurrent(z_{t-1}) (+ residual_t),   z_0 = 0

    `base` and `residual` [B, L, 2P] hold what depends on the text; absent slots (`present`
    False) are ignored by densities. Without a recurrence every slot is independent."""

    def __init__(self, base: torch.Tensor, present: torch.Tensor, recurrent: nn.Module | None = None,
                 residual: torch.Tensor | None = None):
        self.base, self.present, self.recurrent, self.residual = base.float(), present, recurrent, residual

    def _params(self, previous: torch.Tensor | None, slot: slice | int) -> tuple[torch.Tensor, torch.Tensor]:
        params = self.base[:, slot]
        if self.residual is not None:
            params = params + self.residual[:, slot]
        if self.recurrent is not None and previous is not None:
            if previous.dim() > params.dim():  # k samples per example
                params = params.unsqueeze(1)
            params = params + self.recurrent(previous).float()
        return params.chunk(2, dim=-1)

    def conditionals(self, z: torch.Tensor) -> DiagonalGaussian:
        """The slots' distributions with z_{t-1} read from z (teacher forcing), shaped like z
        ([B, L, P] or [B, k, L, P])."""
        previous = None
        if self.recurrent is not None:
            previous = torch.cat([torch.zeros_like(z[..., :1, :]), z[..., :-1, :]], dim=-2)
        mean, log_var = self._params(previous, slice(None))
        if mean.dim() < z.dim():
            mean, log_var = mean.unsqueeze(1), log_var.unsqueeze(1)
        return DiagonalGaussian(mean.expand_as(z), log_var.expand_as(z))

    def rsample(self, num: int | None = None) -> torch.Tensor:
        """[B, L, P] or [B, num, L, P]; ancestral over slots when recurrent."""
        batch, slots, size = self.base.shape[0], self.base.shape[1], self.base.shape[2] // 2
        shape = (batch, slots, size) if num is None else (batch, num, slots, size)
        noise = torch.randn(shape, device=self.base.device)
        if self.recurrent is None:
            mean, log_var = self._params(None, slice(None))
            if num is not None:
                mean, log_var = mean[:, None], log_var[:, None]
            return mean + torch.exp(0.5 * log_var) * noise
        previous, drawn = torch.zeros(shape[:-2] + (size,), device=self.base.device), []
        for slot in range(slots):  # T small products, vectorised over examples and samples
            mean, log_var = self._params(previous, slot)
            previous = mean + torch.exp(0.5 * log_var) * noise[..., slot, :]
            drawn.append(previous)
        return torch.stack(drawn, dim=-2)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Log density of z [B, L, P] or [B, k, L, P] summed over present slots: [B] or [B, k]."""
        per_slot = self.conditionals(z).log_prob(z)  # [.., L]
        present = self.present if z.dim() == 3 else self.present[:, None]
        return (per_slot * present).sum(-1)

    def conditional_entropy(self, z: torch.Tensor) -> torch.Tensor:
        """sum_t H(q(z_t | z_{t-1})) over present slots, z_{t-1} read from z [B, L, P]: [B]."""
        return (self.conditionals(z).entropy() * self.present).sum(-1)

    @property
    def segment_counts(self) -> torch.Tensor:
        """Latent slots of each example [B]: latents of different counts live in different
        spaces (the mutual information is taken given the count)."""
        return self.present.sum(1)

    def cross_log_prob(self, z: torch.Tensor, owner: "SegmentChain") -> torch.Tensor:
        """log q(z_i | x_j) for every example j here and every latent z_i [B_i, L_i, P] drawn
        by `owner`: [B_j, B_i]; -inf where the slot counts differ (no mass there)."""
        mine, theirs = self.segment_counts, owner.segment_counts
        width = self.base.shape[1]
        aligned = z[:, :width] if z.shape[1] >= width else F.pad(z, (0, 0, 0, width - z.shape[1]))
        expanded = aligned[None].expand(self.base.shape[0], -1, -1, -1)  # [B_j, B_i, L, P]
        log_q = self.log_prob(expanded)
        return log_q.masked_fill(mine[:, None] != theirs[None, :], float("-inf"))

    @property
    def mean(self) -> torch.Tensor:
        """Per-slot means along the chain run on means: [B, L, P] (absent slots hold what the
        chain gives there; see `present`)."""
        if self.recurrent is None:
            return self._params(None, slice(None))[0]
        previous, steps = None, []
        for slot in range(self.base.shape[1]):
            previous = self._params(previous, slot)[0]
            steps.append(previous)
        return torch.stack(steps, dim=1)

    @property
    def activity_means(self) -> torch.Tensor:
        """[slots in batch, P]: each present slot is one observation of the same P-dim latent
        space (for AU)."""
        return self.mean[self.present]

    def grouped(self) -> LatentGroups:
        """Each slot's mean and log-variance given the means of the slots before it: [B, L, P]."""
        along_means = self.conditionals(self.mean)
        return LatentGroups(along_means.mean, along_means.log_var, self.present.bool())


class ResidualNorm(nn.Module):
    """Normalises the residual posterior's output [d_mu, log d_sigma^2] ([..., 2P]) with a
    fixed scale gamma (never trained) and a shift beta, fixed at 0 or learned from 0:

        over    mean: d_mu alone (P values) | both: all 2P values together (Eq. 11 as printed)
        kind    ln: per latent vector; bn: per dimension over the batch's present slots; none
        shift   zero | learned (BN-VAE's learned beta, which Theorem 1's proof cites)

    `ln` + `mean` + `zero` makes Theorem 1's floor exact: sum_d d_mu_d^2 = P gamma^2 (up to
    layer_norm's eps) for every vector. A learned shift, or normalising both halves, lets the
    KL go below it."""

    def __init__(self, kind: str, size: int, gamma: float, over: str = "mean", shift: str = "zero"):
        super().__init__()
        self.kind, self.size, self.gamma, self.over = kind, size, gamma, over
        width = size if over == "mean" else 2 * size
        self.shift = nn.Parameter(torch.zeros(width)) if shift == "learned" and kind != "none" else None
        if kind == "bn":
            self.batch_norm = nn.BatchNorm1d(width, affine=False)

    def forward(self, residual: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """residual [B, L, 2P] (float32), present [B, L] -> [B, L, 2P]."""
        if self.kind == "none":
            return residual
        if self.over == "mean":
            mean, log_var = residual.split(self.size, dim=-1)
            return torch.cat([self.normalise(mean, present), log_var], dim=-1)
        return self.normalise(residual, present)

    def normalise(self, values: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        if self.kind == "ln":
            normed = self.gamma * F.layer_norm(values, values.shape[-1:])
        else:
            rows = values[present]
            norm = self.batch_norm
            use_batch = self.training and rows.shape[0] > 1
            rows = F.batch_norm(rows, norm.running_mean, norm.running_var, training=use_batch, momentum=norm.momentum, eps=norm.eps)
            normed = values.masked_scatter(present[..., None], self.gamma * rows)
        return normed if self.shift is None else normed + self.shift


class SegmentLatentVAE(TextVAE):
    """Shared machinery of trace-r, trace-p, ind and cgd: segments, encoder passes, the
    decoder's per-position latents, the bound, and generation with a new latent per [SEP]."""

    supports_encoder_decoder = False  # segment latents and masks live on the decoder-only layout

    config_class = SegmentLatentConfig
    latent_groups = "segment"
    context_keys = ("ids", "mask", "given", "count", "slot")  # decoding state besides the chain's
    passes: tuple[str, ...]  # encoder passes the model reads: extra, intra, full
    prior_draws = 0  # latents drawn in generation (a counter for tests and diagnostics)

    def __init__(self, backbone, tokenizer, config: SegmentLatentConfig):
        super().__init__(backbone, tokenizer, config)
        hidden, size = backbone.hidden_size, config.latent_size
        self.segmenter = Segmenter(config.segment, config.segment_length)
        self.conditional = bool(config.conditional)
        self.encoder = TextEncoder(backbone, layers=[backbone.num_layers], share=config.share_encoder, pooled=False)
        self.start = nn.Parameter(torch.randn(hidden) * 0.02)  # x_<1 when there is no source
        self.latent_to_embedding = nn.Linear(size, hidden, bias=False)
        nn.init.zeros_(self.latent_to_embedding.weight)  # the decoder starts as the backbone
        self.build_heads(hidden, size)

    def build_heads(self, hidden: int, size: int) -> None:
        raise NotImplementedError

    # --- encoder -----------------------------------------------------------------------
    def layout(self, batch: Batch) -> SegmentLayout:
        return SegmentLayout.of(batch.input_ids, batch.attention_mask, self.tokenizer.sep_id, int(self.conditional))

    def read(self, batch: Batch, layout: SegmentLayout) -> dict[str, torch.Tensor]:
        """Encoder states at the segment closers, per pass: [B, S, H] each, plus "before"
        [B, L, H]: x_<t of every latent slot (the start vector, or the source, first)."""
        out = {}
        for kind in self.passes:
            if kind == "full":
                mask = masks.bidirectional(batch.attention_mask)
            else:
                mask = masks.block(layout.segments, batch.attention_mask, kind)
            out[kind] = layout.read(self.encoder.states(self.backbone, batch.input_ids, mask)[:, 0])
        if "extra" in out:
            extra = out["extra"]
            start = self.start.to(extra.dtype).expand(extra.shape[0], 1, -1)
            everything = torch.cat([start, extra], dim=1)  # [B, 1 + S, H]: index s = x_<s
            out["before"] = everything[:, layout.offset : layout.offset + layout.slots.shape[1]]
        return out

    def distributions(self, batch: Batch) -> tuple[SegmentLayout, SegmentChain, SegmentChain]:
        """The layout, the posterior and the prior (exact densities) of a batch."""
        layout = self.layout(batch)
        posterior, prior = self.chains(self.read(batch, layout), layout)
        return layout, posterior, prior

    def chains(self, states: dict[str, torch.Tensor], layout: SegmentLayout) -> tuple[SegmentChain, SegmentChain]:
        raise NotImplementedError

    def posterior(self, batch: Batch) -> SegmentChain:
        return self.distributions(batch)[1]

    def prior(self, batch: Batch) -> SegmentChain:
        return self.distributions(batch)[2]

    # --- decoder -----------------------------------------------------------------------
    def decoder_nll(self, batch: Batch, z: torch.Tensor, layout: SegmentLayout) -> torch.Tensor:
        """-log p(x | z) with z [B, L, P] added where the next token lies in slot t: [B]."""
        slot = layout.next_token_slot()  # [B, T]
        vectors = self.latent_to_embedding(z)  # [B, L, H]
        offsets = vectors.gather(1, slot.clamp(0, vectors.shape[1] - 1)[..., None].expand(-1, -1, vectors.shape[-1]))
        offsets = offsets * (slot >= 0)[..., None].to(offsets.dtype)
        hidden = self.backbone(batch.input_ids, batch.attention_mask, injection=Injection(embed_offset=offsets)).hidden
        return self.target_nll(hidden, batch)

    # --- objective and bound -------------------------------------------------------------
    def latent_to_groups(self, z: torch.Tensor) -> torch.Tensor:
        return z  # already one latent per segment: [..., L, P]

    def latent_from_groups(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def decoder_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """What the decoder reads from a latent drawn from the chains, [..., L, P] -> same
        shape: the latent itself (TRACE-P maps its v to z)."""
        return latent

    def forward(self, batch: Batch, beta: float = 1.0) -> Output:
        layout = self.layout(batch)
        posterior, prior = self.chains(self.read(batch, layout), layout)
        latent = posterior.rsample()
        z = self.decoder_latent(latent)
        rec = self.decoder_nll(batch, z, layout)
        kl_per_dim = posterior.conditionals(latent).kl_per_dim(prior.conditionals(latent)) * layout.slots[..., None]  # [B, L, P]
        kl_groups = kl_per_dim.sum(-1)  # per segment
        loss = rec + beta * thresholded_kl(kl_per_dim.flatten(1), self.config.kl_threshold)
        logs = {"segments": layout.slots.sum(1).float().mean()}
        return Output(loss=loss.mean(), rec=rec, kl=kl_groups.sum(1), kl_groups=kl_groups,
                      groups_present=layout.slots.bool(), z=z, logs=logs)

    def importance_weights(self, batch: Batch, k: int) -> ImportanceWeights:
        """log p(x | z_i) and log p(z_i) - log q(z_i | x), z_i from the posterior chain: [B, k]
        each; one group per present segment."""
        layout, posterior, prior = self.distributions(batch)
        latent = posterior.rsample(k)  # [B, k, L, P]
        rows = torch.arange(batch.size, device=latent.device).repeat_interleave(k)
        repeated = batch.select(rows)
        repeated_layout = SegmentLayout(layout.segments[rows], layout.closers[rows], layout.present[rows], layout.offset)
        z = self.decoder_latent(latent.flatten(0, 1))
        log_px_z = -self.decoder_nll(repeated, z, repeated_layout).view(batch.size, k)
        groups = layout.slots.sum(1).float().clamp(min=1)
        return ImportanceWeights(log_px_z, prior.log_prob(latent) - posterior.log_prob(latent), groups)

    # --- generation: a new latent each time [SEP] is emitted -----------------------------
    def next_prior(self, before: torch.Tensor, previous: torch.Tensor | None, first: bool) -> DiagonalGaussian:
        """p(z_t | z_{t-1}, x_<t) for one slot: before [N, H] (x_<t), previous [N, P] or None."""
        raise NotImplementedError

    def chain_state(self, drawn: torch.Tensor, previous: dict | None) -> dict[str, torch.Tensor]:
        """Per-row generation state after drawing the next slot's latent `drawn` [N, P]:
        "z" is what the decoder reads (TRACE-P also carries its running sum)."""
        return {"z": drawn}

    def _prior_draw(self, ids: torch.Tensor, mask: torch.Tensor, previous: dict | None) -> dict[str, torch.Tensor]:
        """Draw the latent of the segment that starts after the left-padded text `ids` [N, T],
        given the rows' previous `chain_state` (None at the first segment)."""
        self.prior_draws += ids.shape[0]
        first = previous is None
        if first and not self.conditional:
            before = self.start.expand(ids.shape[0], -1)
        else:
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            segments = segment_ids(ids, self.tokenizer.sep_id)
            states = self.encoder.states(self.backbone, ids, masks.block(segments, mask, "extra"), positions)[:, 0]
            before = states[:, -1]  # the closer just emitted (or the prompt's [SEP])
        drawn = self.next_prior(before, None if first else previous["z"], first).rsample()
        return self.chain_state(drawn, previous)

    def sample_prior_latent(self, prompts: list[list[int]], device: torch.device) -> dict:
        """The first slot's chain state per prompt, plus the prompts left-padded as `decode`
        pads them: the text so far, which later draws read."""
        ids, mask = pad_rows(prompts, self.tokenizer.pad_id, device, left=True)
        return {**self._prior_draw(ids, mask, None), "ids": ids, "mask": mask}

    def injection(self, latent: dict) -> Injection:
        return Injection(embed_offset=self.latent_to_embedding(latent["z"]))

    def prompt_injection(self, latent: dict, prompt_ids: torch.Tensor) -> Injection:
        """As in training: positions predicting source tokens carry no latent; the prompt's
        last position ([BOS], or the source's [SEP]) predicts segment 1 and carries z_1."""
        offsets = self.latent_to_embedding(latent["z"])[:, None].expand(-1, prompt_ids.shape[1], -1)
        if self.conditional:
            last = torch.zeros(prompt_ids.shape[1], device=prompt_ids.device)
            last[-1] = 1
            offsets = offsets * last[None, :, None].to(offsets.dtype)
        return Injection(embed_offset=offsets)

    def decoding_latent(self, z: torch.Tensor, present: torch.Tensor, prompts: list[list[int]], device) -> dict:
        """Decode from given per-segment latents z [N, L, P] (in the posterior's layout) with
        `present` [N, L] marking each row's segments: segment t reads z_t while the row has
        one, then latents come from the prior as in sampling."""
        ids, mask = pad_rows(prompts, self.tokenizer.pad_id, device, left=True)
        z = z.to(device).float()
        count = present.to(device).sum(1)
        return {**self.chain_state(z[:, 0], None), "ids": ids, "mask": mask,
                "given": z, "count": count, "slot": torch.zeros_like(count)}

    @torch.no_grad()
    def decode_next(self, state: DecodeState, tokens: torch.Tensor) -> torch.Tensor:
        latent = dict(state.latent)
        latent["ids"] = torch.cat([latent["ids"], tokens[:, None]], dim=1)
        latent["mask"] = torch.cat([latent["mask"], torch.ones_like(tokens)[:, None]], dim=1)
        closed = tokens == self.tokenizer.sep_id
        if closed.any():  # the [SEP] itself already carries the next segment's latent
            rows = closed.nonzero()[:, 0]
            given = torch.zeros_like(rows, dtype=torch.bool)
            if "given" in latent:  # decoding given latents: the next one, while there is one
                latent["slot"] = latent["slot"].clone()
                latent["slot"][rows] += 1
                given = latent["slot"][rows] < latent["count"][rows]
            for part, from_given in ((rows[given], True), (rows[~given], False)):
                if len(part):
                    self._advance_chain(latent, part, from_given)
        state.latent = latent
        return super().decode_next(state, tokens)

    def _advance_chain(self, latent: dict, rows: torch.Tensor, from_given: bool) -> None:
        """Replace the chain state of `rows` by the next segment's, drawn or given."""
        previous = {key: value[rows] for key, value in latent.items() if key not in self.context_keys}
        if from_given:
            following = self.chain_state(latent["given"][rows, latent["slot"][rows]], previous)
        else:
            following = self._prior_draw(latent["ids"][rows], latent["mask"][rows], previous)
        for key, value in following.items():
            latent[key] = latent[key].clone()
            latent[key][rows] = value.to(latent[key].dtype)


class TraceR(SegmentLatentVAE):
    """Exact recurrence: prior F [z_{t-1}; x_<t], residual posterior from G x_t."""

    name = "trace-r"
    passes = ("extra", "intra")

    def build_heads(self, hidden: int, size: int) -> None:
        self.prior_from_text = nn.Linear(hidden, 2 * size)  # F's x_<t part (and its bias)
        self.prior_from_latent = nn.Linear(size, 2 * size, bias=False)  # F's z_{t-1} part
        # starts at zero: a random map whose norm exceeds 1 makes z_t (and, through the
        # log-variance, sigma_t) grow geometrically over the segments of a long text
        nn.init.zeros_(self.prior_from_latent.weight)
        self.residual_from_text = nn.Linear(hidden, 2 * size)  # G
        config = self.config
        self.residual_norm = ResidualNorm(config.posterior_norm, size, config.ln_gamma, config.norm_over, config.norm_shift)

    def prior_base(self, before: torch.Tensor, layout: SegmentLayout) -> torch.Tensor:
        """F's text part for every slot [B, L, 2P]; zero at the first slot without a source,
        where p(z_1) = N(0, I)."""
        base = self.prior_from_text(before).float()
        if not self.conditional:
            base = torch.cat([torch.zeros_like(base[:, :1]), base[:, 1:]], dim=1)
        return base

    def chains(self, states, layout):
        slots = layout.slots
        own = states["intra"][:, layout.offset :]
        residual = self.residual_norm(self.residual_from_text(own).float(), slots)
        base = self.prior_base(states["before"], layout)
        prior = SegmentChain(base, slots, self.prior_from_latent)
        if not self.config.residual_posterior:  # -RP: the posterior ignores the prior
            return SegmentChain(residual, slots), prior
        posterior = SegmentChain(base, slots, self.prior_from_latent, residual)
        return posterior, prior

    def next_prior(self, before, previous, first):
        if first and not self.conditional:
            return DiagonalGaussian.standard(before.shape[0], self.config.latent_size, before.device)
        params = self.prior_from_text(before).float()
        if previous is not None:
            params = params + self.prior_from_latent(previous).float()
        return DiagonalGaussian(*params.chunk(2, dim=-1))


class TraceP(TraceR):
    """TRACE-R's networks as the latent-variable model that the parallel sampler of section 4.2 /
    appendix B.2 defines. Latents v_t and u_t; the decoder reads z_t = v_t + sum_{i<t} u_i
    (a product with a strictly lower-triangular matrix of ones):

        q(v_t | x)    = N(F_mu2 x_<t + d_mu_t, exp(F_sig2 x_<t) d_sigma_t^2)   (the paper's v_t)
        p(v_t | x_<t) = N(F_mu2 x_<t, exp(F_sig2 x_<t))       (N(0, I) first, without a source)
        u_t | v_t     = F_mu1 v_t + (F_sig1 v_t) * xi_t        (in both; xi_t ~ N(0, I))

    q(v) and p(v) factorise over segments given the text, so training, the KL (per segment, the same
    residual form and fixed-gamma floor as TRACE-R) and the bound need no recurrence; u_t has
    the same law under q and p, so it cancels from log p(v, u) - log q(v, u) and the IW bound is
    exact for this model: log w = log p(x | z(v, u)) + log p(v) - log q(v | x). MI and AU are
    those of v (x reaches u only through v). Generation draws v_t from p at each [SEP] and
    keeps the running sum of u. We do not score TRACE-P with TRACE-R's exact recursion
    z_t ~ N(F [z_{t-1}; x_<t], ...): the sampler never trains it, and run on a trained TRACE-P
    it diverges (the log-variance is linear in z and exponentiated; docs/architecture.md).
    With the z-to-z maps at zero, u = 0 and z_t is TRACE-R's
    sample for the same noise. [F_mu1; F_sig1] has its spectral norm capped at 1
    (`spectral_norm`; W / max(1, ||W||_2)) rather than set to exactly 1 as torch's
    spectral_norm does, so the map starts at zero like TRACE-R's."""

    name = "trace-p"

    def build_heads(self, hidden: int, size: int) -> None:
        super().build_heads(hidden, size)
        if self.config.spectral_norm:
            parametrize.register_parametrization(self.prior_from_latent, "weight", SpectralCap())

    def chains(self, states, layout):
        posterior, prior = super().chains(states, layout)
        return (SegmentChain(posterior.base, posterior.present, residual=posterior.residual),
                SegmentChain(prior.base, prior.present))  # both without the z-to-z term

    def increments(self, v: torch.Tensor) -> torch.Tensor:
        """u = F_mu1 v + (F_sig1 v) * xi for v [..., P] (fresh noise xi): same shape."""
        maps = self.prior_from_latent(v).float()
        size = self.config.latent_size
        return maps[..., :size] + maps[..., size:] * torch.randn_like(maps[..., :size])

    def decoder_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """z = v + (strictly lower-triangular ones) u over the slot axis: [..., L, P]."""
        slots = latent.shape[-2]
        strictly_lower = torch.ones(slots, slots, device=latent.device).tril(-1)
        return latent + torch.einsum("ts,...sp->...tp", strictly_lower, self.increments(latent))

    def next_prior(self, before, previous, first):
        return super().next_prior(before, None, first)  # p(v_t | x_<t): no z-to-z term

    def chain_state(self, drawn, previous):
        if previous is None:
            carried = torch.zeros_like(drawn)
        else:
            carried = previous["carried"] + self.increments(previous["v"])
        return {"z": drawn + carried, "v": drawn, "carried": carried}


class Independent(SegmentLatentVAE):
    """IND: p(z_t) = N(0, I), q(z_t | x_<=t) from the extra pass at closer t."""

    name = "ind"
    passes = ("extra",)

    def build_heads(self, hidden: int, size: int) -> None:
        self.posterior_head = nn.Linear(hidden, 2 * size)

    def chains(self, states, layout):
        slots = layout.slots
        upto = states["extra"][:, layout.offset :]
        posterior = SegmentChain(self.posterior_head(upto), slots)
        return posterior, SegmentChain(torch.zeros_like(posterior.base), slots)

    def next_prior(self, before, previous, first):
        return DiagonalGaussian.standard(before.shape[0], self.config.latent_size, before.device)

    def _prior_draw(self, ids, mask, previous):  # N(0, I): no encoder pass needed
        self.prior_draws += ids.shape[0]
        return self.chain_state(torch.randn(ids.shape[0], self.config.latent_size, device=ids.device), previous)


class ContextConditioned(SegmentLatentVAE):
    """CGD, context-conditioned Gaussians: p(z_t | x_<t) from the extra pass, q(z_t | x) from a
    bidirectional pass."""

    name = "cgd"
    passes = ("extra", "full")

    def build_heads(self, hidden: int, size: int) -> None:
        self.prior_head = nn.Linear(hidden, 2 * size)
        self.posterior_head = nn.Linear(hidden, 2 * size)

    def chains(self, states, layout):
        slots = layout.slots
        prior = SegmentChain(self.prior_head(states["before"]), slots)
        posterior = SegmentChain(self.posterior_head(states["full"][:, layout.offset :]), slots)
        return posterior, prior

    def next_prior(self, before, previous, first):
        return DiagonalGaussian(*self.prior_head(before).float().chunk(2, dim=-1))


class SpectralCap(nn.Module):
    """Weight parametrisation W -> W / max(1, ||W||_2): the spectral norm never exceeds 1."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.matrix_norm(weight.float(), ord=2)
        return weight / torch.clamp(norm, min=1.0).to(weight.dtype)
