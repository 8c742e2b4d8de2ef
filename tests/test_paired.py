"""`textvae compare`: the paired difference of two runs' per-example scores."""

import json
import random

import numpy as np
import pytest
from scipy import stats

from textvae.cli import main
from textvae.errors import TextVAEError
from textvae.evaluation.paired import paired_comparison


def records(nll, tokens, **other):
    return [{"index": i, "nll": n, "tokens": t, **{k: v[i] for k, v in other.items()}}
            for i, (n, t) in enumerate(zip(nll, tokens))]


def write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_the_mean_difference_and_its_paired_error_match_scipy():
    a = records([10.0, 20.0, 30.0, 40.0], [5, 10, 15, 20], kl=[1.0, 2.0, 3.0, 4.0])
    b = records([9.0, 18.0, 29.0, 37.0], [5, 10, 15, 20], kl=[0.5, 0.5, 0.5, 0.5])
    result = paired_comparison(a, b)
    assert result["examples"] == 4
    assert result["nll_a"] == 25.0 and result["nll_b"] == 23.25
    assert result["nll_diff"] == pytest.approx(1.75)
    assert result["nll_diff_stderr"] == pytest.approx(stats.sem([1.0, 2.0, 1.0, 3.0]))
    assert result["kl_diff"] == pytest.approx(2.0) and result["kl_diff_stderr"] == pytest.approx(stats.sem([0.5, 1.5, 2.5, 3.5]))
    assert "elbo_diff" not in result  # only keys both files hold
    assert result["nll_per_token_diff"] == pytest.approx(7 / 50)


def test_against_a_language_model_its_exact_nll_is_the_bound_the_latent_models_terms_are_set_against():
    latent = records([10.0, 20.0, 30.0], [5, 10, 15], elbo=[12.0, 23.0, 31.0], rec=[11.5, 21.0, 30.5], kl=[0.5, 2.0, 0.5])
    language_model = records([9.0, 18.0, 29.0], [5, 10, 15])
    result = paired_comparison(latent, language_model)
    assert result["nll_as_bound"] == "b"
    assert result["elbo_b"] == result["rec_b"] == result["nll_b"] and result["kl_b"] == 0.0
    assert result["elbo_diff"] == pytest.approx(10 / 3) and result["elbo_diff_stderr"] == pytest.approx(stats.sem([3.0, 5.0, 2.0]))
    assert result["rec_diff"] == pytest.approx(7 / 3) and result["kl_diff"] == pytest.approx(1.0)
    reversed_sides = paired_comparison(language_model, latent)
    assert reversed_sides["nll_as_bound"] == "a" and reversed_sides["elbo_diff"] == pytest.approx(-10 / 3)
    assert "nll_as_bound" not in paired_comparison(language_model, language_model)
    assert "nll_as_bound" not in paired_comparison(latent, latent)


def test_a_file_mixing_latent_and_language_model_records_is_refused():
    latent = records([10.0, 20.0, 30.0], [5, 10, 15], elbo=[12.0, 23.0, 31.0], rec=[11.5, 21.0, 30.5], kl=[0.5, 2.0, 0.5])
    mixed = [latent[0], {key: latent[1][key] for key in ("index", "nll", "tokens")}, latent[2]]  # e.g. two files joined
    with pytest.raises(TextVAEError, match="file A mixes records with and without elbo, rec or kl"):
        paired_comparison(mixed, latent)
    with pytest.raises(TextVAEError, match="file B mixes"):
        paired_comparison(latent, mixed)


def test_the_order_of_the_records_does_not_matter():
    rng = random.Random(0)
    a = records([rng.gauss(50, 10) for _ in range(30)], [rng.randint(5, 40) for _ in range(30)])
    b = [dict(row, nll=row["nll"] - rng.gauss(1, 0.5)) for row in a]
    shuffled = b[:]
    rng.shuffle(shuffled)
    assert paired_comparison(a, shuffled) == pytest.approx(paired_comparison(a, b))


def test_the_per_token_error_agrees_with_a_bootstrap():
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 60, size=400)
    base = tokens * 4.0 + rng.normal(0, 8, size=400)
    shift = 0.3 * tokens + rng.normal(0, 2, size=400)
    a = records(list(base + shift), list(tokens))
    b = records(list(base), list(tokens))
    result = paired_comparison(a, b)
    differences = shift
    boot = [differences[i].sum() / tokens[i].sum() for i in rng.integers(0, 400, size=(4000, 400))]
    assert result["nll_per_token_diff"] == pytest.approx(differences.sum() / tokens.sum())
    assert result["nll_per_token_diff_stderr"] == pytest.approx(np.std(boot), rel=0.1)


