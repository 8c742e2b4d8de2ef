"""Faults and surprises a real user runs into, each ending in one line or a documented
behaviour (docs/reliability.md): mixed split formats, a conditional run on plain text,
non-finite next-token scores, metric inputs checked before the slow metrics run, evaluation
records of different settings kept apart, the offline `hf:NAME` message, one file mode."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import textvae
from textvae.cli import main
from textvae.data.batching import encode_examples
from textvae.data.corpus import Example
from textvae.errors import TextVAEError
from textvae.evaluation.paired import tokens_sha

FAST = ["--set", "data.max_length=32", "--set", "data.max_source_length=12", "--set", "train.batch_size=16",
        "--set", "train.warmup_steps=1", "--set", "train.precision=fp32", "--set", "data.vocab_size=300"]


def _one_line_error(capsys) -> str:
    """The error line ending stderr (info lines such as a split's counts may come before it)."""
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("textvae: error: ")]
    assert errors == lines[-1:] and "Traceback" not in "\n".join(lines), lines
    return errors[0]


@pytest.fixture
def trained_della(tiny_txt, tmp_path):
    run = tmp_path / "della"
    assert main(["train", "--model", "della", "--data", str(tiny_txt), "--out", str(run), "--max-steps", "2", *FAST]) == 0
    return run


@pytest.mark.parametrize("mixed", ["valid.jsonl", "test.jsonl"])
def test_a_folder_mixing_txt_and_jsonl_splits_is_refused(mixed, tiny_txt, tmp_path, capsys):
    (tiny_txt / mixed.replace(".jsonl", ".txt")).unlink()
    (tiny_txt / mixed).write_text(json.dumps({"source": "a b", "target": "c d"}) + "\n", encoding="utf-8")
    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny_txt), "--out", str(run), "--max-steps", "1", *FAST]) == 2
    error = _one_line_error(capsys)
    assert "mixes formats" in error and mixed in error
    assert not run.exists()


def test_a_conditional_run_refuses_plain_text_evaluation_data(tiny_jsonl, tiny_txt, tmp_path, capsys):
    run = tmp_path / "cvae"
    assert main(["train", "--model", "della", "--data", str(tiny_jsonl), "--out", str(run), "--max-steps", "1", *FAST]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), "--data", str(tiny_txt), "--iw-samples", "1"]) == 2
    assert "this run is conditional" in _one_line_error(capsys)


@pytest.mark.parametrize("decoding", ["greedy", "sample", "top-k", "top-p", "beam"])
def test_non_finite_next_token_scores_stop_decoding_in_one_line(decoding, trained_della, capsys):
    weights = load_file(trained_della / "model.safetensors")
    head = next(name for name in weights if name.endswith("ln_f.weight"))
    weights[head] = torch.full_like(weights[head], float("nan"))
    save_file(weights, trained_della / "model.safetensors")
    capsys.readouterr()
    assert main(["generate", str(trained_della), "--num", "2", "--decoding", decoding]) == 2
    assert "not finite" in _one_line_error(capsys)


def test_score_checks_every_metric_before_computing_any(tmp_path, monkeypatch, capsys):
    from textvae.evaluation import embedding_metrics

    def slow_metric(*args, **kwargs):
        raise AssertionError("MAUVE ran before the BERTScore inputs were checked")

    monkeypatch.setattr(embedding_metrics, "mauve", slow_metric)
    (tmp_path / "samples.txt").write_text("a b c\nd e f\ng h i\n", encoding="utf-8")
    (tmp_path / "refs.txt").write_text("a b c\nd e f\n", encoding="utf-8")
    code = main(["score", str(tmp_path / "samples.txt"), "--refs", str(tmp_path / "refs.txt"), "--metrics", "mauve,bertscore"])
    assert code == 2
    assert "3 samples, 2 references" in _one_line_error(capsys)


def test_score_refuses_self_comparisons_of_a_single_sample_before_any_metric(tmp_path, capsys):
    (tmp_path / "one.txt").write_text("a b c\n", encoding="utf-8")
    assert main(["score", str(tmp_path / "one.txt"), "--refs", str(tmp_path / "one.txt"), "--metrics", "bleu,self_bleu"]) == 2
    assert "need at least two" in _one_line_error(capsys)


