"""The Python API: a trained run as an object that takes text in and gives text (or numbers)
out. Batching, devices, padding and tokenisation happen here; bad input raises `TextVAEError`
with the same one-line messages as the CLI, which is a client of this module.

Latents travel in one layout for every model, [N, G, P]: G latent groups of P dimensions,
the groups being the single latent (G = 1), DELLA's layers (one per fused decoder layer) or
a segment-wise model's segments (TRACE, IND, CGD; texts differ in their number of segments,
so `Posterior.present` [N, G] says which a text has).

    import textvae
    vae = textvae.load("runs/demo")
    posterior = vae.encode(["a man is playing a guitar ."])   # .mean [1, G, P]
    vae.decode(posterior.mean)                                 # -> ["a man is playing ..."]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from textvae.errors import TextVAEError


@dataclass
class Posterior:
    """q(z | x) of a list of texts, by latent group (see the module docstring).

    `mean` and `log_var` are each group's parameters along the chain run on means (for DELLA
    and TRACE a group's posterior depends on the groups before it); `sample` draws from the
    model's actual posterior, ancestrally."""

    mean: torch.Tensor  # [N, G, P]
    log_var: torch.Tensor  # [N, G, P]
    present: torch.Tensor  # [N, G] bool
    kind: str  # single | layer | segment
    _distributions: list  # the model's posterior objects, one per batch of texts
    _model: Any

    @property
    def std(self) -> torch.Tensor:
        """exp(log_var / 2) [N, G, P]."""
        return torch.exp(0.5 * self.log_var)

    @torch.no_grad()
    def sample(self, k: int | None = None, seed: int | None = None) -> torch.Tensor:
        """One latent per text [N, G, P], or k per text [N, k, G, P] (float32, CPU, as `mean`)."""
        if seed is not None:
            torch.manual_seed(seed)
        draws = []
        for distribution in self._distributions:
            z = self._model.latent_to_groups(distribution.rsample(k))
            draws.append(z)
        width = self.mean.shape[1]  # batches of segment-wise texts differ in segment count
        return torch.cat([_pad_groups(z, width, dim=-2) for z in draws]).float().cpu()