def test_files_over_other_examples_or_tokens_are_refused():
    a = records([1.0, 2.0, 3.0], [4, 5, 6])
    with pytest.raises(TextVAEError, match="different examples"):
        paired_comparison(a, a[:2])
    with pytest.raises(TextVAEError, match="other tokens for 1 of 3 examples.*--same-tokens-only"):
        paired_comparison(a, records([1.0, 2.0, 3.0], [4, 5, 7]))
    with pytest.raises(TextVAEError, match="only 1 of the examples are scored by both files with the same tokens"):
        paired_comparison(a, records([1.0, 2.0, 3.0], [4, 6, 7]), same_tokens_only=True)
    elsewhere = [dict(row, index=row["index"] + 3) for row in a]  # another split's examples: none shared
    with pytest.raises(TextVAEError, match="only 0 of the examples"):
        paired_comparison(a, elsewhere, same_tokens_only=True)
    with pytest.raises(TextVAEError, match="an example twice"):
        paired_comparison(a, [*a[:2], dict(a[2], index=1)])


def test_examples_with_the_same_count_but_other_tokens_do_not_pair():
    a = records([10.0, 20.0, 30.0], [5, 10, 15], tokens_sha=["aa", "bb", "cc"])
    b = records([9.0, 19.0, 29.0], [5, 10, 15], tokens_sha=["aa", "bb", "dd"])  # the third: another text
    with pytest.raises(TextVAEError, match="other tokens for 1 of 3 examples"):
        paired_comparison(a, b)
    result = paired_comparison(a, b, same_tokens_only=True)
    assert result["examples"] == 2 and result["examples_skipped"] == 1 and result["nll_diff"] == pytest.approx(1.0)
    unhashed = [{key: value for key, value in row.items() if key != "tokens_sha"} for row in b]  # an older file
    assert paired_comparison(a, unhashed)["examples"] == 3  # the count alone is checked


def test_same_tokens_only_pairs_by_split_position_across_dropped_examples():
    """A run that dropped example 1 (data.overlong=drop) pairs its examples 0, 2, 3 with
    the other run's 0, 2, 3: indices are places in the split, not in the scored list."""
    a = records([10.0, 20.0, 30.0, 40.0], [5, 10, 15, 20])
    b = [dict(row, nll=row["nll"] - 1.0) for i, row in enumerate(a) if i != 1]
    result = paired_comparison(a, b, same_tokens_only=True)
    assert result["examples"] == 3 and result["examples_skipped"] == 1
    assert result["nll_diff"] == pytest.approx(1.0) and result["nll_a"] == pytest.approx(80 / 3)


def test_same_tokens_only_pairs_the_examples_scored_alike_and_counts_the_rest(tmp_path, capsys):
    a = records([10.0, 20.0, 30.0, 40.0], [5, 10, 15, 20])
    b = records([9.0, 18.0, 99.0, 37.0], [5, 10, 16, 20])  # the third text truncated differently
    result = paired_comparison(a, b, same_tokens_only=True)
    assert result["examples"] == 3 and result["examples_skipped"] == 1
    assert result["nll_diff"] == pytest.approx(2.0) and result["nll_diff_stderr"] == pytest.approx(stats.sem([1.0, 2.0, 3.0]))
    assert result["nll_per_token_diff"] == pytest.approx(6 / 35)
    assert main(["compare", write(tmp_path / "a.jsonl", a), write(tmp_path / "b.jsonl", b), "--same-tokens-only"]) == 0
    assert "examples_skipped" in capsys.readouterr().out


def test_the_command_prints_and_writes_the_comparison(tmp_path, capsys):
    a = write(tmp_path / "a.jsonl", records([3.0, 5.0, 4.0], [2, 3, 2]))
    b = write(tmp_path / "b.jsonl", records([2.0, 5.0, 2.0], [2, 3, 2]))
    assert main(["compare", a, b, "--json", str(tmp_path / "out.json")]) == 0
    assert "nll_diff" in capsys.readouterr().out
    assert json.loads((tmp_path / "out.json").read_text())["nll_diff"] == pytest.approx(1.0)


@pytest.mark.parametrize("content, message", [
    (None, "file not found"),
    ("not json\n", "is not a JSON line"),
    ('{"index": 0, "nll": 1.0}\n{"index": 1, "nll": 2.0}\n', "lacks index, nll or tokens"),
    ('{"index": 0, "nll": 1.0, "tokens": 3}\n', "at least 2"),
])
def test_bad_files_end_with_one_line_and_status_2(tmp_path, capsys, content, message):
    bad = tmp_path / "bad.jsonl"
    if content is not None:
        bad.write_text(content)
    good = write(tmp_path / "good.jsonl", records([1.0, 2.0], [3, 4]))
    assert main(["compare", str(bad), good]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_the_api_reads_the_same_files(tmp_path):
    import textvae

    a = write(tmp_path / "a.jsonl", records([3.0, 5.0, 4.0], [2, 3, 2]))
    b = write(tmp_path / "b.jsonl", records([2.0, 5.0, 2.0], [2, 3, 2]))
    assert textvae.compare(a, b)["nll_diff_stderr"] == pytest.approx(stats.sem([1.0, 0.0, 2.0]))