def test_a_folder_given_for_a_file_is_refused_in_one_line_before_any_work(trained_della, tmp_path, monkeypatch, capsys):
    from textvae import api, runs

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "keep.txt").write_text("precious", encoding="utf-8")
    (tmp_path / "refs.txt").write_text("a b c\nd e f\n", encoding="utf-8")
    assert main(["score", str(folder), "--refs", str(tmp_path / "refs.txt")]) == 2
    assert f"cannot read {folder} (Is a directory)" in _one_line_error(capsys)
    assert main(["train", "--config", str(folder), "--out", str(tmp_path / "run")]) == 2
    assert f"cannot read config file {folder} (Is a directory)" in _one_line_error(capsys)
    monkeypatch.setattr(api, "load", lambda *args, **kwargs: pytest.fail("the model loaded before --out was checked"))
    assert main(["generate", str(trained_della), "--num", "2", "--out", str(folder)]) == 2
    assert f"--out {folder} is a folder, not a file" in _one_line_error(capsys)
    monkeypatch.setattr(runs, "load_run", lambda *args, **kwargs: pytest.fail("the run loaded before its outputs were checked"))
    for flag in ("--json", "--per-example", "--samples-out"):
        assert main(["evaluate", str(trained_della), flag, str(folder)]) == 2
        assert f"{flag} {folder} is a folder, not a file" in _one_line_error(capsys)
    under_a_file = tmp_path / "refs.txt" / "metrics.json"
    assert main(["evaluate", str(trained_della), "--json", str(under_a_file)]) == 2
    assert f"{tmp_path / 'refs.txt'} is not a folder" in _one_line_error(capsys)
    from textvae import files

    real_access = os.access  # the tests may run as root, whom a folder's mode does not stop: deny it here
    monkeypatch.setattr(files.os, "access", lambda path, mode, *rest, **options:
                        Path(os.fsdecode(path)) != folder and real_access(path, mode, *rest, **options))
    assert main(["evaluate", str(trained_della), "--per-example", str(folder / "new" / "examples.jsonl")]) == 2
    assert f"{folder} is not writable" in _one_line_error(capsys)
    assert sorted(p.name for p in folder.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["della", "folder", "refs.txt", "txt"]


def test_a_write_that_fails_leaves_neither_the_file_nor_its_temporary(tmp_path):
    from textvae.files import write_atomically

    def fails_half_way(temporary: Path) -> None:
        temporary.write_text("half", encoding="utf-8")
        raise OSError(28, os.strerror(28))

    (tmp_path / "out.txt").write_text("before", encoding="utf-8")
    with pytest.raises(TextVAEError, match=r"could not write .*out\.txt \(No space left on device\)"):
        write_atomically(tmp_path / "out.txt", fails_half_way)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    assert (tmp_path / "out.txt").read_text(encoding="utf-8") == "before"


def test_a_quicker_evaluation_never_replaces_a_more_thorough_record(trained_della, capsys):
    assert main(["evaluate", str(trained_della), "--iw-samples", "3"]) == 0
    thorough = json.loads((trained_della / "eval_test.json").read_text())
    assert thorough["settings"]["iw_samples"] == 3 and thorough["settings"]["precision"] == "fp32"
    capsys.readouterr()
    assert main(["evaluate", str(trained_della), "--iw-samples", "1", "--examples", "5"]) == 0
    assert "kept the run's more thorough eval_test.json" in capsys.readouterr().err
    assert json.loads((trained_della / "eval_test.json").read_text()) == thorough
    quick = json.loads((trained_della / "eval_test-k1-n5.json").read_text())
    # each record keeps its own examples' scores beside it (for `textvae report --reference`); no scratch file left
    kept = [json.loads(line) for line in (trained_della / "eval_test.examples.jsonl").read_text().splitlines()]
    assert len(kept) == thorough["examples"] and sum(r["nll"] for r in kept) / len(kept) == pytest.approx(thorough["nll"])
    assert len((trained_della / "eval_test-k1-n5.examples.jsonl").read_text().splitlines()) == 5
    assert not list(trained_della.glob(".eval_test.examples*"))
    assert quick["settings"] == {"iw_samples": 1, "au_delta": 0.01, "seed": 0, "precision": "fp32", "examples_limit": 5,
                                 "iw_batch": "auto"}
    assert main(["evaluate", str(trained_della), "--iw-samples", "4"]) == 0  # as thorough or more: replaces
    assert json.loads((trained_della / "eval_test.json").read_text())["settings"]["iw_samples"] == 4
    assert (trained_della / "eval_test.examples.jsonl").read_text() != "\n".join(map(json.dumps, kept)) + "\n"


def test_a_language_model_record_is_replaced_by_one_over_as_many_examples(tiny_txt, tmp_path, capsys):
    """An LM's likelihood is exact: only the number of examples makes one record more thorough,
    also against a record made before settings were stored (which counted as k = 100)."""
    run = tmp_path / "lm"
    assert main(["train", "--model", "lm", "--data", str(tiny_txt), "--out", str(run), "--max-steps", "2", *FAST]) == 0
    assert main(["evaluate", str(run)]) == 0
    record = json.loads((run / "eval_test.json").read_text())
    assert record["settings"]["iw_samples"] is None
    old = {key: value for key, value in record.items() if key != "settings"} | {"ppl": 1.0}
    (run / "eval_test.json").write_text(json.dumps(old))
    assert main(["evaluate", str(run)]) == 0
    assert json.loads((run / "eval_test.json").read_text()) == record
    capsys.readouterr()
    assert main(["evaluate", str(run), "--examples", "3"]) == 0
    assert "kept the run's more thorough eval_test.json" in capsys.readouterr().err
    assert json.loads((run / "eval_test.json").read_text()) == record
    assert json.loads((run / "eval_test-n3.json").read_text())["examples"] == 3


def test_per_example_numbers_are_written_in_the_split_order_and_average_to_the_metrics(trained_della, tmp_path):
    out = tmp_path / "examples.jsonl"
    assert main(["evaluate", str(trained_della), "--iw-samples", "2", "--per-example", str(out), "--json", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["index"] for line in lines] == list(range(metrics["examples"]))
    for key in ("nll", "elbo", "kl"):
        assert sum(line[key] for line in lines) / len(lines) == pytest.approx(metrics[key], rel=1e-9)
    assert sum(line["tokens"] for line in lines) == metrics["tokens"]
    texts = (trained_della.parent / "txt" / "test.txt").read_text().splitlines()
    run = textvae.load(trained_della)  # each record names the very tokens it scored
    tokenizer, data = run.model.tokenizer, run.config.data
    layouts, _ = encode_examples([Example(text) for text in texts], tokenizer, data.max_length, data.max_source_length,
                                 data.overlong)
    assert [line["tokens_sha"] for line in lines] == [tokens_sha(item.ids, tokenizer.sep_id) for item in layouts]
    assert len(set(line["tokens_sha"] for line in lines)) == len(set(texts))
    # in the split's order (batches run longest first): each text's own token count
    assert [line["tokens"] for line in lines] == textvae.load(trained_della).log_likelihood(texts, k=1)["tokens"]


def test_report_shows_the_importance_samples_of_each_record(trained_della, tmp_path, capsys):
    assert main(["evaluate", str(trained_della), "--iw-samples", "2"]) == 0
    capsys.readouterr()
    assert main(["report", str(trained_della), "--out", str(tmp_path / "report")]) == 0
    table = (tmp_path / "report" / "report.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| run"))
    row = next(line for line in table.splitlines() if line.startswith("| della"))
    cells = dict(zip(header.split("|"), row.split("|")))
    assert cells[" k "].strip() == "2" and cells[" examples "].strip() == "24"


def test_an_offline_hub_name_says_how_to_allow_a_download_without_asking_the_hub(monkeypatch):
    import socket

    from huggingface_hub import constants, file_download

    from textvae.backbone.load import load_pretrained_base

    asked = []

    def no_network(*args, **kwargs):
        raise OSError("this test has no network")

    def record_request(url, *args, **kwargs):
        asked.append(url)
        raise OSError("this test has no network")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(file_download, "get_hf_file_metadata", record_request)  # a model file's HEAD request
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # huggingface_hub imported before the setting below
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TextVAEError, match="HF_HUB_OFFLINE=0 to allow one"):
        load_pretrained_base("hf:textvae-tests/no-such-model", None, "eager")
    assert asked == []


