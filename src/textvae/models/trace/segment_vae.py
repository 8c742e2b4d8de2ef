"""What the segment-wise latent models share (TRACE paper sections 3.2 and 4): segments,
encoder passes, the decoder's per-position latents, the bound, and generation.

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

from typing import Callable

import torch
from torch import nn

from textvae.backbone import masks
from textvae.backbone.inject import Injection
from textvae.data.batching import Batch, pad_rows
from textvae.data.segment import Segmenter, segment_ids
from textvae.latent.gaussian import DiagonalGaussian
from textvae.latent.regularizers import thresholded_kl
from textvae.models.base import DecodeState, ImportanceWeights, Output, TextVAE
from textvae.models.encoder import TextEncoder
from textvae.models.trace.chain import SegmentChain, absent_as_zero
from textvae.models.trace.config import SegmentLatentConfig
from textvae.models.trace.layout import SegmentLayout


class SegmentLatentVAE(TextVAE):
    """Shared machinery of trace-r, trace-p, ind and cgd: segments, encoder passes, the
    decoder's per-position latents, the bound, and generation with a new latent per [SEP]."""

    supports_encoder_decoder = False  # segment latents and masks live on the decoder-only layout

    config_class = SegmentLatentConfig
    latent_groups = "segment"
    context_keys = ("ids", "mask", "given", "count", "slot")  # decoding state besides the chain's
    passes: tuple[str, ...]  # encoder passes the model reads: extra, intra, full
    prior_reads_text = True  # false: the prior is N(0, I) at every slot (no encoder pass to draw)
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
        # a model's own heads come after these (its __init__), so the random draws keep their order

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
        """The posterior and the prior of every latent slot from the encoder states `read`
        returns ([B, S, H] per pass, "before" [B, L, H])."""
        raise NotImplementedError

    def posterior(self, batch: Batch) -> SegmentChain:
        """q(z_t | ...) of every segment slot: samples [B, L, P] ([B, k, L, P] for k), densities
        summed over the slots present."""
        return self.distributions(batch)[1]

    def prior(self, batch: Batch) -> SegmentChain:
        """p(z_t | ...) of every segment slot, with the posterior's shapes."""
        return self.distributions(batch)[2]

    # --- decoder -----------------------------------------------------------------------
    def decoder_nll(self, batch: Batch, z: torch.Tensor, layout: SegmentLayout) -> torch.Tensor:
        """-log p(x | z) with z [B, L, P] added where the next token lies in slot t: [B]."""
        return self.target_nll(self.decoder_hidden(batch, z, layout), batch)

    def decoder_hidden(self, batch: Batch, z: torch.Tensor, layout: SegmentLayout) -> torch.Tensor:
        """The decoder's last hidden states [B, T, H] with z [B, L, P] added to every position
        whose next token lies in slot t."""
        slot = layout.next_token_slot()  # [B, T]
        vectors = self.latent_to_embedding(z)  # [B, L, H]
        offsets = vectors.gather(1, slot.clamp(0, vectors.shape[1] - 1)[..., None].expand(-1, -1, vectors.shape[-1]))
        offsets = offsets * (slot >= 0)[..., None].to(offsets.dtype)
        return self.backbone(batch.decoder_inputs, batch.attention_mask, injection=Injection(embed_offset=offsets)).hidden

    # --- objective and bound -------------------------------------------------------------
    def latent_to_groups(self, z: torch.Tensor) -> torch.Tensor:
        return z  # already one latent per segment: [..., L, P]

    def latent_from_groups(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def decoder_latent(self, latent: torch.Tensor, noise: bool = True) -> torch.Tensor:
        """What the decoder reads from a latent drawn from the chains, [..., L, P] -> same
        shape: the latent itself (TRACE-P maps its v to z, drawing its increments' noise unless
        `noise` is off: then their mean given v)."""
        return latent

    def forward(self, batch: Batch, beta: float = 1.0) -> Output:
        layout = self.layout(batch)
        posterior, prior = self.chains(self.read(batch, layout), layout)
        latent = posterior.rsample()
        z = self.decoder_latent(latent)
        rec = self.decoder_nll(batch, z, layout)
        kl_per_dim = absent_as_zero(posterior.conditionals(latent).kl_per_dim(prior.conditionals(latent)), layout.slots)  # [B, L, P]
        kl_groups = kl_per_dim.sum(-1)  # per segment
        loss = rec + beta * thresholded_kl(kl_per_dim.flatten(1), self.config.kl_threshold)
        logs = {"segments": layout.slots.sum(1).float().mean()}
        return Output(loss=loss.mean(), rec=rec, kl=kl_groups.sum(1), kl_groups=kl_groups,
                      groups_present=layout.slots.bool(), z=z, logs=logs)

    def importance_sampler(self, batch: Batch) -> Callable[[int], ImportanceWeights]:
        """log p(x | z_i) and log p(z_i) - log q(z_i | x), z_i from the posterior chain: [B, n]
        each; one group per present segment."""
        layout, posterior, prior = self.distributions(batch)
        groups = layout.slots.sum(1).float().clamp(min=1)

        def draw(n: int) -> ImportanceWeights:
            latent = posterior.rsample(n)  # [B, n, L, P]
            rows = torch.arange(batch.size, device=latent.device).repeat_interleave(n)
            repeated = batch.select(rows)
            repeated_layout = SegmentLayout(layout.segments[rows], layout.closers[rows], layout.present[rows], layout.offset)
            z = self.decoder_latent(latent.flatten(0, 1))
            log_px_z = -self.decoder_nll(repeated, z, repeated_layout).view(batch.size, n)
            return ImportanceWeights(log_px_z, prior.log_prob(latent) - posterior.log_prob(latent), groups)
        return draw

    # --- generation: a new latent each time [SEP] is emitted -----------------------------
    def next_prior(self, before: torch.Tensor, previous: torch.Tensor | None, first: bool) -> DiagonalGaussian:
        """p(z_t | z_{t-1}, x_<t) for one slot: before [N, H] (x_<t), previous [N, P] or None."""
        raise NotImplementedError

    def chain_state(self, drawn: torch.Tensor, previous: dict | None, given: bool = False) -> dict[str, torch.Tensor]:
        """Per-row generation state after drawing the next slot's latent `drawn` [N, P] (or
        taking it as `given`): "z" is what the decoder reads (TRACE-P also carries its running
        sum)."""
        return {"z": drawn}

    def _prior_draw(self, ids: torch.Tensor, mask: torch.Tensor, previous: dict | None) -> dict[str, torch.Tensor]:
        """Draw the latent of the segment that starts after the left-padded text `ids` [N, T],
        given the rows' previous `chain_state` (None at the first segment)."""
        self.prior_draws += ids.shape[0]
        first = previous is None
        if (first and not self.conditional) or not self.prior_reads_text:
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
        return {**self.chain_state(z[:, 0], None, given=True), "ids": ids, "mask": mask,
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
            following = self.chain_state(latent["given"][rows, latent["slot"][rows]], previous, given=True)
        else:
            following = self._prior_draw(latent["ids"][rows], latent["mask"][rows], previous)
        for key, value in following.items():
            latent[key] = latent[key].clone()
            latent[key][rows] = value.to(latent[key].dtype)
