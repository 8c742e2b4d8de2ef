"""`textvae report`: the runs' own records turned into one table, plots and an interpolation."""

import json

import pytest

from textvae.cli import main

FAST = ["--set", "data.max_length=32", "--set", "train.batch_size=16", "--set", "train.warmup_steps=2",
        "--set", "train.log_every=2", "--set", "train.precision=fp32", "--set", "data.vocab_size=400",
        "--set", "kl.schedule=cyclical", "--set", "kl.period_epochs=1"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_report_tabulates_evaluations_and_plots_curves_and_layer_kl(tiny_txt, tmp_path, capsys):
    runs = {}
    for model in ("lm", "della"):
        runs[model] = tmp_path / model
        assert main(["train", "--model", model, "--data", str(tiny_txt), "--out", str(runs[model]),
                     "--max-steps", "8", *FAST]) == 0
    assert main(["evaluate", str(runs["della"]), "--iw-samples", "2", "--reconstruction", "4"]) == 0  # records eval_test.json
    della = json.loads((runs["della"] / "eval_test.json").read_text())
    assert len(della["kl_groups"]) == 4  # gpt2-tiny: a latent per layer
    # samples scored apart: their metrics join the row; evaluate's own keys win
    (runs["della"] / "generated_test.json").write_text(json.dumps({"self_bleu": 0.25, "ppl": 1.0}))
    capsys.readouterr()

    out = tmp_path / "report"
    assert main(["report", str(runs["lm"]), str(runs["della"]), "--out", str(out), "--interpolate",
                 "a man is playing a guitar .", "two dogs run in the snow .", "--steps", "3"]) == 0
    markdown = (out / "report.md").read_text()
    assert markdown == capsys.readouterr().out
    rows = {line.split(" | ")[0].strip("| "): line for line in markdown.splitlines() if line.startswith("| ")}
    assert rows["della"].startswith("| della | della | cyclical | 8 | ")
    ppl_column = rows["run"].split(" | ").index("ppl")
    assert rows["della"].split(" | ")[ppl_column] == f"{della['ppl']:.2f} ± {della['ppl_stderr']:.2f}"  # with its standard error
    assert rows["lm"].split(" | ")[ppl_column] == "-"  # not evaluated: said, not invented
    mean, error = rows["della"].split(" | ")[rows["run"].split(" | ").index("kl_layer_mean")].split(" ± ")
    assert len(mean.split(".")[1]) == len(error.split(".")[1])  # an error to its mean's places
    assert float(error) != 0 and abs(float(error) - della["kl_layer_mean_stderr"]) <= 0.5 * 10 ** -len(error.split(".")[1])
    header, della_cells = ([cell.strip() for cell in rows[name].strip("|").split("|")] for name in ("run", "della"))
    assert della_cells[header.index("self_bleu")] == "0.250"
    assert della_cells[header.index("reconstruction_jaccard")] == f"{della['reconstruction_jaccard']:.3f}"
    assert "Not evaluated on `test` yet: lm" in markdown
    for picture in ("curves.png", "kl_groups.png"):
        assert (out / picture).read_bytes().startswith(PNG) and f"]({picture})" in markdown
    interpolation = markdown.split("### della")[1].splitlines()
    assert [line.split(" | ")[0] for line in interpolation if line.startswith("| 0") or line.startswith("| 1")] == [
        "| 0.00", "| 0.50", "| 1.00"]
    assert "### lm" not in markdown


def test_report_refuses_what_is_not_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "r")]) == 2
    assert "run directory not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    assert "is not a textvae run" in capsys.readouterr().err
    assert not (tmp_path / "r" / "report.md").exists()
    (tmp_path / "empty" / "config.yaml").write_text("run: {model: {name: embed}}\n")
    (tmp_path / "empty" / "eval_test.json").write_text('{"ppl": 3')  # cut short
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    assert "eval_test.json is not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "r" / "report.md").exists()