class TrainedVAE:
    """A trained run: `textvae.load(run_dir)`. Texts are read as the run's training data
    (`[BOS] text [EOS]`, or `[BOS] source [SEP] text [EOS]` with a source, cut to
    data.max_length)."""

    def __init__(self, model, config, run_dir: Path | None = None, batch_size: int = 32):
        if batch_size < 1:
            raise TextVAEError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.config, self.run_dir, self.batch_size = model.eval(), config, run_dir, batch_size

    @property
    def device(self) -> torch.device:
        """Where the model's weights are."""
        return next(self.model.parameters()).device

    @property
    def latent_kind(self) -> str | None:
        """single | layer | segment, or None for a plain language model."""
        return self.model.latent_groups

    # --- latents ---------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, texts: list[str], sources: list[str] | None = None) -> Posterior:
        """q(z | x) of every text (with its source, for conditional runs)."""
        self._require_latent("encode")
        batches = self._batches(texts, sources)
        distributions, groups = [], []
        for batch in batches:
            distribution = self.model.posterior(batch)
            distributions.append(distribution)
            groups.append(distribution.grouped())
        width = max(g.mean.shape[1] for g in groups)
        mean = torch.cat([_pad_groups(g.mean, width, dim=1) for g in groups]).float().cpu()
        log_var = torch.cat([_pad_groups(g.log_var, width, dim=1) for g in groups]).float().cpu()
        present = torch.cat([_pad_groups(g.present, width, dim=1) for g in groups]).cpu()
        return Posterior(mean, log_var, present, self.latent_kind, distributions, self.model)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, decoding: str = "greedy", prompts: list[str] | None = None,
               present: torch.Tensor | None = None, seed: int = 0, **options) -> list[str]:
        """A text from each latent [N, G, P] (as `encode(...).mean` or `.sample()` give them).
        Segment-wise models read segment t's latent while generating segment t, as many as
        `present` [N, G] gives (default: all G), then draw further ones from the prior.
        `prompts`: the sources of a conditional run. `options`: top_k, top_p, num_beams,
        temperature, length_penalty, max_new_tokens."""
        self._require_latent("decode")
        latents = torch.as_tensor(latents, dtype=torch.float32)
        if latents.dim() == 2:  # one text
            latents = latents[None]
        sizes = self.model.latent_group_sizes
        if latents.dim() != 3 or latents.shape[-1] != sizes[0] or (self.latent_kind != "segment" and latents.shape[1] != len(sizes)):
            raise TextVAEError(f"latents must be [N, groups, {sizes[0]}]"
                               + ("" if self.latent_kind == "segment" else f" with {len(sizes)} groups")
                               + f", got {list(latents.shape)}")
        if present is None:
            present = torch.ones(latents.shape[:2], dtype=torch.bool)
        present = torch.as_tensor(present, dtype=torch.bool)
        if present.shape != latents.shape[:2]:
            raise TextVAEError(f"present must be [N, groups] = {list(latents.shape[:2])}, got {list(present.shape)}")
        prompt_ids = self._prompts(len(latents), prompts)
        config = self._decoding(decoding, options)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        torch.manual_seed(seed)
        from textvae.generation.decode import decode

        texts = []
        with self.model.backbone.merged_adapter():  # LoRA folded into the base in float32 (a no-op otherwise)
            for start in range(0, len(latents), self.batch_size):
                rows = slice(start, start + self.batch_size)
                state = self.model.decoding_latent(latents[rows], present[rows], prompt_ids[rows], self.device)
                texts += [self.model.tokenizer.decode(t) for t in decode(self.model, prompt_ids[rows], state, config, generator)]
        return texts

    def sample(self, n: int, decoding: str | None = None, prompts: list[str] | None = None, seed: int = 0,
               **options) -> list[str]:
        """n texts with latents from the prior (n per prompt for conditional runs, in prompt
        order). Decoding default: beam search for summarization and paraphrase runs, else top-p."""
        from textvae.generation.decode import generate_texts

        decoding = decoding or default_decoding(self.config, "top-p")
        if n < 1:
            raise TextVAEError("the number of samples must be >= 1")
        if prompts is not None and not prompts:
            raise TextVAEError("no prompts given")
        return generate_texts(self.model, n, self._decoding(decoding, options), seed=seed, sources=prompts,
                              max_source_length=self.config.data.max_source_length, batch_size=self.batch_size)

    def reconstruct(self, texts: list[str], decoding: str = "greedy", use_mean: bool = True, seed: int = 0,
                    sources: list[str] | None = None, **options) -> list[str]:
        """Each text decoded from its posterior mean (or one posterior sample)."""
        posterior = self.encode(texts, sources)
        latents = posterior.mean if use_mean else posterior.sample(seed=seed)
        return self.decode(latents, decoding, prompts=sources, present=posterior.present, seed=seed, **options)

    def interpolate(self, text_a: str, text_b: str, steps: int = 5, decoding: str = "greedy", seed: int = 0,
                    **options) -> list[tuple[float, str]]:
        """`steps` (>= 2) evenly spaced z = (1 - t) mu_a + t mu_b, t from 0 to 1, each decoded.
        Segment-wise models interpolate segment by segment, so both texts need the same
        number of segments."""
        self._require_sourceless("interpolation")
        if steps < 2:
            raise TextVAEError("--steps must be >= 2 (the two end points are included)")
        posterior = self.encode([text_a, text_b])
        if not torch.equal(posterior.present[0], posterior.present[1]):
            counts = posterior.present.sum(1).tolist()
            raise TextVAEError(f"the two texts have {counts[0]} and {counts[1]} segments: interpolation pairs "
                               "segment t with segment t, so they need the same number")
        weights = torch.linspace(0, 1, steps)[:, None, None]
        latents = (1 - weights) * posterior.mean[0] + weights * posterior.mean[1]
        present = posterior.present[:1].expand(steps, -1)
        texts = self.decode(latents, decoding, present=present, seed=seed, **options)
        return [(float(t), text) for t, text in zip(weights[:, 0, 0], texts)]

    def attribute_vector(self, from_texts: list[str], to_texts: list[str]) -> torch.Tensor:
        """The mean posterior mean of `to_texts` minus that of `from_texts`: [G, P]."""
        self._require_single_point("attribute vectors")
        self._require_sourceless("attribute vectors")
        return self.encode(to_texts).mean.mean(0) - self.encode(from_texts).mean.mean(0)

    def steer(self, texts: list[str], vector: torch.Tensor, alpha: float = 1.0, decoding: str = "greedy",
              seed: int = 0, **options) -> list[str]:
        """Each text decoded from its posterior mean plus alpha * vector ([G, P], every group)."""
        self._require_single_point("steering")
        self._require_sourceless("steering")
        vector = torch.as_tensor(vector, dtype=torch.float32)
        groups = (len(self.model.latent_group_sizes), self.model.latent_group_sizes[0])
        if vector.shape not in (torch.Size(groups), torch.Size(groups[1:])):
            raise TextVAEError(f"the steering vector must be [{groups[0]}, {groups[1]}] (or [{groups[1]}] for every "
                               f"group), got {list(vector.shape)}")
        means = self.encode(texts).mean
        return self.decode(means + alpha * vector, decoding, seed=seed, **options)

    def analogy(self, text_a: str, text_b: str, text_c: str, decoding: str = "greedy", seed: int = 0,
                **options) -> str:
        """A is to B as C is to D: D decoded from z_C + (z_B - z_A) (posterior means)."""
        self._require_single_point("analogies")
        self._require_sourceless("analogies")
        means = self.encode([text_a, text_b, text_c]).mean
        return self.decode(means[2] + means[1] - means[0], decoding, seed=seed, **options)[0]

    # --- likelihoods -----------------------------------------------------------------
    @torch.no_grad()
    def log_likelihood(self, texts: list[str], k: int = 100, seed: int = 0, sources: list[str] | None = None,
                       bf16: bool = False) -> dict[str, list]:
        """Per text: `log_likelihood`, the importance-weighted estimate of log p(x) with k
        posterior samples (exact for a plain LM), in nats; `tokens`, the scored tokens."""
        from textvae.data.batching import counted_tokens
        from textvae.evaluation.likelihood import batch_seed, log_marginals
        from textvae.training.environment import bf16_inference

        if k < 1:
            raise TextVAEError("k (importance samples) must be >= 1")
        values, tokens = [], []
        for index, batch in enumerate(self._batches(texts, sources)):
            torch.manual_seed(batch_seed(seed, index, 0))  # as `evaluate` draws them
            with bf16_inference(self.model, bf16), self.model.backbone.merged_adapter():  # the second: fp32 only
                values += log_marginals(self.model, batch, k)[0].double().tolist()
            tokens += counted_tokens(batch, self.model.tokenizer.sep_id).tolist()
        return {"log_likelihood": values, "tokens": tokens}

    @torch.no_grad()
    def score(self, texts: list[str], seed: int = 0, sources: list[str] | None = None) -> dict[str, list]:
        """Per text, in nats, from one posterior sample: `rec` (-log p(x | z)), `kl`
        (KL(q(z | x) || p(z))) and `elbo` = rec + kl (the negative ELBO, an upper bound on
        -log p(x), as `evaluate` reports it, with the same draws for the same batches); `tokens`."""
        from textvae.data.batching import counted_tokens
        from textvae.evaluation.likelihood import batch_seed

        parts: dict[str, list] = {"rec": [], "kl": [], "elbo": [], "tokens": []}
        for index, batch in enumerate(self._batches(texts, sources)):
            torch.manual_seed(batch_seed(seed, index, 1))  # as `evaluate` draws its ELBO pass
            with self.model.backbone.merged_adapter():
                out = self.model(batch)
            parts["rec"] += out.rec.double().tolist()
            parts["kl"] += out.kl.double().tolist()
            parts["elbo"] += (out.rec + out.kl).double().tolist()
            parts["tokens"] += counted_tokens(batch, self.model.tokenizer.sep_id).tolist()
        return parts

    def save(self, directory: str | Path) -> None:
        """Write the model as a new run directory (absent or empty) that `textvae.load` (and
        the CLI) read."""
        from textvae.models.registry import save_model

        directory = Path(directory)
        if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
            raise TextVAEError(f"save writes a new run directory; {directory} already exists and is "
                               + ("a file" if not directory.is_dir() else "not empty"))
        save_model(self.model, Path(directory), self.config.to_dict())

    # --- helpers ---------------------------------------------------------------------
    def _require_latent(self, what: str) -> None:
        if not self.model.has_latent:
            raise TextVAEError(f"model {self.model.name!r} has no latent variable ({what} needs one)")

    def _require_single_point(self, what: str) -> None:
        self._require_latent(what)
        if self.latent_kind == "segment":
            raise TextVAEError(f"model {self.model.name!r} has one latent per segment; {what} need one latent "
                               "point per text (single-latent models and DELLA)")

    def _require_sourceless(self, what: str) -> None:
        if self.model.backbone.is_encoder_decoder:
            raise TextVAEError(f"{what} work on texts alone; an encoder-decoder run reads each text with its source "
                               "(use encode and decode with sources and prompts)")

    def _batches(self, texts: list[str], sources: list[str] | None):
        from textvae.data.batching import collate, encode_examples
        from textvae.data.corpus import Example

        texts = _text_list(texts, "texts")
        if sources is not None and len(_text_list(sources, "sources")) != len(texts):
            raise TextVAEError(f"{len(sources)} sources for {len(texts)} texts")
        if self.model.backbone.is_encoder_decoder and sources is None:
            raise TextVAEError("an encoder-decoder run reads every text with its source: pass sources")
        examples = [Example(text, None if sources is None else sources[i]) for i, text in enumerate(texts)]
        data = self.config.data
        if sources is not None:  # this run's lengths are fixed: only a shorter source can help
            for index, ids in enumerate(self.model.tokenizer.encode_batch(sources)):
                if min(len(ids), data.max_source_length) + 2 >= data.max_length:
                    raise TextVAEError(f"source {index + 1} leaves no room for its text in this run's "
                                       f"data.max_length={data.max_length} tokens: give a shorter source")
        encoded, _ = encode_examples(examples, self.model.tokenizer, data.max_length, data.max_source_length,
                                     "truncate", self.model.segmenter)
        return [collate(encoded[i : i + self.batch_size], self.model.tokenizer.pad_id).to(self.device)
                for i in range(0, len(encoded), self.batch_size)]

    def _prompts(self, count: int, sources: list[str] | None) -> list[list[int]]:
        from textvae.generation.decode import source_prompts, unconditional_prompts

        if sources is None:
            return unconditional_prompts(self.model, count)
        if len(_text_list(sources, "prompts")) != count:
            raise TextVAEError(f"{len(sources)} prompts for {count} latents")
        return source_prompts(self.model.tokenizer, sources, self.config.data.max_source_length)[0]

    def _decoding(self, strategy: str, options: dict):
        return decoding_config(self.config, strategy, options)


