"""How much of a run's likelihood its decoder gets with no information in z: the NLL of each of
the first N test examples with one text-independent z for all of them, next to the exact NLL
of runs without latents. Any fixed z turns a VAE's decoder into a plain language model, so its
NLL is exact; a VAE whose IW bound beats the LM by what its decoder alone beats it by owes the
gain to its decoder's capacity, not to what z carries. Used in docs/results.md (quora: the embed
row's gain is the decoder's; SmolLM2 PTB: where DELLA's gain comes from).

`--latent zero` sets z = 0; `--latent prior-mean` the prior's mean (for DELLA its chain run on
means; for a conditional model given the source). Prints each run's mean NLL per example with
its standard error (`--precision`: the pass `textvae evaluate --precision` makes) and,
after the first run, its paired difference from the first run over the same examples;
`--per-example DIR` keeps each example's NLL for `textvae compare`.

    python benchmarks/decoder_without_latent.py runs/quora-embed runs/quora-lm [--examples 200]
    python benchmarks/decoder_without_latent.py runs/smollm2-lm runs/smollm2-della --examples 1000 --latent prior-mean
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from textvae.data.batching import collate, counted_tokens, encode_examples
from textvae.data.corpus import read_split, resolve_data_dir
from textvae.evaluation.likelihood import mean_with_stderr
from textvae.evaluation.paired import tokens_sha
from textvae.files import write_text_atomically
from textvae.models.registry import load_model
from textvae.training.environment import bf16_inference, resolve_bf16


def example_nlls(run_dir: str, examples: int, batch_size: int, latent: str,
                 bf16: bool) -> tuple[str, list[float], list[int], list[dict]]:
    """The run's NLL of each of the first `examples` test examples (exact for a model without
    latents, -log p(x | z) with the fixed z otherwise), each one's counted tokens, and what
    identifies each for `textvae compare` (its `index` in the split and `tokens_sha`)."""
    model, config = load_model(run_dir)
    data = config.data
    split = read_split(resolve_data_dir(data.path), "test")
    encoded, _ = encode_examples(split.examples[:examples], model.tokenizer, data.max_length,
                                 data.max_source_length, data.overlong)
    nlls: list[float] = []
    tokens: list[int] = []
    with bf16_inference(model, bf16):
        for start in range(0, len(encoded), batch_size):
            batch = collate(encoded[start : start + batch_size], model.tokenizer.pad_id)
            tokens += counted_tokens(batch, model.tokenizer.sep_id).tolist()
            if not model.has_latent:
                nlls += model(batch).rec.tolist()
                continue
            if latent == "zero":
                z = torch.zeros(batch.size, sum(model.latent_group_sizes))
            else:
                z = model.prior(batch).mean.expand(batch.size, -1)
            nlls += model.decoder_nll(batch, z).tolist()
    what = "exact NLL" if not model.has_latent else f"decoder NLL at z = {latent.replace('-', ' ')}"
    identities = [{"index": item.position, "tokens_sha": tokens_sha(item.ids, model.tokenizer.sep_id)} for item in encoded]
    return what, nlls, tokens, identities


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+")
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--latent", choices=("zero", "prior-mean"), default="zero")
    parser.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="fp32",
                        help="as `textvae evaluate --precision` (auto: bf16 where the CPU has it natively)")
    parser.add_argument("--per-example", type=Path, metavar="DIR",
                        help="write DIR/RUN.jsonl (index, nll, tokens), the format `textvae compare` pairs")
    args = parser.parse_args()
    reference = None
    for run_dir in args.run_dirs:
        what, nlls, tokens, identities = example_nlls(run_dir, args.examples, args.batch_size, args.latent,
                                                      resolve_bf16(args.precision, torch.device("cpu")))
        if args.per_example:
            args.per_example.mkdir(parents=True, exist_ok=True)
            lines = [json.dumps({**identity, "nll": nll, "tokens": n})
                     for identity, nll, n in zip(identities, nlls, tokens, strict=True)]
            write_text_atomically(args.per_example / f"{Path(run_dir).name}.jsonl", "\n".join(lines) + "\n")
        nll = mean_with_stderr("nll", torch.tensor(nlls, dtype=torch.float64))
        line = f"{run_dir}: {what} {nll['nll']:.2f} ± {_error(nll['nll_stderr'])} nats per example over {len(nlls)} test examples"
        if reference is None:
            reference = (run_dir, torch.tensor(nlls, dtype=torch.float64))
        else:
            diff = mean_with_stderr("diff", torch.tensor(nlls, dtype=torch.float64) - reference[1])
            line += f"; minus {reference[0]}'s: {diff['diff']:+.2f} ± {_error(diff['diff_stderr'])} (paired)"
        print(line, flush=True)


def _error(stderr: float | None) -> str:
    return "n/a" if stderr is None else f"{stderr:.2f}"  # None: one example


if __name__ == "__main__":
    main()
