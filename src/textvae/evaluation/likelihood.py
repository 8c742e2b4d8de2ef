"""Likelihood and representation metrics. Conventions (docs/metrics.md):

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
  segment-wise latents every present segment of every example is one observation; None with
  a single observation);
* `kl_groups` (layer-wise latents): mean KL of each latent layer; `kl_segments` (segment-wise
  latents): mean KL of the t-th segment over the examples that have a t-th segment;
* `X_stderr`: the standard error of the mean over examples of each per-example quantity X
  (`nll`, `elbo`, `rec`, `kl`, ...); `ppl_stderr` by the delta method (the ratio of sums);
  None over a single example;
* the papers' conventions beside the true values (never bounds): `kl_layer_mean`,
  `elbo_layer_mean`, `ppl_layer_mean` (the latent densities averaged over an example's latent
  groups, as DELLA's released code does; equal to the plain keys with one latent) and
  `mi_minibatch` (He et al.'s `calc_mi`: analytic entropy, aggregate posterior within each
  evaluation batch of `mi_minibatch_size` examples).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from textvae.data.batching import Encoded, collate, counted_tokens, eval_batches
from textvae.evaluation.pace import Pace
from textvae.files import save_tensors, write_atomically
from textvae.models.base import ImportanceWeights, TextVAE
from textvae.training.environment import bf16_inference


# Decoder positions (rows x length) one pass over importance samples may take when the chunk
# size is not given: SmolLM2 passes of 4-10 thousand positions ran a fifth faster on a 2-core
# CPU than passes of 18-41 thousand, whose activations outgrow the caches (docs/performance.md).
POSITIONS_PER_PASS = 8192


def samples_per_pass(batch, k: int) -> int:
    """How many of k importance samples of every example one decoder pass scores: as many as
    keep the pass within POSITIONS_PER_PASS positions, at least 1."""
    return max(1, min(k, POSITIONS_PER_PASS // (batch.size * batch.input_ids.shape[1])))


@torch.no_grad()
def log_marginals(model: TextVAE, batch, k: int, chunk: int | None = None, progress: Progress | None = None,
                  index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance-weighted log p(x) of each example [B], and the same estimate with the latent
    densities averaged over latent groups (DELLA's released-code convention) [B]. The posterior
    is computed once; the decoder scores `chunk` samples at a time (None: `samples_per_pass`),
    so memory stays bounded for large k. With `progress`, the samples scored so far are kept
    after every chunk as batch `index`'s, and a batch cut short goes on from them."""
    if not model.has_latent:
        exact = model.importance_weights(batch, 1).reconstruction[:, 0]  # no latent: log p(x) itself
        return exact, exact
    chunk = chunk or samples_per_pass(batch, k)
    draw = model.importance_sampler(batch)
    device = batch.input_ids.device
    weights = None if progress is None else progress.samples_of(index, device)  # restores the generator
    for start in range(0 if weights is None else weights.total.shape[1], k, chunk):
        part = draw(min(chunk, k - start))
        weights = part if weights is None else ImportanceWeights.cat([weights, part])
        if progress is not None and start + chunk < k:  # the last one is kept as the batch's result
            progress.put_samples(index, weights, device)
    return (torch.logsumexp(weights.total, dim=1) - math.log(k), torch.logsumexp(weights.group_mean, dim=1) - math.log(k))


@torch.no_grad()
def mutual_information(posteriors: list) -> float:
    """I_q(x; z) over the examples of all `posteriors` (one distribution object per batch,
    as declared in `latent/interface.py`), in nats; log q(z_i | x_j) for every pair comes from
    `cross_log_prob(z_i, owner)`.

    Latents whose shape depends on the example (one per segment) come with `segment_counts` [B],
    e.g. the segment count T: q(z | x_j) has no mass on another group's latents, and the
    aggregate is taken within the group, log q(z_i | T_i) = logsumexp_j log q(z_i | x_j) -
    log N_T, so the result is I(x; z | T). Normalising by N instead would add H(T), which the
    text's length tells without any latent."""
    samples = [posterior.rsample() for posterior in posteriors]
    log_q_own = torch.cat([q.log_prob(z) for q, z in zip(posteriors, samples)]).double()  # [N]
    log_aggregate = [torch.full((z.shape[0],), float("-inf"), dtype=torch.float64, device=z.device) for z in samples]
    for posterior in posteriors:
        for index, (owner, z) in enumerate(zip(posteriors, samples)):
            log_q = posterior.cross_log_prob(z, owner)  # [B_j, B_i]
            log_aggregate[index] = torch.logaddexp(log_aggregate[index], torch.logsumexp(log_q.double(), dim=0))
    log_count = _log_group_counts(posteriors, log_q_own)
    return float((log_q_own - (torch.cat(log_aggregate) - log_count)).mean())