def _scored_run(directory, model, nll, tokens, elbo=None):
    """A run directory as training and `textvae evaluate` leave it, with per-example scores
    (a latent model's with `elbo`: its rec and a KL of 0.5 beside it)."""
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text(f"run: {{model: {{name: {model}}}}}\n")
    mean = sum(nll) / len(nll)
    (directory / "eval_test.json").write_text(json.dumps({"nll": mean, "examples": len(nll)}))
    latent = [{} for _ in nll] if elbo is None else [{"elbo": value, "rec": value - 0.5, "kl": 0.5} for value in elbo]
    lines = [json.dumps({"index": i, "nll": value, "tokens": count, **latent[i]})
             for i, (value, count) in enumerate(zip(nll, tokens))]
    (directory / "eval_test.examples.jsonl").write_text("\n".join(lines) + "\n")


def test_report_gives_each_run_its_nll_against_a_reference_paired_over_the_same_examples(tmp_path, capsys):
    tokens = [4, 6, 5, 5]
    _scored_run(tmp_path / "lm", "lm", [10.0, 20.0, 14.0, 16.0], tokens)
    _scored_run(tmp_path / "della", "della", [9.0, 19.5, 13.0, 14.5], tokens,  # differences -1, -0.5, -1, -1.5
                elbo=[11.0, 22.0, 15.0, 17.0])  # against the LM's exact NLL: 1, 2, 1, 1
    _scored_run(tmp_path / "other", "embed", [9.0, 19.5, 13.0], tokens[:3])  # scored fewer examples
    # a segment-wise run whose [SEP]s cut the second text shorter: paired over the other three
    _scored_run(tmp_path / "trace", "trace-r", [12.0, 15.0, 15.0, 19.0], [4, 5, 5, 5])
    (tmp_path / "unscored").mkdir()
    (tmp_path / "unscored" / "config.yaml").write_text("run: {model: {name: embed}}\n")
    (tmp_path / "unscored" / "eval_test.json").write_text(json.dumps({"nll": 12.0, "examples": 4}))
    runs = [str(tmp_path / name) for name in ("lm", "della", "other", "unscored", "trace")]
    assert main(["report", *runs, "--reference", str(tmp_path / "lm"), "--out", str(tmp_path / "r")]) == 0
    markdown = capsys.readouterr().out
    rows = {line.split(" | ")[0].strip("| "): [cell.strip() for cell in line.strip("|").split("|")]
            for line in markdown.splitlines() if line.startswith("| ")}
    paired, per_token = rows["run"].index("nll - reference (paired)"), rows["run"].index("per token")
    # mean of the differences -1.0; their sample standard deviation 0.408, over sqrt(4): 0.204
    assert rows["della"][paired] == "-1.00 ± 0.20"
    assert rows["della"][per_token].startswith("-0.2000 ± ")  # -4 nats over 20 tokens
    assert rows["lm"][paired] == "-" and rows["unscored"][paired] == "-"
    assert rows["other"][paired] == "-0.83 ± 0.17"  # over the 3 examples it scored: -1, -0.5, -1
    assert "other is paired over 3 of 4 examples" in markdown
    assert "Not paired: unscored (no per-example scores kept with its evaluation)." in markdown
    assert rows["trace"][paired] == "+2.00 ± 0.58"  # differences 2, 1, 3 over the texts scored alike
    assert "trace is paired over 3 of 4 examples" in markdown
    elbo = rows["run"].index("elbo - reference (paired)")
    assert rows["della"][elbo] == "+1.25 ± 0.25"  # mean 1.25; standard deviation 0.5 over sqrt(4)
    assert rows["trace"][elbo] == "-" and rows["lm"][elbo] == "-"  # no ELBO kept; the reference itself
    assert "`elbo - reference (paired)`: the run's ELBO minus the reference's" in markdown