def test_every_run_file_gets_the_mode_the_umask_gives(tiny_txt, tmp_path):
    previous = os.umask(0o022)
    try:
        run = tmp_path / "run"
        assert main(["train", "--data", str(tiny_txt), "--out", str(run), "--max-steps", "2",
                     "--set", "train.checkpoint_every=1", *FAST]) == 0
    finally:
        os.umask(previous)
    modes = {path.relative_to(run).as_posix(): stat.S_IMODE(path.stat().st_mode) for path in run.rglob("*")}
    assert any(name.endswith("optimizer.safetensors") for name in modes)  # checkpoints were written
    wrong = {name: oct(mode) for name, mode in modes.items()
             if mode != (0o755 if (run / name).is_dir() else 0o644) and not (run / name).is_symlink()}
    assert not wrong


def test_a_run_stores_every_model_option_so_a_later_default_cannot_change_it(tiny_txt, tmp_path):
    import yaml

    run = tmp_path / "trace"
    assert main(["train", "--model", "trace-r", "--data", str(tiny_txt), "--out", str(run), "--max-steps", "1", *FAST]) == 0
    model = yaml.safe_load((run / "config.yaml").read_text())["run"]["model"]
    assert model["norm_over"] == "both" and model["norm_shift"] == "learned" and model["ln_gamma"] == 3.0
    assert model["latent_size"] == 32 and model["segment_length"] == 10