@torch.no_grad()
def minibatch_mutual_information(posteriors: list) -> float:
    """He et al. (2019) / Optimus `calc_mi`: per minibatch (one posterior object per batch),
    E_q(z|x)[log q(z|x)] from the analytic entropy and log q(z_i) = logsumexp_j log q(z_i | x_j)
    - log M over the M examples of that minibatch only; averaged over examples. For chains the
    entropy is the sum of each group's conditional entropy at the sampled ancestors; for
    segment-wise latents the aggregate is taken within the segment count, as in
    `mutual_information`. Bounded by log M, so it is not comparable across batch sizes."""
    total, examples = 0.0, 0
    for posterior in posteriors:
        z = posterior.rsample()
        negative_entropy = -posterior.conditional_entropy(z).double()  # [M]
        log_q = posterior.cross_log_prob(z, posterior).double()  # [M_j, M_i]
        log_aggregate = torch.logsumexp(log_q, dim=0) - _log_group_counts([posterior], negative_entropy)
        total += float((negative_entropy - log_aggregate).sum())
        examples += z.shape[0]
    return total / examples


def _log_group_counts(posteriors: list, like: torch.Tensor) -> torch.Tensor:
    """log of the number of examples sharing each example's latent shape (its segment count),
    or log N when every latent has the same shape: [N], like `like`."""
    if posteriors[0].segment_counts is None:
        return torch.full_like(like, math.log(like.shape[0]))
    groups = torch.cat([posterior.segment_counts for posterior in posteriors])
    _, group_index, group_size = torch.unique(groups, return_inverse=True, return_counts=True)
    return group_size[group_index].double().log().to(like.device)


def active_units(means: torch.Tensor, delta: float) -> torch.Tensor:
    """Which latent dimensions are active: means [N, D] of E_q(z|x)[z] -> bool [D]."""
    return means.double().var(dim=0, unbiased=True) > delta


def batch_seed(seed: int, batch: int, part: int) -> int:
    """The seed of one evaluation batch's draws (`part` 0: importance samples, 1: the one-sample
    ELBO pass): each batch's numbers depend on nothing before it, so an evaluation resumed
    from its progress file gives the numbers of an uninterrupted one."""
    return ((seed * 1_000_003 + batch) * 2 + part) % 2**63