def load(run_dir: str | Path, device: str | None = None, batch_size: int = 32) -> TrainedVAE:
    """The trained run in `run_dir` (default device: CUDA when available, else the CPU)."""
    from textvae.runs import load_run

    model, config = load_run(run_dir, device)
    return TrainedVAE(model, config, Path(run_dir), batch_size)


def train(config: str | Path | dict | None = None, out: str | Path | None = None, data: str | None = None,
          overrides: list[str] | dict | None = None, resume: bool = False, overwrite: bool = False,
          task: str | None = None) -> dict:
    """Train a model into run directory `out`, as `textvae train` does; returns the final
    validation metrics (the dict the CLI prints). `config`: a YAML path or a mapping with
    the sections data, backbone, train, kl, model; `overrides`: `key=value` strings or a
    {key: value} mapping (e.g. {"model.name": "della", "train.max_steps": 100})."""
    from textvae.config import load_yaml
    from textvae.runs import assemble_config, train_run

    if out is None:
        raise TextVAEError("train needs out (the run directory to create)")
    raw = load_yaml(config) if isinstance(config, (str, Path)) else dict(config or {})
    # a mapping's values are kept as given: JSON text parses back, as YAML, to the same value
    as_text = lambda value: json.dumps(value, default=str)  # noqa: E731 - Path -> its string
    assignments = ([f"{k}={as_text(v)}" for k, v in overrides.items()] if isinstance(overrides, dict)
                   else list(overrides or []))
    if data is not None:
        assignments.insert(0, f"data.path={as_text(data)}")
    return train_run(assemble_config(raw, assignments, task), out, resume=resume, overwrite=overwrite)


