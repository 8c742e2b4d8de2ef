"""Where a segment-wise model's decoder loses against a plain LM, token by token: each of the
first N test texts scored by the segment model's decoder with z at the posterior mean (the
chain run on means; TRACE-P's z from its mean v, each increment u at its mean given v) and by
the LM (exact), the per-token differences summed per text into
what the inserted [SEP]s cost themselves, the first token after each [SEP] (at a word start,
or inside a word that the cut split: fixed cuts on a sub-word tokenizer do that), the next two
tokens, and every other token. Texts whose token counts differ (a [SEP] took a place within
max_length) are left out and counted. Used in docs/results.md (TRACE on SmolLM2).

The LM may be given as a run directory or as the file of its per-token NLLs that `--save-lm`
wrote, so a segment row can be set against an LM whose run folder is gone:

    python benchmarks/segment_boundary_cost.py runs/smollm2-trace-r runs/smollm2-lm --examples 200
    python benchmarks/segment_boundary_cost.py runs/smollm2-lm --save-lm lm-nlls.jsonl --examples 200
    python benchmarks/segment_boundary_cost.py runs/smollm2-trace-r lm-nlls.jsonl --examples 200
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from textvae.data.batching import collate, encode_examples
from textvae.data.corpus import read_split, resolve_data_dir
from textvae.evaluation.likelihood import mean_with_stderr
from textvae.files import write_text_atomically
from textvae.models.registry import load_model
from textvae.training.environment import bf16_inference, resolve_bf16

PARTS = ("[SEP] tokens", "first token after [SEP], word start", "first token after [SEP], inside a word",
         "2nd-3rd tokens after [SEP]", "other tokens")


def token_nlls(model, config, examples: list, segmented: bool, batch_size: int,
               bf16: bool) -> tuple[list[list[int]], list[list[float]]]:
    """Each example's target token ids and their NLLs in order ([SEP]s included for a segment
    model): the decoder's at the posterior mean for a segment model, exact for the LM."""
    data = config.data
    encoded, _ = encode_examples(examples, model.tokenizer, data.max_length, data.max_source_length, data.overlong,
                                 model.segmenter if segmented else None)
    ids, rows = [item.ids[item.prefix_length :] for item in encoded], []
    with bf16_inference(model, bf16), torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            batch = collate(encoded[start : start + batch_size], model.tokenizer.pad_id)
            if segmented:
                layout, posterior, _ = model.distributions(batch)
                hidden = model.decoder_hidden(batch, model.decoder_latent(posterior.mean, noise=False), layout)
            else:
                hidden = model.backbone(batch.decoder_inputs, batch.attention_mask).hidden
            nll, scored = model.token_nll(hidden, batch), batch.target_mask[:, 1:]
            rows += [row[mask].tolist() for row, mask in zip(nll, scored)]
    return ids, rows


def lm_token_nlls(lm_run: str, examples: int, batch_size: int, bf16: bool) -> list[list[float]]:
    """A plain LM run's exact per-token NLLs of the first `examples` test texts."""
    lm, config = load_model(lm_run)
    if lm.has_latent:
        raise SystemExit(f"{lm_run} is not a plain LM run")
    texts = read_split(resolve_data_dir(config.data.path), "test").examples[:examples]
    return token_nlls(lm, config, texts, False, batch_size, bf16)[1]


def save_lm_nlls(path: Path, lm_run: str, nlls: list[list[float]], bf16: bool) -> None:
    header = {"lm_run": lm_run, "examples": len(nlls), "precision": "bf16" if bf16 else "fp32"}
    lines = [json.dumps(header)] + [json.dumps([round(value, 6) for value in row]) for row in nlls]
    write_text_atomically(path, "\n".join(lines) + "\n")  # whole or absent: a later row reads it


