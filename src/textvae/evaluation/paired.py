"""Paired comparison of two evaluations of the same texts (`textvae evaluate --per-example`).

Two rows scored on the same examples share most of their noise (a long sentence is costly for
both), so the standard error of the mean of per-example differences is usually far smaller
than either row's own error. For every per-example key both files hold (`nll`, `elbo`, `rec`,
`kl`): the two means, the mean difference A - B with its standard error over examples, and
the difference in nats per token (a ratio of sums, its error by the delta method, as `ppl`'s).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from textvae.errors import TextVAEError

KEYS = ("nll", "elbo", "rec", "kl")


def read_per_example(path: str | Path) -> list[dict]:
    """The records of a per-example JSONL file, checked for `index`, `nll` and `tokens`."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise TextVAEError(f"file not found: {path}") from None
    except UnicodeDecodeError:
        raise TextVAEError(f"{path} is not valid UTF-8") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise TextVAEError(f"{path}:{number} is not a JSON line (write it with textvae evaluate --per-example)") from None
        if not isinstance(record, dict) or not {"index", "nll", "tokens"} <= set(record):
            raise TextVAEError(f"{path}:{number} lacks index, nll or tokens (write it with textvae evaluate --per-example)")
        records.append(record)
    if len(records) < 2:
        raise TextVAEError(f"{path} holds {len(records)} example(s); a comparison needs at least 2")
    return records


def _mean_and_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    variance = sum((value - mean) ** 2 for value in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def paired_comparison(a: list[dict], b: list[dict]) -> dict:
    """Per key: `KEY_a`, `KEY_b` (means), `KEY_diff` (mean of a - b) and `KEY_diff_stderr`;
    for `nll` also `nll_per_token_diff` (sum of differences / sum of tokens) and its error.
    The two lists must score the same examples: same indices and token counts, in any order."""
    by_index = {record["index"]: record for record in b}
    if len(a) != len(b) or set(by_index) != {record["index"] for record in a}:
        raise TextVAEError(f"the two files score different examples ({len(a)} and {len(b)} records, "
                           "or other indices): evaluate both runs on the same split and --examples")
    pairs = [(record, by_index[record["index"]]) for record in a]
    if any(x["tokens"] != y["tokens"] for x, y in pairs):
        raise TextVAEError("the two files count different tokens for the same example: "
                           "runs with other tokenizers or data cannot be compared example by example")
    result: dict = {"examples": len(pairs)}
    for key in KEYS:
        if not all(key in x and key in y for x, y in pairs):
            continue
        result[f"{key}_a"] = _mean_and_stderr([x[key] for x, _ in pairs])[0]
        result[f"{key}_b"] = _mean_and_stderr([y[key] for _, y in pairs])[0]
        result[f"{key}_diff"], result[f"{key}_diff_stderr"] = _mean_and_stderr([x[key] - y[key] for x, y in pairs])
    # nats per token: r = sum(d) / sum(t); delta method as for ppl (docs/metrics.md)
    differences = [x["nll"] - y["nll"] for x, y in pairs]
    tokens = [x["tokens"] for x, _ in pairs]
    rate = sum(differences) / sum(tokens)
    _, residual_stderr = _mean_and_stderr([d - rate * t for d, t in zip(differences, tokens)])
    result["nll_per_token_diff"] = rate
    result["nll_per_token_diff_stderr"] = residual_stderr / (sum(tokens) / len(tokens))
    return result


def compare(a: str | Path, b: str | Path) -> dict:
    """`paired_comparison` of two files written by `textvae evaluate --per-example` (or
    `textvae.evaluate(..., per_example=PATH)`), as `textvae compare A B` prints it."""
    return paired_comparison(read_per_example(a), read_per_example(b))
