"""Likelihood and representation metrics. Conventions (docs/metrics.md, DESIGN.md section 6):

* tokens counted: each target's tokens and its EOS; never BOS, padding or a source prefix;
* log p(x) ~= logsumexp_i log_weights_i - log k over k posterior samples (exact for the LM);
  `nll`: mean over examples of -log p(x), in nats; `ppl` = exp(total -log p(x) / total tokens);
* `elbo` = rec + KL per example (positive, lower is better), one posterior sample per example;
* `kl`: KL(q(z|x) || p(z)) per example, summed over latent groups;
* `mi`: I_q(x; z) = E_x E_q(z|x)[log q(z|x)] - E_q(z)[log q(z)], with the aggregate posterior
  over the whole evaluation set: log q(z_i) = logsumexp_j log q(z_i | x_j) - log N, one z_i
  per x_i; for segment-wise latents, whose number of segments is read off the text, I(x; z | T)
  given that number T (the aggregate over the N_T examples with T segments);
* `au`: dimensions d with Cov_x(E_q(z|x)[z_d]) > delta (unbiased variance over examples; for
  segment-wise latents every present segment of every example is one observation);
* `kl_groups` (layer-wise latents): mean KL of each latent layer; `kl_segments` (segment-wise
  latents): mean KL of the t-th segment over the examples that have a t-th segment.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from textvae.data.batching import Encoded, collate, counted_tokens, eval_batches
from textvae.models.base import TextVAE


@torch.no_grad()
def log_marginal(model: TextVAE, batch, k: int, chunk: int = 20) -> torch.Tensor:
    """Importance-weighted log p(x) of each example: [B]. Samples are drawn `chunk` at a time
    so memory stays bounded for large k."""
    if not model.has_latent:
        return model.log_weights(batch, 1)[:, 0]
    parts = [model.log_weights(batch, min(chunk, k - start)) for start in range(0, k, chunk)]
    return torch.logsumexp(torch.cat(parts, dim=1), dim=1) - math.log(k)


@torch.no_grad()
def mutual_information(posteriors: list) -> float:
    """I_q(x; z) over the examples of all `posteriors` (one distribution object per batch,
    with `rsample()` and `log_prob(z)`), in nats. log q(z_i | x_j) for every pair comes from
    `cross_log_prob(z_i, owner)` where a posterior defines it, else from `log_prob` of z_i
    broadcast over x_j's batch.

    Latents whose shape depends on the example (one per segment) come with `shape_group` [B],
    e.g. the segment count T: q(z | x_j) has no mass on another group's latents, and the
    aggregate is taken within the group, log q(z_i | T_i) = logsumexp_j log q(z_i | x_j) -
    log N_T, so the result is I(x; z | T). Normalising by N instead would add H(T), which the
    text's length tells without any latent."""
    samples = [posterior.rsample() for posterior in posteriors]
    log_q_own = torch.cat([q.log_prob(z) for q, z in zip(posteriors, samples)]).double()  # [N]
    log_aggregate = [torch.full((z.shape[0],), float("-inf"), dtype=torch.float64, device=z.device) for z in samples]
    for posterior in posteriors:
        for index, (owner, z) in enumerate(zip(posteriors, samples)):
            log_q = _cross_log_prob(posterior, z, owner)  # [B_j, B_i]
            log_aggregate[index] = torch.logaddexp(log_aggregate[index], torch.logsumexp(log_q.double(), dim=0))
    if getattr(posteriors[0], "shape_group", None) is None:
        log_count = torch.full_like(log_q_own, math.log(log_q_own.shape[0]))
    else:
        groups = torch.cat([posterior.shape_group for posterior in posteriors])
        _, group_index, group_size = torch.unique(groups, return_inverse=True, return_counts=True)
        log_count = group_size[group_index].double().log().to(log_q_own.device)
    return float((log_q_own - (torch.cat(log_aggregate) - log_count)).mean())


def _cross_log_prob(posterior, z: torch.Tensor, owner) -> torch.Tensor:
    if hasattr(posterior, "cross_log_prob"):
        return posterior.cross_log_prob(z, owner)
    rows = posterior.mean.shape[0]
    return posterior.log_prob(z[None].expand(rows, *z.shape))


def active_units(means: torch.Tensor, delta: float) -> torch.Tensor:
    """Which latent dimensions are active: means [N, D] of E_q(z|x)[z] -> bool [D]."""
    return means.double().var(dim=0, unbiased=True) > delta


@torch.no_grad()
def evaluate_likelihood(
    model: TextVAE,
    data: list[Encoded],
    batch_size: int = 32,
    iw_samples: int = 100,
    au_delta: float = 0.01,
    bf16: bool = False,
    seed: int = 0,
) -> dict:
    """`ppl`, `nll`, and for latent models `elbo`, `rec`, `kl`, `mi`, `au` (plus per-group KL
    and AU when the model has several latent groups), `tokens`, `examples`."""
    model.eval()
    torch.manual_seed(seed)  # posterior samples: the same run evaluates to the same numbers
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    total_nll, rec, kl, tokens = 0.0, 0.0, 0.0, 0
    kl_groups, posteriors = [], []
    segment_kl, segment_count = torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    for rows in eval_batches([len(item.ids) for item in data], batch_size):
        batch = collate([data[i] for i in rows], model.tokenizer.pad_id).to(device)
        with autocast:
            total_nll -= float(log_marginal(model, batch, iw_samples).double().sum())
            if model.has_latent:
                out = model(batch)
                rec += float(out.rec.double().sum())
                kl += float(out.kl.double().sum())
                if out.groups_present is not None:  # segments: their number varies by example
                    segment_kl = _add_padded(segment_kl, (out.kl_groups.double() * out.groups_present).sum(0).cpu())
                    segment_count = _add_padded(segment_count, out.groups_present.double().sum(0).cpu())
                elif out.kl_groups is not None:
                    kl_groups.append(out.kl_groups.double().sum(0))
                posteriors.append(model.posterior(batch))
        tokens += int(counted_tokens(batch, model.tokenizer.sep_id))
    examples = len(data)
    metrics = {"ppl": math.exp(total_nll / tokens), "nll": total_nll / examples}
    if model.has_latent:
        active = active_units(torch.cat([q.mean for q in posteriors]), au_delta)
        metrics.update(elbo=(rec + kl) / examples, rec=rec / examples, kl=kl / examples)
        metrics.update(mi=mutual_information(posteriors), au=int(active.sum()))
        groups = model.latent_group_sizes
        if len(groups) > 1:
            metrics["kl_groups"] = (torch.stack(kl_groups).sum(0) / examples).tolist()
            metrics["au_groups"] = [int(part.sum()) for part in active.split(groups)]
            metrics["au_mean"] = sum(metrics["au_groups"]) / len(groups)
        if len(segment_count):
            metrics["kl_segments"] = (segment_kl / segment_count).tolist()
    metrics.update(tokens=tokens, examples=examples)
    return metrics


def _add_padded(total: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """Elementwise sum of two 1-D tensors of possibly different lengths (zero-padded)."""
    size = max(len(total), len(part))
    padded = torch.zeros(size, dtype=torch.float64)
    padded[: len(total)] += total
    padded[: len(part)] += part
    return padded