def test_a_trace_run_saved_before_the_default_changed_loads_with_the_old_normalisation(tiny_txt, tmp_path):
    import yaml

    from textvae.models.registry import load_model

    run = tmp_path / "trace"
    assert main(["train", "--model", "trace-r", "--data", str(tiny_txt), "--out", str(run), "--max-steps", "1",
                 "--set", "model.norm_over=mean", "--set", "model.norm_shift=zero", *FAST]) == 0
    meta = yaml.safe_load((run / "config.yaml").read_text())
    meta["run"]["model"] = {"name": "trace-r", "conditional": False}  # as runs were saved before: only what was set
    (run / "config.yaml").write_text(yaml.safe_dump(meta))
    model, _ = load_model(run)  # strict loading: a learned shift would be a missing tensor
    assert model.residual_norm.over == "mean" and model.residual_norm.shift is None
    # and --resume compares the run's options with the defaults it was made under
    assert main(["train", "--model", "trace-r", "--data", str(tiny_txt), "--out", str(run), "--max-steps", "1",
                 "--set", "model.norm_over=mean", "--set", "model.norm_shift=zero", *FAST, "--resume"]) == 0


def test_a_full_disk_during_a_checkpoint_write_stops_in_one_line_and_keeps_the_previous_one(tiny_txt, tmp_path,
                                                                                             monkeypatch, capsys):
    from textvae.training import checkpoint

    monkeypatch.setattr(checkpoint, "_FAULT_COUNTS", {})
    monkeypatch.setenv("TEXTVAE_FAULT", "checkpoint-write:2:enospc")  # the second checkpoint's write fails
    run = tmp_path / "run"
    args = ["train", "--data", str(tiny_txt), "--out", str(run), "--max-steps", "3", "--set", "train.checkpoint_every=1", *FAST]
    assert main(args) == 2
    error = _one_line_error(capsys)
    assert "could not write the checkpoint of step 2" in error and "No space left on device" in error
    assert "step-000001" in error
    checkpoints = run / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step-000001"
    assert not [path for path in checkpoints.iterdir() if path.suffix == ".writing"]
    monkeypatch.delenv("TEXTVAE_FAULT")
    assert main([*args, "--resume"]) == 0  # space again: the run continues from step 1 and finishes
    assert (run / "model.safetensors").is_file()