def evaluate(run_dir: str | Path, split: str = "test", data: str | None = None, iw_samples: int = 100,
             au_delta: float = 0.01, seed: int = 0, precision: str = "fp32", batch_size: int = 32,
             generate: int = 0, decoding: str | None = None, samples_per_source: int = 1,
             metrics: list[str] | None = None, samples_out: str | Path | None = None, mauve_features: str = "minilm",
             examples: int | None = None, device: str | None = None, verbose: bool = False, on_start=None,
             iw_batch: int | None = None, per_example: str | Path | None = None, reconstruction: int = 0,
             **decoding_options) -> dict:
    """Metrics of a trained run on a split, as `textvae evaluate` reports them
    (docs/metrics.md): ppl, nll, elbo, rec, kl, mi, au with `*_stderr`, and the papers'
    conventions (`evaluation/likelihood.py`); with `generate` = N, also text metrics of N
    samples (`evaluation/generated.py`; decoding default: beam search for summarization and
    paraphrase runs, else top-k 50; `decoding_options`: top_k, top_p, num_beams, temperature,
    length_penalty, max_new_tokens).
    `examples`: only the split's first N examples (a fixed subset, the same for every run).
    `iw_batch`: importance samples scored at a time (memory ~ batch_size x iw_batch); None: as
    many as keep a decoder pass within `likelihood.POSITIONS_PER_PASS` positions.
    `per_example`: also write each example's numbers there, one JSON line per example (`index`,
    its place in the split, counted before `data.overlong` drops; `nll`, `tokens`, and `elbo`,
    `rec`, `kl` for latent models), in split order: paired comparisons of runs on the same texts.
    `reconstruction` = N: also decode greedily, from their posterior means, the first N
    examples of the evaluated subset that fit whole in `data.max_length` (a cut text cannot
    come back whole) and score them against their inputs (`reconstruction_bleu`, `_exact`,
    `_jaccard`, `_examples`: `evaluation/text_metrics.reconstruction_scores`).
    `on_start`: called once the inputs are checked, as the work begins."""
    from textvae.data.corpus import read_split, resolve_data_dir
    from textvae.evaluation.generated import generate_and_score
    from textvae.evaluation.likelihood import Progress, evaluate_likelihood
    from textvae.evaluation.paired import tokens_sha
    from textvae.evaluation.text_metrics import check_metric_names
    from textvae.files import check_writable, write_text_atomically
    from textvae.runs import encode_split, load_run
    from textvae.training.environment import resolve_bf16

    if iw_samples < 1 or batch_size < 1 or (iw_batch is not None and iw_batch < 1):
        raise TextVAEError("--iw-samples, --iw-batch and --batch-size must be >= 1")
    if au_delta < 0:
        raise TextVAEError("--au-delta must be >= 0")
    if split not in ("train", "valid", "test"):
        raise TextVAEError(f"split must be train, valid or test, got {split!r}")
    if examples is not None and examples < 1:
        raise TextVAEError("--examples must be >= 1")
    if reconstruction < 0 or generate < 0:
        raise TextVAEError("--reconstruction and --generate must be >= 0")
    check_writable(per_example, "--per-example")
    check_writable(samples_out, "--samples-out")
    model, config = load_run(run_dir, device)
    if reconstruction and not model.has_latent:
        raise TextVAEError("--reconstruction needs a model with a latent; this run is a plain language model")
    data_dir = resolve_data_dir(data or config.data.path)
    split_data = read_split(data_dir, split)
    scored = dataclasses.replace(split_data, examples=split_data.examples[:examples])  # [:None]: all
    encoded = encode_split(scored, model, config, split, verbose)
    if not encoded:
        raise TextVAEError("no examples left after applying data.max_length (see data.overlong)")
    bf16 = resolve_bf16(precision, next(model.parameters()).device)
    if generate:  # checked before the long likelihood pass
        if generate < 2 and not split_data.conditional:
            raise TextVAEError("--generate needs at least 2 samples (Self-BLEU and Jaccard compare samples)")
        if samples_per_source < 1:
            raise TextVAEError("--samples-per-source must be >= 1")
        try:
            check_metric_names(metrics)
        except ValueError as err:
            raise TextVAEError(str(err)) from None
        generation = decoding_config(config, decoding or default_decoding(config, "top-k"), decoding_options)
    if reconstruction:  # chosen before the long likelihood pass, so that a bad choice fails first
        whole = _whole_examples(scored, model, config, reconstruction)
        if not whole:
            raise TextVAEError("--reconstruction: none of the evaluated examples fits whole in data.max_length")
    if on_start is not None:
        on_start()
    # an evaluation cut short resumes from what it had done (the same numbers as one run)
    scored_tokens = hashlib.sha256(json.dumps([item.ids for item in encoded]).encode()).hexdigest()  # the very tokens scored
    key = json.dumps({"data": str(data_dir.resolve()), "split": split, "tokens": scored_tokens,
                      "examples": examples, "iw_samples": iw_samples, "iw_batch": iw_batch, "seed": seed,
                      "bf16": bf16, "batch_size": batch_size, "device": next(model.parameters()).device.type,
                      "weights": _file_identity(Path(run_dir) / "model.safetensors")})
    progress = Progress(Path(run_dir) / f".eval_{split}.progress.safetensors", key)
    if (progress.batches_done or progress.samples_of_next) and verbose:
        unfinished = f", and {progress.samples_of_next} of {iw_samples} samples of the next" if progress.samples_of_next else ""
        print(f"resuming: {progress.batches_done} batches of importance samples already done{unfinished} ({progress.path})",
              file=sys.stderr)
    values: dict = {}
    results = evaluate_likelihood(model, encoded, batch_size, iw_samples, au_delta, bf16, seed, iw_batch, progress, values,
                                  show_pace=verbose)
    if per_example is not None:
        sep = model.tokenizer.sep_id
        lines = [json.dumps({"index": item.position, "tokens_sha": tokens_sha(item.ids, sep),
                             **{key: float(column[index]) for key, column in values.items()}})
                 for index, item in enumerate(encoded)]
        write_text_atomically(per_example, "".join(line + "\n" for line in lines))
    progress.path.unlink(missing_ok=True)
    # the settings that change the numbers, so that records made with different ones stay apart
    results["settings"] = {"iw_samples": iw_samples if model.has_latent else None, "au_delta": au_delta,
                           "seed": seed, "precision": "bf16" if bf16 else "fp32", "examples_limit": examples,
                           "iw_batch": (iw_batch or "auto") if model.has_latent else None}
    if reconstruction:
        results.update(_reconstruction(TrainedVAE(model, config, batch_size=batch_size), whole))
    if generate:
        results.update(generate_and_score(model, config, split_data, generate, generation, seed, samples_per_source,
                                          metrics, samples_out, mauve_features))
    return results


