"""The `lm` row end to end through the CLI, and clean failures on bad input."""

import json
import math
from pathlib import Path

import pytest
import torch

from textvae.cli import main
from textvae.data.batching import collate, encode_examples
from textvae.data.corpus import read_split
from textvae.models.registry import load_model
from textvae.errors import TextVAEError

FAST = ["--set", "data.max_length=32", "--set", "train.batch_size=16", "--set", "train.warmup_steps=5",
        "--set", "train.log_every=5", "--set", "train.precision=fp32", "--set", "data.vocab_size=400"]


def _records(run, split="train"):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ("gpt2-tiny", "llama-tiny"))
def test_lm_trains_evaluates_and_generates(backbone, tiny_txt, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--model", "lm", "--backbone", backbone, "--data", str(tiny_txt), "--out", str(run)]
    assert main([*args, "--max-steps", "30", *FAST]) == 0
    train = _records(run)
    assert train[-1]["rec"] < train[0]["rec"] - 5  # nats per example: learning happened
    assert {"config.yaml", "model.safetensors", "tokenizer.json", "metrics.jsonl"} <= {p.name for p in run.iterdir()}
    capsys.readouterr()

    assert main(["evaluate", str(run), "--json", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert set(metrics) == {"ppl", "nll", "ppl_stderr", "nll_stderr", "tokens", "examples", "settings"}
    assert metrics["settings"]["iw_samples"] is None  # the LM's likelihood is exact
    assert metrics["examples"] == 24
    assert metrics["ppl"] == pytest.approx(math.exp(metrics["nll"] * metrics["examples"] / metrics["tokens"]))
    assert "ppl" in capsys.readouterr().out

    assert main(["generate", str(run), "--num", "4", "--decoding", "top-k", "--seed", "3"]) == 0
    texts = capsys.readouterr().out.splitlines()
    assert len(texts) == 4 and all(texts)
    assert main(["generate", str(run), "--num", "2", "--decoding", "beam", "--out", str(tmp_path / "g.txt")]) == 0
    assert len((tmp_path / "g.txt").read_text().splitlines()) == 2


@pytest.mark.slow
def test_ppl_matches_hugging_face_loss_with_the_token_convention(tiny_txt, tmp_path):
    run = tmp_path / "run"
    main(["train", "--model", "lm", "--data", str(tiny_txt), "--out", str(run), "--max-steps", "5", *FAST])
    main(["evaluate", str(run), "--json", str(tmp_path / "m.json")])
    ours = json.loads((tmp_path / "m.json").read_text())
    model, config = load_model(run)
    encoded, _ = encode_examples(read_split(tiny_txt, "test").examples, model.tokenizer, 32, 16, "truncate")
    batch = collate(encoded, model.tokenizer.pad_id)
    labels = batch.input_ids.masked_fill(~batch.target_mask, -100)  # BOS and padding not scored
    with torch.no_grad():
        hf = model.backbone.causal_lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels)
    assert ours["tokens"] == int(batch.target_mask.sum()) == sum(len(e.ids) - 1 for e in encoded)
    assert ours["ppl"] == pytest.approx(math.exp(hf.loss.item()), rel=1e-4)


@pytest.mark.slow
def test_lm_on_jsonl_scores_targets_only(tiny_jsonl, tmp_path):
    run = tmp_path / "run"
    long = ["--set", "data.max_length=96", "--set", "data.max_source_length=40"]
    assert main(["train", "--model", "lm", "--data", str(tiny_jsonl), "--out", str(run), "--max-steps", "4", *FAST, *long]) == 0
    assert main(["evaluate", str(run), "--json", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    model, _ = load_model(run)
    targets = [e.target for e in read_split(tiny_jsonl, "test").examples]
    assert metrics["tokens"] == sum(len(model.tokenizer.encode(t)) + 1 for t in targets)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a man sleeps .\ntwo dogs run .\n")
    assert main(["generate", str(run), "--prompts", str(prompts), "--num", "2", "--out", str(tmp_path / "o.txt")]) == 0
    assert len((tmp_path / "o.txt").read_text().splitlines()) == 4


def _bad_inputs(tmp_path, tiny_txt):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "train.txt").write_text("\n")
    (empty / "valid.txt").write_text("x\n")
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "train.txt").write_bytes(b"fine\n\xc3\x28 broken\n")
    (binary / "valid.txt").write_text("x\n")
    return {
        "missing data": (["--data", str(tmp_path / "nope")], "data folder not found"),
        "empty split": (["--data", str(empty)], "holds no examples"),
        "undecodable": (["--data", str(binary)], "not valid UTF-8"),
        "unknown model": (["--data", str(tiny_txt), "--model", "vae9000"], "unknown model 'vae9000'"),
        "unknown backbone": (["--data", str(tiny_txt), "--backbone", "gpt5-huge"], "unknown backbone"),
        "invalid value": (["--data", str(tiny_txt), "--set", "train.lr=fast"], "train.lr must be float"),
        "non-finite value": (["--data", str(tiny_txt), "--set", "train.lr=nan"], "train.lr must be float"),
        "non-finite YAML float": (["--data", str(tiny_txt), "--set", "kl.beta=.inf"], "kl.beta must be float"),
        "invalid choice": (["--data", str(tiny_txt), "--set", "data.overlong=squash"], "data.overlong must be one of"),
        "unknown key": (["--data", str(tiny_txt), "--set", "train.speed=3"], "unknown train option"),
        "latent layers beyond backbone": (["--data", str(tiny_txt), "--model", "della", "--set", "model.latent_begin=5"],
                                         "model.latent_begin..latent_end = 5..4 must lie in the backbone's layers 1..4"),
        "too long for backbone": (["--data", str(tiny_txt), "--set", "data.max_length=4096"], "longer than backbone"),
        "over-long input": (["--data", str(tiny_txt), "--set", "data.max_length=8", "--set", "data.overlong=error"], "more than data.max_length=8"),
        "bad flag": (["--data", str(tiny_txt), "--epochs", "two"], "invalid int value"),
    }


CASES = ["missing data", "empty split", "undecodable", "unknown model", "unknown backbone", "invalid value",
         "non-finite value", "non-finite YAML float", "invalid choice", "unknown key", "latent layers beyond backbone",
         "too long for backbone", "over-long input", "bad flag"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_line_and_no_run_dir(case, tiny_txt, tmp_path, capsys):
    args, message = _bad_inputs(tmp_path, tiny_txt)[case]
    run = tmp_path / "run"
    code = main(["train", "--out", str(run), "--max-steps", "2", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("textvae: error: ") and message in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not run.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.")]  # no staging leftovers


def test_existing_run_dir_is_protected(tiny_txt, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("precious")
    assert main(["train", "--data", str(tiny_txt), "--out", str(run), "--max-steps", "2", *FAST]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (run / "keep.txt").read_text() == "precious"


def test_overwrite_replaces_only_a_run_and_never_the_data(tiny_txt, tmp_path, capsys):
    folder = tmp_path / "thesis"
    (folder / "photos").mkdir(parents=True)
    (folder / "thesis.txt").write_text("precious")
    args = ["train", "--data", str(tiny_txt), "--max-steps", "2", *FAST, "--overwrite"]
    assert main([*args, "--out", str(folder)]) == 2
    assert "replaces only a textvae run" in capsys.readouterr().err
    assert (folder / "thesis.txt").read_text() == "precious" and (folder / "photos").is_dir()
    assert main([*args, "--out", str(tiny_txt)]) == 2  # --data X --out X
    assert "would delete the data" in capsys.readouterr().err
    assert main([*args, "--out", str(tiny_txt.parent)]) == 2  # a folder holding the data
    assert "would delete the data" in capsys.readouterr().err
    assert (tiny_txt / "train.txt").is_file()
    (tmp_path / "file").write_text("x")
    assert main([*args, "--out", str(tmp_path / "file")]) == 2
    assert "is a file, not a run directory" in capsys.readouterr().err


@pytest.mark.slow
def test_overwrite_swaps_the_new_run_in_only_once_it_has_a_checkpoint(tiny_txt, tmp_path):
    run = tmp_path / "run"
    common = ["train", "--data", str(tiny_txt), "--out", str(run), *FAST]
    assert main([*common, "--max-steps", "2"]) == 0
    old_weights = (run / "model.safetensors").read_bytes()
    seen = []

    def watch(trainer, step):  # what a user finds at `run` while the replacement trains
        seen.append((step, (run / "model.safetensors").exists() and (run / "model.safetensors").read_bytes() == old_weights))

    from textvae.training import trainer as trainer_module

    original = trainer_module.Trainer.__init__

    def with_watch(self, *a, **k):
        original(self, *a, **k)
        self.callbacks.insert(0, watch)

    trainer_module.Trainer.__init__ = with_watch
    try:
        assert main([*common, "--max-steps", "5", "--set", "train.checkpoint_every=3", "--overwrite"]) == 0
    finally:
        trainer_module.Trainer.__init__ = original
    assert seen == [(1, True), (2, True), (3, True), (4, False), (5, False)]  # swapped after step 3's checkpoint
    assert (run / "model.safetensors").read_bytes() != old_weights
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left behind


def test_other_commands_fail_cleanly(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nothing")]) == 2
    assert "run directory not found" in capsys.readouterr().err
    assert main(["interpolate", str(tmp_path / "nothing"), "a", "b"]) == 2
    assert "run directory not found" in capsys.readouterr().err
    assert main(["score", str(tmp_path / "g.txt"), "--refs", str(tmp_path / "r.txt")]) == 2
    assert "file not found" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lm", "della", "trace-r"])
def test_story_task_keeps_a_decoder_only_backbone_and_writes_samples_per_prompt(name, tiny_jsonl, tmp_path, capsys):
    run = tmp_path / "run"
    sizes = ["--set", "data.max_length=64", "--set", "data.max_source_length=24"]
    sizes += [] if name == "lm" else ["--set", "model.latent_size=4"]
    assert main(["train", "--task", "story", "--model", name, "--data", str(tiny_jsonl), "--out", str(run),
                 "--max-steps", "2", *FAST, *sizes]) == 0
    model, config = load_model(run)
    assert config.data.task == "story" and not model.backbone.is_encoder_decoder
    assert config.data.max_length == 64  # --set beats the task's default of 256
    sources = [e.source for e in read_split(tiny_jsonl, "test").examples[:3]]
    (tmp_path / "prompts.txt").write_text("\n".join(sources) + "\n")
    capsys.readouterr()
    common = ["--prompts", str(tmp_path / "prompts.txt"), "--max-new-tokens", "6"]
    assert main(["generate", str(run), *common, "--num", "2", "--decoding", "top-k", "--seed", "1"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 6  # two per source
    out = tmp_path / "m.json"
    assert main(["evaluate", str(run), "--iw-samples", "2", "--generate", "2", "--samples-per-source", "2",
                 "--decoding", "top-k", "--max-new-tokens", "6", "--metrics", "bleu_ref,self_bleu,dist_1",
                 "--json", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["samples_per_source"] == 2 and 0 <= metrics["bleu_ref"] <= 100
    assert (name == "lm") == ("kl" not in metrics)


def test_set_reads_exponent_notation_as_a_float():
    from textvae.config import Config, apply_overrides

    config = Config.from_dict(apply_overrides({}, ["train.lr=1e-4", "kl.low=2E-5"]))  # YAML 1.1 reads these as strings
    assert config.train.lr == 1e-4 and config.kl.low == 2e-5


def test_set_keeps_a_text_option_as_typed():
    from textvae.config import Config, apply_overrides

    raw = apply_overrides({}, ["data.path=0123", "backbone.spec=0x1f", "data.task=null", "train.precision=fp32",
                               "data.overlong='drop'", "backbone.lora_targets=[q_proj]"])
    config = Config.from_dict(raw)
    assert config.data.path == "0123" and config.backbone.spec == "0x1f"  # YAML 1.1: octal 83, hex 31
    assert config.data.task is None and config.data.overlong == "drop" and config.train.precision == "fp32"
    assert config.backbone.lora_targets == ["q_proj"]  # a list option: YAML


@pytest.mark.parametrize("raw, message", [({"data": [1, 2]}, "section 'data' must be a mapping"),
                                          ({"train": 0}, "section 'train' must be a mapping"),
                                          ({"train": {"seed": -1}}, r"train.seed must be in \[0, 2\*\*32\)"),
                                          ({"train": {"seed": 2**32}}, "train.seed must be in")])
def test_a_config_that_cannot_be_used_is_one_error(raw, message):
    from textvae.runs import assemble_config

    with pytest.raises(TextVAEError, match=message):
        assemble_config(raw, [])
    assert assemble_config({"data": None, "train": {"seed": 2**32 - 1}}, []).train.seed == 2**32 - 1  # empty: defaults


@pytest.mark.parametrize("damage", ["truncate weights", "config without hf_config", "hf_config without model_type"])
def test_a_damaged_run_gives_one_line(damage, tiny_txt, tmp_path, capsys):
    import yaml

    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny_txt), "--out", str(run), "--max-steps", "1", *FAST]) == 0
    if damage == "truncate weights":
        weights = run / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        meta = yaml.safe_load((run / "config.yaml").read_text())
        if damage == "config without hf_config":
            del meta["hf_config"]
        else:
            del meta["hf_config"]["model_type"]
        (run / "config.yaml").write_text(yaml.safe_dump(meta))
    capsys.readouterr()
    assert main(["evaluate", str(run), "--iw-samples", "1"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and error.startswith("textvae: error: ") and str(run) in error


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid_and_finds_its_data(path, monkeypatch):
    from textvae.config import load_yaml
    from textvae.data.corpus import resolve_data_dir
    from textvae.runs import assemble_config

    config = assemble_config(load_yaml(path), [])  # raises TextVAEError on an unknown or invalid option
    monkeypatch.chdir(path.parents[1])  # relative data paths start at the repository root
    assert any(resolve_data_dir(config.data.path).glob("train.*"))


def test_the_demo_commands_in_the_makefile_parse_and_their_files_exist():
    import shlex

    from textvae.cli.parser import build_parser

    root = Path(__file__).resolve().parents[1]
    lines = (root / "Makefile").read_text().split("\ndemo:", 1)[1].split("\n\n", 1)[0].splitlines()
    commands = [shlex.split(line.strip().replace("$(BIN)/textvae", "").replace("$(DEMO_RUN)", "runs/demo"))
                for line in lines if line.strip().startswith("$(BIN)/textvae")]
    assert [args[0] for args in commands] == ["train", "evaluate", "generate", "interpolate", "steer", "generate"]
    for args in commands:
        parsed = vars(build_parser().parse_args(args))  # argparse exits on an unknown option
        for option in ("config", "reconstruct", "from_texts", "to_texts", "texts"):
            if isinstance(parsed.get(option), str):
                assert (root / parsed[option]).is_file(), parsed[option]


def test_a_config_written_for_one_model_trains_another_dropping_only_the_options_it_lacks(capsys):
    from textvae.errors import TextVAEError
    from textvae.runs import assemble_config

    raw = {"model": {"name": "della", "latent_size": 16, "rank": 4}}
    config = assemble_config(raw, ["model.name=trace-r"])
    assert config.model["name"] == "trace-r" and config.model["latent_size"] == 16 and "rank" not in config.model
    assert "rank (for della) do not apply to trace-r" in capsys.readouterr().err
    assert assemble_config(raw, []).model["rank"] == 4 and capsys.readouterr().err == ""  # its own model: kept
    with pytest.raises(TextVAEError, match="unknown model option"):  # set by hand: still checked
        assemble_config(raw, ["model.name=trace-r", "model.rank=4"])