def safetensors_on_a_full_disk(monkeypatch) -> None:
    """Every safetensors write fails as the library fails on a full disk (checked on a full
    tmpfs: its own error type, not an OSError), after writing part of the file."""
    from safetensors import SafetensorError

    from textvae import files

    def full_disk(_tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(files, "save_file", full_disk)
    monkeypatch.setattr(files, "save_model", full_disk)


def test_a_full_disk_while_saving_the_model_leaves_no_partial_file(tiny_txt, tmp_path, monkeypatch, capsys):
    from textvae.models import registry

    real = registry.write_weights

    def write_final_weights_on_a_full_disk(model, path):
        with monkeypatch.context() as patch:
            safetensors_on_a_full_disk(patch)
            real(model, path)

    monkeypatch.setattr(registry, "write_weights", write_final_weights_on_a_full_disk)
    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny_txt), "--out", str(run), "--max-steps", "1", *FAST]) == 2
    assert "model.safetensors (No space left on device)" in _one_line_error(capsys)
    assert not [path.name for path in run.iterdir() if "model.safetensors" in path.name]  # nor a temporary


def test_a_full_disk_at_the_first_checkpoint_stops_in_one_line_and_leaves_no_partial_checkpoint(tiny_txt, tmp_path,
                                                                                                monkeypatch, capsys):
    safetensors_on_a_full_disk(monkeypatch)
    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny_txt), "--out", str(run), "--max-steps", "2",
                 "--set", "train.checkpoint_every=1", *FAST]) == 2
    assert ("could not write the checkpoint of step 1 (No space left on device); no earlier checkpoint exists"
            in _one_line_error(capsys))
    assert list((run / "checkpoints").iterdir()) == []


def test_importance_samples_scored_a_few_at_a_time_give_the_same_estimate(trained_della):
    from textvae.data.batching import collate
    from textvae.evaluation.likelihood import log_marginals
    from textvae.runs import encode_split, load_run
    from textvae.data.corpus import read_split

    model, config = load_run(trained_della, "cpu")
    encoded = encode_split(read_split(trained_della.parent / "txt", "test"), model, config, "test", False)
    batch = collate(encoded[:4], model.tokenizer.pad_id)
    torch.manual_seed(0)
    chunked = log_marginals(model, batch, 6, chunk=2)[0]
    torch.manual_seed(0)
    weights = torch.cat([model.importance_weights(batch, 2).total for _ in range(3)], dim=1)  # the same draws
    assert torch.allclose(chunked, torch.logsumexp(weights, dim=1) - torch.log(torch.tensor(6.0)), atol=1e-5)


def test_by_default_a_decoder_pass_scores_as_many_samples_as_fit_its_position_budget(trained_della, monkeypatch):
    from textvae.data.batching import collate
    from textvae.data.corpus import read_split
    from textvae.evaluation import likelihood
    from textvae.runs import encode_split, load_run

    model, config = load_run(trained_della, "cpu")
    encoded = encode_split(read_split(trained_della.parent / "txt", "test"), model, config, "test", False)
    batch = collate(encoded[:4], model.tokenizer.pad_id)
    length = batch.input_ids.shape[1]
    monkeypatch.setattr(likelihood, "POSITIONS_PER_PASS", 4 * length * 3 + 5)  # room for 3 samples of 4 texts
    assert likelihood.samples_per_pass(batch, 7) == 3 and likelihood.samples_per_pass(batch, 2) == 2
    monkeypatch.setattr(likelihood, "POSITIONS_PER_PASS", 1)  # never fewer than one
    assert likelihood.samples_per_pass(batch, 7) == 1
    monkeypatch.setattr(likelihood, "POSITIONS_PER_PASS", 4 * length * 3)
    passes = []
    sampler = model.importance_sampler
    monkeypatch.setattr(model, "importance_sampler", lambda b: (lambda draw: lambda n: passes.append(n) or draw(n))(sampler(b)))
    torch.manual_seed(0)
    default = likelihood.log_marginals(model, batch, 7)[0]
    assert passes == [3, 3, 1]
    torch.manual_seed(0)
    assert torch.equal(default, likelihood.log_marginals(model, batch, 7, chunk=3)[0])  # as if asked for 3