def _whole_examples(split, model, config, count: int) -> list:
    """The first `count` of the split's examples that the model reads whole: a non-empty text
    (and, on conditional data, a non-empty source) whose layout fits in `data.max_length`
    untruncated."""
    from textvae.data.batching import encode_examples

    data, chosen = config.data, []
    for example in split.examples:
        if len(chosen) == count:
            break
        if not example.target.strip() or (split.conditional and not (example.source or "").strip()):
            continue
        kept, stats = encode_examples([example], model.tokenizer, data.max_length, data.max_source_length, "drop",
                                      model.segmenter)
        if kept and not stats.sources_truncated:
            chosen.append(example)
    return chosen


def _reconstruction(vae: TrainedVAE, examples: list) -> dict:
    """`reconstruction_scores` of the examples' greedy reconstructions from their posterior means."""
    from textvae.evaluation.text_metrics import reconstruction_scores

    texts = [example.target for example in examples]
    sources = [example.source for example in examples] if examples[0].source is not None else None
    return {**reconstruction_scores(texts, vae.reconstruct(texts, sources=sources)),
            "reconstruction_examples": len(texts)}


def compare(a: str | Path, b: str | Path, same_tokens_only: bool = False) -> dict:
    """The paired difference of two files written by `evaluate(..., per_example=PATH)` (or
    `textvae evaluate --per-example`), as `textvae compare A B` prints it: `KEY_a`, `KEY_b`,
    `KEY_diff`, `KEY_diff_stderr` for nll/elbo/rec/kl (a language model's exact NLL standing
    for its ELBO and rec: `nll_as_bound`), `nll_per_token_diff`; `same_tokens_only` pairs only
    the examples both scored with the same token count (evaluation/paired.py)."""
    from textvae.evaluation.paired import paired_comparison, parse_per_example
    from textvae.runs import read_lines

    a_records, b_records = (parse_per_example(read_lines(path, "per-example records"), str(path)) for path in (a, b))
    return paired_comparison(a_records, b_records, same_tokens_only)