def test_report_refuses_a_reference_without_per_example_scores(tmp_path, capsys):
    _scored_run(tmp_path / "della", "della", [9.0, 19.5], [4, 6])
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "config.yaml").write_text("run: {model: {name: lm}}\n")
    assert main(["report", str(tmp_path / "della"), "--reference", str(tmp_path / "lm"), "--out", str(tmp_path / "r")]) == 2
    assert "keeps no per-example scores" in capsys.readouterr().err
    assert not (tmp_path / "r" / "report.md").exists()


def test_runs_in_folders_of_the_same_name_keep_their_own_rows_and_paired_numbers(tmp_path, capsys):
    tokens = [4, 6, 5, 5]
    _scored_run(tmp_path / "lm", "lm", [10.0, 20.0, 14.0, 16.0], tokens)
    _scored_run(tmp_path / "ptb" / "della", "della", [9.0, 19.5, 13.0, 14.5], tokens)  # -1.00 ± 0.20
    _scored_run(tmp_path / "yelp" / "della", "della", [10.001, 20.002, 14.001, 16.002], tokens)  # +0.0015 ± 0.0003
    runs = [str(tmp_path / "lm"), str(tmp_path / "ptb" / "della"), str(tmp_path / "yelp" / "della")]
    assert main(["report", *runs, "--reference", runs[0], "--out", str(tmp_path / "r")]) == 0
    rows = {line.split(" | ")[0].strip("| "): [cell.strip() for cell in line.strip("|").split("|")]
            for line in capsys.readouterr().out.splitlines() if line.startswith("| ")}
    paired = rows["run"].index("nll - reference (paired)")
    assert rows["ptb/della"][paired] == "-1.00 ± 0.20"
    assert rows["yelp/della"][paired] == "+0.0015 ± 0.0003"  # places enough to show the error
    assert main(["report", runs[1], runs[1], "--out", str(tmp_path / "r2")]) == 2
    assert "is given twice" in capsys.readouterr().err
    _scored_run(tmp_path / "x" / "run7", "della", [10.0, 20.0, 14.0, 16.0], tokens)  # given through a link named della
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "della").symlink_to(tmp_path / "x" / "run7")
    linked = [runs[0], runs[1], str(tmp_path / "more" / "della")]
    assert main(["report", *linked, "--reference", runs[0], "--out", str(tmp_path / "r3")]) == 0
    rows = {line.split(" | ")[0].strip("| ") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")}
    assert {"ptb/della", "more/della"} <= rows


def test_the_python_api_reports_and_scores_as_the_commands_do(tmp_path, capsys):
    import textvae

    tokens = [4, 6, 5, 5]
    _scored_run(tmp_path / "lm", "lm", [10.0, 20.0, 14.0, 16.0], tokens)
    _scored_run(tmp_path / "della", "della", [9.0, 19.5, 13.0, 14.5], tokens)
    runs = [str(tmp_path / "lm"), str(tmp_path / "della")]
    assert main(["report", *runs, "--reference", runs[0], "--out", str(tmp_path / "cli")]) == 0
    printed = capsys.readouterr().out
    assert textvae.report(runs, tmp_path / "api", reference=runs[0]) == printed and "-1.00 ± 0.20" in printed
    assert (tmp_path / "api" / "report.md").read_text() == printed
    with pytest.raises(textvae.TextVAEError, match="run directory not found"):
        textvae.report([str(tmp_path / "nope")], tmp_path / "x")
    results = textvae.score(["the dog runs", ""], ["the dog runs", "a cat"], ["length", "dist_1"])
    assert results == {"length": 1.5, "length_refs": 2.5, "dist_1": 1.0}  # the empty text is a sample of 0 words
    with pytest.raises(textvae.TextVAEError, match="samples must be a list of strings"):
        textvae.score("the dog runs", ["a cat"])
    with pytest.raises(textvae.TextVAEError, match="unknown metric"):
        textvae.score(["a"], ["a"], ["cnd"])