def test_a_batch_cut_short_goes_on_from_the_samples_it_had_scored(trained_della, monkeypatch, capsys):
    import textvae
    from textvae.models.della.model import Della

    whole = textvae.evaluate(trained_della, iw_samples=3, iw_batch=1, batch_size=8)  # 3 batches of 3 one-sample chunks
    real, draws = Della.importance_sampler, []

    def counted(self, batch, cut_at=0):
        draw = real(self, batch)

        def counted_draw(n):
            draws.append(n)
            if len(draws) == cut_at:
                raise KeyboardInterrupt
            return draw(n)
        return counted_draw

    monkeypatch.setattr(Della, "importance_sampler", lambda self, batch: counted(self, batch, cut_at=8))
    with pytest.raises(KeyboardInterrupt):  # at the third batch's second chunk
        textvae.evaluate(trained_della, iw_samples=3, iw_batch=1, batch_size=8)
    draws.clear()
    monkeypatch.setattr(Della, "importance_sampler", counted)
    resumed = textvae.evaluate(trained_della, iw_samples=3, iw_batch=1, batch_size=8, verbose=True)
    assert "resuming: 2 batches of importance samples already done, and 1 of 3 samples of the next" in capsys.readouterr().err
    assert draws == [1, 1]  # the third batch's last two chunks only
    assert resumed == whole  # every number, exactly: the generator went on from its state at the cut
    assert not (trained_della / ".eval_test.progress.safetensors").exists()


def test_an_unfinished_batch_drawn_on_another_kind_of_device_is_redone(tmp_path):
    from textvae.evaluation.likelihood import Progress
    from textvae.models.base import ImportanceWeights

    weights = ImportanceWeights(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2))
    progress = Progress(tmp_path / "progress.safetensors", "key")
    progress.put_samples(4, weights, torch.device("cpu"))
    kept = Progress(tmp_path / "progress.safetensors", "key")
    assert kept.samples_of_next == 3 and kept.samples_of(4, torch.device("cpu")).total.shape == (2, 3)
    assert kept.samples_of(5, torch.device("cpu")) is None  # another batch's
    kept.done["partial.cuda_generator"] = torch.zeros(16, dtype=torch.uint8)  # as if drawn on a GPU
    assert kept.samples_of(4, torch.device("cpu")) is None
    kept.put(4, torch.zeros(2), torch.zeros(2))
    assert kept.samples_of_next == 0 and kept.batches_done == 1


def test_a_zero_importance_batch_is_refused(trained_della, capsys):
    assert main(["evaluate", str(trained_della), "--iw-batch", "0"]) == 2
    assert "--iw-batch" in _one_line_error(capsys)


def test_a_long_evaluation_says_how_far_it_has_come_and_how_long_is_left(monkeypatch, capsys):
    from textvae.evaluation import pace

    clock = iter([0.0, 300.0, 420.0, 540.0, 0.0])  # the start, the end of each batch, the quiet one's start
    monkeypatch.setattr(pace, "perf_counter", lambda: next(clock))
    meter = pace.Pace([50, 30, 20], enabled=True)  # a log, not a terminal: lines, no bar
    meter.done(0, computed=False)  # read back from a progress file: done, but says nothing of the pace
    meter.done(1, computed=True)
    meter.done(2, computed=True)
    meter.close()
    assert capsys.readouterr().err.splitlines() == [
        "evaluate: 50% of the work (1 of 3 batches), 5 min so far",
        "evaluate: 80% of the work (2 of 3 batches), 7 min so far, about 1 min left",  # 120 s for 30, 20 to go: 80 s
        "evaluate: 100% of the work (3 of 3 batches), 9 min so far",
    ]
    quiet = pace.Pace([50, 30, 20], enabled=False)
    for index in range(3):
        quiet.done(index, computed=True)
    assert capsys.readouterr().err == ""


def _interrupted_at_the_third_call(marginals, calls: list):
    """`marginals` (likelihood.log_marginals), counting its calls in `calls`; the third is
    interrupted as a Ctrl-C would."""
    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return marginals(*args, **kwargs)

    return counted