def score(samples: list[str], references: list[str], metrics: list[str] | None = None,
          mauve_features: str = "minilm", group_size: int | None = None) -> dict:
    """The text metrics of `samples` against `references`, as `textvae score` gives them
    (docs/metrics.md): by default the unpaired ones; paired ones (bleu_ref, rouge_*,
    bertscore) set sample i against reference i. `group_size`: consecutive groups of that
    many samples share a source, and Self-BLEU and Jaccard compare within each group.
    BLEU and Self-BLEU are fractions in [0, 1]."""
    from textvae.evaluation.text_metrics import score as text_scores

    for texts, what in ((samples, "samples"), (references, "references")):
        if isinstance(texts, str) or not all(isinstance(text, str) for text in texts):
            raise TextVAEError(f"{what} must be a list of strings (an empty string: a model that wrote nothing)")
    try:
        return text_scores(list(samples), list(references), metrics, mauve_features, group_size)
    except ValueError as err:
        raise TextVAEError(str(err)) from None


def report(run_dirs: list[str | Path], out: str | Path, split: str = "test", reference: str | Path | None = None,
           interpolate: tuple[str, str] | None = None, steps: int = 5) -> str:
    """Write OUT/report.md (a table of the runs' `split` evaluations, with each run's NLL and
    ELBO paired against `reference`'s when given) and its plots (training curves, KL per
    latent group), as `textvae report` does; with `interpolate` (two sentences), each latent
    run's greedy decodings along `steps` points between them. Returns the markdown."""
    from textvae.evaluation.report import build_report, interpolation_listing, named_apart, read_run

    if steps < 2:
        raise TextVAEError("steps must be >= 2 (the two end points are included)")
    for run_dir in [*run_dirs, *([reference] if reference else [])]:
        if not Path(run_dir).is_dir():
            raise TextVAEError(f"run directory not found: {run_dir}")
    records = named_apart([read_run(run_dir, split) for run_dir in run_dirs])
    listing = None
    if interpolate:
        paths = {record.name: interpolation_path(record.directory, *interpolate, steps) for record in records}
        listing = interpolation_listing(*interpolate, {name: path for name, path in paths.items() if path is not None})
    return build_report(records, Path(out), split, listing, read_run(reference, split) if reference else None)