def load_lm_nlls(path: Path, examples: int, bf16: bool) -> list[list[float]]:
    header, *rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    if header["examples"] < examples or header["precision"] != ("bf16" if bf16 else "fp32"):
        raise SystemExit(f"{path} holds {header['examples']} texts in {header['precision']}: "
                         f"not the {examples} asked for in {'bf16' if bf16 else 'fp32'}")
    return rows[:examples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("segment_run", help="a segment-wise run (with --save-lm: the LM run)")
    parser.add_argument("lm", nargs="?", help="a plain LM run, or the file --save-lm wrote")
    parser.add_argument("--save-lm", metavar="FILE", help="only write the LM run's per-token NLLs to FILE")
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="auto",
                        help="as `textvae evaluate --precision` (auto: bf16 where the CPU has it natively)")
    args = parser.parse_args()
    bf16 = resolve_bf16(args.precision, torch.device("cpu"))
    if args.save_lm:
        save_lm_nlls(Path(args.save_lm), args.segment_run,
                     lm_token_nlls(args.segment_run, args.examples, args.batch_size, bf16), bf16)
        return
    if args.lm is None:
        parser.error("give a segment-wise run, then a plain LM run or its --save-lm file")
    segment_model, config = load_model(args.segment_run)
    if segment_model.latent_groups != "segment":
        parser.error(f"{args.segment_run} is not a segment-wise run")
    tokenizer, sep = segment_model.tokenizer, segment_model.tokenizer.sep_id
    examples = read_split(resolve_data_dir(config.data.path), "test").examples[: args.examples]
    ids, segmented = token_nlls(segment_model, config, examples, True, args.batch_size, bf16)
    lm = Path(args.lm)
    plain = (lm_token_nlls(args.lm, args.examples, args.batch_size, bf16) if lm.is_dir()
             else load_lm_nlls(lm, args.examples, bf16))
    words = tokenizer.encode_batch_with_ends([example.target for example in examples])

    per_text, per_token, skipped, boundaries, inside = defaultdict(list), defaultdict(list), 0, 0, 0
    for text_ids, seg_nll, lm_nll, (_, ends), example in zip(ids, segmented, plain, words, examples, strict=True):
        if len(seg_nll) - text_ids.count(sep) != len(lm_nll):
            skipped += 1
            continue
        sums, j, since_sep = dict.fromkeys(PARTS, 0.0), 0, None
        for token, nll in zip(text_ids, seg_nll):
            if token == sep:
                sums[PARTS[0]] += nll
                since_sep = 0
                continue
            difference = nll - lm_nll[j]
            if since_sep == 0:
                # a word starts here when white space comes right before the token's first
                # letter: at its own start (a byte-level BPE's " word") or at the end of the
                # token before (a tokenizer with separate space tokens)
                text, cut = example.target, ends[j - 1]
                word_start = (cut < len(text) and text[cut].isspace()) or text[cut - 1].isspace()
                part = PARTS[1] if word_start else PARTS[2]
                boundaries, inside = boundaries + 1, inside + (not word_start)
            else:
                part = PARTS[3] if since_sep in (1, 2) else PARTS[4]
            sums[part] += difference
            per_token[part].append(difference)
            since_sep = None if since_sep is None or since_sep >= 2 else since_sep + 1
            j += 1
        for part, value in sums.items():
            per_text[part].append(value)
        per_text["total"].append(sum(sums.values()))

    print(f"{args.segment_run} (decoder at the posterior mean) minus {args.lm} (exact), nats; "
          f"{len(per_text['total'])} of {len(examples)} test texts ({skipped} left out: token counts differ); "
          f"{boundaries} segment starts after a [SEP], {inside} of them inside a word")
    for part in (*PARTS, "total"):
        stats = mean_with_stderr("d", torch.tensor(per_text[part], dtype=torch.float64))
        tokens = per_token.get(part, [])
        per = f"; {sum(tokens) / len(tokens):+.3f} per token over {len(tokens)}" if tokens else ""
        error = "n/a" if stats["d_stderr"] is None else f"{stats['d_stderr']:.2f}"  # None: one text
        print(f"  {part}: {stats['d']:+.2f} ± {error} per text{per}")


if __name__ == "__main__":
    main()