def test_an_evaluation_cut_short_resumes_with_the_numbers_of_an_uninterrupted_one(trained_della, monkeypatch, capsys):
    import textvae
    from textvae.evaluation import likelihood

    whole = textvae.evaluate(trained_della, iw_samples=3, batch_size=8)  # 24 test sentences: 3 batches
    real, calls = likelihood.log_marginals, []
    cut_short_at_the_third_batch = _interrupted_at_the_third_call(real, calls)
    monkeypatch.setattr(likelihood, "log_marginals", cut_short_at_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        textvae.evaluate(trained_della, iw_samples=3, batch_size=8)
    progress = trained_della / ".eval_test.progress.safetensors"
    assert progress.is_file()  # whole batches only, the format older versions wrote too
    calls.clear()
    monkeypatch.setattr(likelihood, "log_marginals", lambda *a, **k: calls.append(1) or real(*a, **k))
    other_seed = textvae.evaluate(trained_della, iw_samples=3, batch_size=8, seed=1, verbose=True)
    assert "resuming" not in capsys.readouterr().err and len(calls) == 3  # other settings: nothing reused
    assert other_seed["nll"] != whole["nll"]

    with pytest.raises(KeyboardInterrupt):  # cut short again at the third batch
        monkeypatch.setattr(likelihood, "log_marginals", cut_short_at_the_third_batch)
        calls.clear()
        textvae.evaluate(trained_della, iw_samples=3, batch_size=8)
    calls.clear()
    monkeypatch.setattr(likelihood, "log_marginals", lambda *a, **k: calls.append(1) or real(*a, **k))
    resumed = textvae.evaluate(trained_della, iw_samples=3, batch_size=8, verbose=True)
    err = capsys.readouterr().err
    assert "resuming: 2 batches" in err and len(calls) == 1
    assert "evaluate: 100% of the work (3 of 3 batches)" in err
    assert resumed == whole  # every number, exactly
    assert not progress.exists()

    with pytest.raises(KeyboardInterrupt):  # cut short once more, then the run is retrained
        monkeypatch.setattr(likelihood, "log_marginals", cut_short_at_the_third_batch)
        calls.clear()
        textvae.evaluate(trained_della, iw_samples=3, batch_size=8)
    weights = trained_della / "model.safetensors"
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 0.5
    save_file(tensors, weights)
    calls.clear()
    monkeypatch.setattr(likelihood, "log_marginals", lambda *a, **k: calls.append(1) or real(*a, **k))
    retrained = textvae.evaluate(trained_della, iw_samples=3, batch_size=8, verbose=True)
    assert "resuming" not in capsys.readouterr().err and len(calls) == 3  # new weights: nothing reused
    assert retrained["nll"] != whole["nll"]
    assert not progress.exists()


def test_an_evaluation_resumed_over_edited_texts_reuses_nothing(trained_della, tiny_txt, monkeypatch, capsys):
    """The progress file is keyed by the very tokens scored, not only the data folder's path."""
    import textvae
    from textvae.evaluation import likelihood

    real, calls = likelihood.log_marginals, []
    cut_short_at_the_third_batch = _interrupted_at_the_third_call(real, calls)
    monkeypatch.setattr(likelihood, "log_marginals", cut_short_at_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        textvae.evaluate(trained_della, iw_samples=2, batch_size=8)
    lines = (tiny_txt / "test.txt").read_text().splitlines()
    (tiny_txt / "test.txt").write_text("\n".join(["a zebra .", *lines[1:]]) + "\n")  # one text edited in place
    calls.clear()
    monkeypatch.setattr(likelihood, "log_marginals", lambda *a, **k: calls.append(1) or real(*a, **k))
    textvae.evaluate(trained_della, iw_samples=2, batch_size=8, verbose=True)
    assert "resuming" not in capsys.readouterr().err and len(calls) == 3


def test_weights_of_another_shape_are_one_line(trained_della, capsys):
    weights = load_file(trained_della / "model.safetensors")
    name = next(name for name, tensor in weights.items() if tensor.dim() == 2)
    weights[name] = torch.zeros(weights[name].shape[0] + 1, weights[name].shape[1])
    save_file(weights, trained_della / "model.safetensors")
    assert main(["evaluate", str(trained_della), "--iw-samples", "1"]) == 2
    error = _one_line_error(capsys)
    assert "does not match the model" in error and name in error