def _file_identity(path: Path) -> str:
    """Size and modification time of a file: a retrained run's weights change them."""
    status = path.stat()
    return f"{status.st_size}:{status.st_mtime_ns}"


def interpolation_path(run_dir: str | Path, text_a: str, text_b: str, steps: int) -> list[tuple[float, str]] | str | None:
    """Greedy decodings between the posterior means of two texts for `textvae report`, the
    reason there are none (one line), or None for a model without latents."""
    vae = load(run_dir)
    if vae.latent_kind is None:
        return None
    try:
        return vae.interpolate(text_a, text_b, steps, "greedy", seed=0)
    except TextVAEError as err:  # e.g. two texts with different segment counts
        return str(err)


def decoding_config(config, strategy: str, options: dict):
    """A validated `DecodingConfig`: `options` (top_k, top_p, num_beams, temperature,
    max_new_tokens; None = default) over the defaults, max_new_tokens = the run's max_length."""
    from textvae.generation.decode import DecodingConfig

    options = {key: value for key, value in options.items() if value is not None}
    options.setdefault("max_new_tokens", config.data.max_length)
    try:
        decoding = DecodingConfig(strategy=strategy, **options)
    except TypeError as err:
        raise TextVAEError(f"unknown decoding option: {err}") from None
    decoding.validate()
    return decoding


def default_decoding(config, fallback: str) -> str:
    """Beam search for summarization and paraphrase runs (as the DELLA paper decodes them),
    else `fallback`."""
    from textvae.config import ENCODER_DECODER_TASKS

    return "beam" if config.data.task in ENCODER_DECODER_TASKS else fallback


def _text_list(texts, what: str) -> list[str]:
    if isinstance(texts, str):
        raise TextVAEError(f"{what} must be a list of strings, not one string")
    texts = list(texts)
    if not texts:
        raise TextVAEError(f"no {what} given")
    if not all(isinstance(text, str) for text in texts):
        raise TextVAEError(f"{what} must be strings")
    blank = next((index for index, text in enumerate(texts) if not text.strip()), None)
    if blank is not None:
        raise TextVAEError(f"{what.rstrip('s')} {blank + 1} is empty")
    return texts


def _pad_groups(values: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Pad the group axis `dim` with zeros (False) to `width`."""
    missing = width - values.shape[dim]
    if missing == 0:
        return values
    shape = list(values.shape)
    shape[dim] = missing
    return torch.cat([values, values.new_zeros(shape)], dim=dim)
