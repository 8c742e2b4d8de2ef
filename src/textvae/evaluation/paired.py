"""Paired comparison of two evaluations of the same texts (`textvae evaluate --per-example`).

Two rows scored on the same examples share most of their noise (a long sentence is costly for
both), so the standard error of the mean of per-example differences is usually far smaller
than either row's own error. For every per-example key both files hold (`nll`, `elbo`, `rec`,
`kl`): the two means, the mean difference A - B with its standard error over examples, and
the difference in nats per token (the log of the perplexity ratio, its error by the delta
method, as `ppl`'s). Against a language model, whose NLL is exact (no latent: its own tightest
bound), a latent model's ELBO and reconstruction term are set against that NLL and its KL
against 0: what the latent model's bound and decoder lose to the LM. A run keeps the scores of
its evaluation record beside it (`examples_record`), which `textvae report --reference` reads.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

from textvae.errors import TextVAEError
from textvae.evaluation.likelihood import mean_with_stderr, perplexity_with_stderr

KEYS = ("nll", "elbo", "rec", "kl")
LATENT_TERMS = frozenset(KEYS[1:])  # what a latent model's records hold beside `nll`; an LM's hold none


def examples_record(record: Path) -> Path:
    """Where the per-example scores of a run's evaluation record RUN_DIR/NAME.json are kept."""
    return record.with_name(f"{record.stem}.examples.jsonl")


def read_per_example(path: Path) -> list[dict]:
    """The checked records of a per-example JSONL file (`parse_per_example`)."""
    return parse_per_example([line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()], str(path))


def parse_per_example(lines: list[str], source: str) -> list[dict]:
    """The records of a per-example JSONL file's non-blank `lines`, checked for `index`, `nll`
    and `tokens` (`source`: the file, for the messages)."""
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise TextVAEError(f"{source}: record {number} is not a JSON line (write it with textvae evaluate --per-example)") from None
        if not isinstance(record, dict) or not {"index", "nll", "tokens"} <= set(record):
            raise TextVAEError(f"{source}: record {number} lacks index, nll or tokens (write it with textvae evaluate --per-example)")
        records.append(record)
    if len(records) < 2:
        raise TextVAEError(f"{source} holds {len(records)} example(s); a comparison needs at least 2")
    return records


def paired_comparison(a: list[dict], b: list[dict], same_tokens_only: bool = False) -> dict:
    """Per key: `KEY_a`, `KEY_b` (means), `KEY_diff` (mean of a - b) and `KEY_diff_stderr`
    (when one side is a language model, `nll_as_bound` names it and its NLL stands for its ELBO
    and rec, 0 for its KL); for `nll` also `nll_per_token_diff` (sum of differences / sum of
    tokens) and its error. The two lists must score the same examples (same indices, in any
    order) with the same tokens (count, and ids where both records hold `tokens_sha`);
    `same_tokens_only` pairs just the examples both scored with the same tokens (e.g. a
    segment-wise model, whose [SEP]s make more texts truncated or dropped, against an LM) and
    counts the others in `examples_skipped`. At least 2 examples must pair."""
    terms_a, terms_b = _latent_terms(a, "A"), _latent_terms(b, "B")
    by_index = {record["index"]: record for record in b}
    indices_a = {record["index"] for record in a}
    if len(by_index) < len(b) or len(indices_a) < len(a):
        raise TextVAEError("a file scores an example twice (a repeated index): write it with textvae evaluate --per-example")
    if indices_a != set(by_index) and not same_tokens_only:
        raise TextVAEError(f"the two files score different examples ({len(a)} and {len(b)} records, "
                           "or other indices): evaluate both runs on the same split and --examples; where some "
                           "texts were dropped by data.overlong, --same-tokens-only pairs the others")
    pairs = [(record, by_index[record["index"]]) for record in a if record["index"] in by_index]
    alike = [(x, y) for x, y in pairs if _same_tokens(x, y)]
    if len(alike) < len(pairs) and not same_tokens_only:
        raise TextVAEError(f"the two files score other tokens for {len(pairs) - len(alike)} of {len(pairs)} examples: "
                           "other tokenizers or data cannot be compared example by example; where only some "
                           "texts were truncated differently, --same-tokens-only pairs the others")
    if len(alike) < 2:
        raise TextVAEError(f"only {len(alike)} of the examples are scored by both files with the same tokens; "
                           "a comparison needs at least 2 (evaluate both runs on the same split)")
    result: dict = {"examples": len(alike)}
    if same_tokens_only:
        result["examples_skipped"] = len(indices_a | set(by_index)) - len(alike)
    pairs = alike
    if (terms_a, terms_b) in ((LATENT_TERMS, frozenset()), (frozenset(), LATENT_TERMS)):
        # one side a language model: its exact NLL is its bound, its KL 0
        result["nll_as_bound"] = "b" if terms_a else "a"
        pairs = [(x, _as_bound(y)) if terms_a else (_as_bound(x), y) for x, y in pairs]
    for key in KEYS:
        if not all(key in x and key in y for x, y in pairs):
            continue
        first = torch.tensor([x[key] for x, _ in pairs], dtype=torch.float64)
        second = torch.tensor([y[key] for _, y in pairs], dtype=torch.float64)
        result[f"{key}_a"], result[f"{key}_b"] = float(first.mean()), float(second.mean())
        result.update(mean_with_stderr(f"{key}_diff", first - second))
    # nats per token = log(ppl_A / ppl_B), a ratio of sums: the delta method of `ppl`'s error
    differences = torch.tensor([x["nll"] - y["nll"] for x, y in pairs], dtype=torch.float64)
    tokens = torch.tensor([x["tokens"] for x, _ in pairs], dtype=torch.float64)
    ratio = perplexity_with_stderr("", differences, tokens)
    result["nll_per_token_diff"] = math.log(ratio["ppl"])
    result["nll_per_token_diff_stderr"] = ratio["ppl_stderr"] / ratio["ppl"]
    return result


def _same_tokens(x: dict, y: dict) -> bool:
    """Whether two records score the same tokens: the same count, and the same token ids where
    both files hold their hash (`tokens_sha`; files written before it had only the count)."""
    if x["tokens"] != y["tokens"]:
        return False
    return "tokens_sha" not in x or "tokens_sha" not in y or x["tokens_sha"] == y["tokens_sha"]


def tokens_sha(ids: list[int], sep_id: int) -> str:
    """A record's `tokens_sha`: sha256 of the example's token ids without [SEP]s (which segment-wise
    models insert between segments), first 16 hex digits."""
    return hashlib.sha256(json.dumps([token for token in ids if token != sep_id]).encode()).hexdigest()[:16]


def _latent_terms(records: list[dict], side: str) -> frozenset[str]:
    """Which of elbo, rec and kl the records of one side hold: the same for every record (one
    evaluation wrote them), else a one-line error."""
    held = {LATENT_TERMS.intersection(record) for record in records}
    if len(held) > 1:
        raise TextVAEError(f"file {side} mixes records with and without elbo, rec or kl: "
                           "write each file with one textvae evaluate --per-example")
    return held.pop() if held else frozenset()


def _as_bound(record: dict) -> dict:
    """A language model's record with its exact NLL as its ELBO and reconstruction, and KL 0."""
    return {**record, "elbo": record["nll"], "rec": record["nll"], "kl": 0.0}