class Progress:
    """The importance-weighted estimates of the batches done so far, kept in a safetensors file
    under a `key` naming everything that changes them (an evaluation cut short resumes from it;
    a file with another key is ignored and replaced). A batch cut short keeps the samples it had
    scored and the random generator's state after them, so that it draws the rest as an
    uninterrupted evaluation would."""

    def __init__(self, path: Path, key: str):
        self.path, self.key, self.done = path, key, {}
        if path.is_file():
            try:
                with safe_open(str(path), "pt") as stored:
                    if (stored.metadata() or {}).get("key") == key:
                        self.done = {name: stored.get_tensor(name) for name in stored.keys()}
            except (SafetensorError, OSError):
                self.done = {}  # damaged: start again

    def get(self, batch: int, size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The stored estimates [size] of batch `batch`, or None (not done, or not of `size` examples)."""
        if f"log_px.{batch}" not in self.done or len(self.done[f"log_px.{batch}"]) != size:
            return None
        return self.done[f"log_px.{batch}"], self.done[f"log_px_mean.{batch}"]

    def put(self, batch: int, log_px: torch.Tensor, log_px_mean: torch.Tensor) -> None:
        self._drop_unfinished()
        self.done |= {f"log_px.{batch}": log_px.double().cpu(), f"log_px_mean.{batch}": log_px_mean.double().cpu()}
        self._write()

    def samples_of(self, batch: int, device: torch.device) -> ImportanceWeights | None:
        """The samples batch `batch` scored before it was cut short, with the random generators
        set to their state after them; None when there are none, or when they were drawn on
        another kind of device (whose generator is another: the batch is then redone)."""
        if "partial.batch" not in self.done or int(self.done["partial.batch"][0]) != batch:
            return None
        if ("partial.cuda_generator" in self.done) != (device.type == "cuda"):
            return None
        torch.set_rng_state(self.done["partial.generator"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(self.done["partial.cuda_generator"], device)
        return ImportanceWeights(*(self.done[f"partial.{name}"].to(device) for name in ("reconstruction", "latent", "groups")))

    def put_samples(self, batch: int, weights: ImportanceWeights, device: torch.device) -> None:
        """Keep the samples scored so far of the unfinished batch `batch`, and the random
        generators' state (the CPU's, and CUDA's when the samples are drawn there)."""
        self._drop_unfinished()
        self.done |= {"partial.batch": torch.tensor([batch]), "partial.generator": torch.get_rng_state(),
                      "partial.reconstruction": weights.reconstruction.cpu(), "partial.latent": weights.latent.cpu(),
                      "partial.groups": weights.groups.cpu()}
        if device.type == "cuda":
            self.done["partial.cuda_generator"] = torch.cuda.get_rng_state(device)
        self._write()

    @property
    def batches_done(self) -> int:
        return sum(name.startswith("log_px.") for name in self.done)

    @property
    def samples_of_next(self) -> int:
        """How many samples of each example the unfinished batch had scored (0 without one)."""
        return self.done["partial.reconstruction"].shape[1] if "partial.reconstruction" in self.done else 0

    def _drop_unfinished(self) -> None:
        self.done = {name: value for name, value in self.done.items() if not name.startswith("partial.")}

    def _write(self) -> None:
        write_atomically(self.path, lambda temporary: save_tensors(self.done, temporary, metadata={"key": self.key}))


@torch.no_grad()
def evaluate_likelihood(
    model: TextVAE,
    data: list[Encoded],
    batch_size: int = 32,
    iw_samples: int = 100,
    au_delta: float = 0.01,
    bf16: bool = False,
    seed: int = 0,
    iw_batch: int | None = None,
    progress: Progress | None = None,
    per_example_out: dict | None = None,
    show_pace: bool = False,
) -> dict:
    """`ppl`, `nll`, and for latent models `elbo`, `rec`, `kl`, `mi`, `au` (plus per-group KL
    and AU when the model has several latent groups), each mean with its standard error over
    examples (`*_stderr`), the papers' conventions (`*_layer_mean`, `mi_minibatch`), `tokens`,
    `examples`. The decoder scores `iw_batch` importance samples of every example at a time
    (None: as many as fit `POSITIONS_PER_PASS`): memory grows with batch_size x iw_batch, not
    with k. With `progress`, each batch's importance-weighted estimates are kept as they are
    made and read back instead of redone.
    `per_example_out`, when given, is filled with each example's `nll`, `tokens` (and `elbo`,
    `rec`, `kl`) [N] in the order of `data`: for paired comparisons of runs on the same texts.
    `show_pace`: say on stderr how far it has come (`evaluation/pace.py`)."""
    model.eval()
    device = next(model.parameters()).device
    per_example: dict[str, list[torch.Tensor]] = {key: [] for key in ("log_px", "log_px_mean", "rec", "kl", "groups", "tokens", "index")}
    kl_groups, posteriors = [], []
    segment_kl, segment_count = torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    batches = list(eval_batches([len(item.ids) for item in data], batch_size))
    pace = Pace([len(rows) * max(len(data[i].ids) for i in rows) for rows in batches], show_pace)
    with bf16_inference(model, bf16), model.backbone.merged_adapter():  # the second: fp32 only
        for index, rows in enumerate(batches):
            batch = collate([data[i] for i in rows], model.tokenizer.pad_id).to(device)
            stored = None if progress is None else progress.get(index, len(rows))
            computed = stored is None
            if computed:
                torch.manual_seed(batch_seed(seed, index, 0))
                stored = log_marginals(model, batch, iw_samples, iw_batch, progress, index)
                if progress is not None:
                    progress.put(index, *stored)
            log_px, log_px_mean = stored
            per_example["log_px"].append(log_px.double().cpu())
            per_example["log_px_mean"].append(log_px_mean.double().cpu())
            if model.has_latent:
                torch.manual_seed(batch_seed(seed, index, 1))
                out = model(batch)
                per_example["rec"].append(out.rec.double().cpu())
                per_example["kl"].append(out.kl.double().cpu())
                if model.latent_groups == "segment":  # their number varies by example
                    segment_kl = _add_padded(segment_kl, (out.kl_groups.double() * out.groups_present).sum(0).cpu())
                    segment_count = _add_padded(segment_count, out.groups_present.double().sum(0).cpu())
                    groups = out.groups_present.sum(1).clamp(min=1)
                elif model.latent_groups == "layer":
                    kl_groups.append(out.kl_groups.double().sum(0))
                    groups = torch.full((batch.size,), out.kl_groups.shape[1])
                else:
                    groups = torch.ones(batch.size)
                per_example["groups"].append(groups.double().cpu())
                posteriors.append(model.posterior(batch))
            per_example["tokens"].append(counted_tokens(batch, model.tokenizer.sep_id).double().cpu())
            per_example["index"].append(torch.tensor(rows))
            pace.done(index, computed)
    pace.close()
    values = {key: torch.cat(parts) for key, parts in per_example.items() if parts}
    tokens, examples = values["tokens"], len(data)
    metrics = {**perplexity_with_stderr("", -values["log_px"], tokens), **mean_with_stderr("nll", -values["log_px"])}
    if model.has_latent:
        rec, kl, groups = values["rec"], values["kl"], values["groups"]
        activity_means = torch.cat([q.activity_means for q in posteriors])
        # activity is a variance over observations (examples, or segments): none for one
        active = active_units(activity_means, au_delta) if len(activity_means) > 1 else None
        metrics.update(**mean_with_stderr("elbo", rec + kl), **mean_with_stderr("rec", rec), **mean_with_stderr("kl", kl))
        torch.manual_seed(seed)
        metrics.update(mi=mutual_information(posteriors), au=None if active is None else int(active.sum()))
        sizes = model.latent_group_sizes
        if len(sizes) > 1:
            metrics["kl_groups"] = (torch.stack(kl_groups).sum(0) / examples).tolist()
            if active is not None:
                metrics["au_groups"] = [int(part.sum()) for part in active.split(sizes)]
                metrics["au_mean"] = sum(metrics["au_groups"]) / len(sizes)
        if len(segment_count):
            metrics["kl_segments"] = (segment_kl / segment_count).tolist()
        # the papers' conventions, beside the true quantities (docs/metrics.md)
        metrics.update(**mean_with_stderr("kl_layer_mean", kl / groups), **mean_with_stderr("elbo_layer_mean", rec + kl / groups))
        metrics.update(**perplexity_with_stderr("_layer_mean", -values["log_px_mean"], tokens))
        metrics.update(mi_minibatch=minibatch_mutual_information(posteriors), mi_minibatch_size=batch_size)
    metrics.update(tokens=int(tokens.sum()), examples=examples)
    if per_example_out is not None:
        order = torch.argsort(values["index"])  # batches run longest first
        per_example_out["nll"], per_example_out["tokens"] = -values["log_px"][order], tokens[order]
        if model.has_latent:
            per_example_out.update(elbo=(values["rec"] + values["kl"])[order], rec=values["rec"][order], kl=values["kl"][order])
    return metrics


def mean_with_stderr(name: str, values: torch.Tensor) -> dict[str, float | None]:
    """The mean of per-example `values` [N] and its standard error (None for one example: no
    spread to measure)."""
    stderr = float(values.std(unbiased=True) / math.sqrt(len(values))) if len(values) > 1 else None
    return {name: float(values.mean()), f"{name}_stderr": stderr}


def perplexity_with_stderr(suffix: str, nll: torch.Tensor, tokens: torch.Tensor) -> dict[str, float | None]:
    """ppl = exp(sum nll / sum tokens) over examples [N], and its standard error by the delta
    method for a ratio of sums: se(ppl) = ppl * sd(nll_i - r t_i) / (mean(t) sqrt(N)) (None for
    one example)."""
    rate = float(nll.sum() / tokens.sum())
    ppl = math.exp(rate)
    count = len(nll)
    if count < 2:
        return {f"ppl{suffix}": ppl, f"ppl{suffix}_stderr": None}
    spread = float((nll - rate * tokens).std(unbiased=True))
    return {f"ppl{suffix}": ppl, f"ppl{suffix}_stderr": ppl * spread / (float(tokens.mean()) * math.sqrt(count))}


def _add_padded(total: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """Elementwise sum of two 1-D tensors of possibly different lengths (zero-padded)."""
    size = max(len(total), len(part))
    padded = torch.zeros(size, dtype=torch.float64)
    padded[: len(total)] += total
    padded[: len(part)] += part
    return padded
