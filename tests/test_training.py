"""The trainer: learning-rate schedule, exact resume after a kill, gradient accumulation and
two-process DistributedDataParallel, each checked against an uninterrupted single process."""

import json
import math
import multiprocessing
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from textvae.cli import main
from textvae.config import TrainConfig
from textvae.training.trainer import learning_rate

BASE = ["--model", "lm", "--set", "data.max_length=32", "--set", "data.vocab_size=400", "--set", "train.warmup_steps=3",
        "--set", "train.log_every=1", "--set", "train.precision=fp32", "--set", "backbone.dropout=0.1"]


def _weights(run):
    return load_file(str(run / "model.safetensors"))


def _losses(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["split"] == "train"]


def _grad_norms(run):
    """Gradient norms are logged: unlike Adam's updates, they expose a mis-weighted loss."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["grad_norm"] for r in records if r["split"] == "train"]


def _torchrun(arguments):
    """`textvae ARGUMENTS` in two one-thread processes under torchrun."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "textvae", *arguments], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600, check=False)


def test_learning_rate_warms_up_then_decays():
    config = TrainConfig(lr=1.0, warmup_steps=4, decay="linear")
    assert [learning_rate(config, s, 12) for s in (0, 3)] == [0.25, 1.0]
    assert learning_rate(config, 8, 12) == pytest.approx(0.5)
    assert learning_rate(config, 12, 12) == 0.0
    cosine = TrainConfig(lr=1.0, warmup_steps=0, decay="cosine")
    assert learning_rate(cosine, 5, 10) == pytest.approx(0.5)


def _train_and_die(args, kill_at_step):
    """Child process: train, and SIGKILL ourselves right after optimizer step `kill_at_step`."""
    from textvae.training import trainer

    original = trainer.Trainer.__init__

    def with_kill(self, *a, **k):
        original(self, *a, **k)
        self.callbacks.append(lambda t, step: os.kill(os.getpid(), signal.SIGKILL) if step == kill_at_step else None)

    trainer.Trainer.__init__ = with_kill
    main(args)


LATENT = ["--model", "della", "--set", "model.latent_size=4", "--set", "kl.schedule=cyclical", "--set", "kl.period_epochs=1"]


LORA = ["--set", "backbone.adapter=lora", "--set", "backbone.lora_rank=2"]


@pytest.mark.slow
@pytest.mark.parametrize("model", ("lm", "della", "della-lora", "della-log3"))
def test_resume_after_kill_equals_uninterrupted_run(model, tiny_txt, tmp_path):
    """For a latent model the posterior noise comes from the checkpointed RNG state, so the
    resumed run draws the same latents: losses and weights are still bit-identical. With LoRA
    the checkpoints hold only what trains and the base is drawn again from the seed. Logging
    every 3 steps, the record after the resume (step 9) still averages steps 7-9."""
    common = ["--data", str(tiny_txt), "--max-steps", "14", *BASE, *(LATENT if model != "lm" else []),
              *(LORA if model.endswith("lora") else []), *(["--set", "train.log_every=3"] if model.endswith("log3") else []),
              "--set", "train.batch_size=16", "--set", "train.checkpoint_every=4"]  # 10 batches/epoch: crosses an epoch
    straight = tmp_path / "straight"
    assert main(["train", "--out", str(straight), *common]) == 0

    killed = tmp_path / "killed"
    child = multiprocessing.get_context("spawn").Process(
        target=_train_and_die, args=(["train", "--out", str(killed), *common], 10)
    )
    child.start()
    child.join(timeout=900)  # generous: a loaded 2-core machine runs these 10 steps in minutes
    assert child.exitcode == -signal.SIGKILL
    assert (killed / "checkpoints" / "latest").read_text() == "step-000008"  # steps 9-10 are lost
    assert not (killed / "model.safetensors").exists()

    assert main(["train", "--out", str(killed), *common, "--resume"]) == 0
    assert _losses(killed) == _losses(straight)  # same losses, step by step
    assert _grad_norms(killed) == _grad_norms(straight)
    resumed, reference = _weights(killed), _weights(straight)
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[name], reference[name]) for name in reference)


@pytest.mark.slow
def test_resume_refuses_a_changed_config(tiny_txt, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--out", str(run), "--data", str(tiny_txt), "--max-steps", "2", *BASE]
    assert main(args) == 0
    assert main([*args, "--set", "train.lr=0.5", "--resume"]) == 2
    assert "differs in: train.lr" in capsys.readouterr().err


def test_resuming_a_finished_run_says_so_and_reports_its_last_validation(tiny_txt, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--out", str(run), "--data", str(tiny_txt), "--max-steps", "2", *BASE]
    assert main(args) == 0
    finished = json.loads(capsys.readouterr().out.splitlines()[-1])
    weights = _weights(run)
    assert main([*args, "--resume"]) == 0
    out = capsys.readouterr()
    assert "had already finished its 2 steps; nothing was trained" in out.err.strip().splitlines()[-1]
    assert json.loads(out.out.splitlines()[-1]) == finished and finished["step"] == 2
    assert all(torch.equal(weights[name], value) for name, value in _weights(run).items())


@pytest.mark.slow
def test_gradient_accumulation_equals_one_big_batch(tiny_txt, tmp_path):
    runs = []
    for accum in (1, 4):
        run = tmp_path / f"accum{accum}"
        args = ["train", "--out", str(run), "--data", str(tiny_txt), "--max-steps", "3", *BASE,
                "--set", "backbone.dropout=0.0", "--set", "train.batch_size=16", "--set", f"train.grad_accum={accum}"]
        assert main(args) == 0
        runs.append(run)
    assert _grad_norms(runs[1]) == pytest.approx(_grad_norms(runs[0]), rel=1e-5)
    assert [loss for _, loss in _losses(runs[1])] == pytest.approx([loss for _, loss in _losses(runs[0])], rel=1e-5)
    one, four = _weights(runs[0]), _weights(runs[1])
    for name in one:  # Adam turns float noise in near-zero gradients into lr-sized steps: loose atol
        torch.testing.assert_close(four[name], one[name], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ("full", "lora"))
def test_two_processes_match_one_with_the_same_global_batch(mode, tiny_txt, tmp_path):
    args = ["--data", str(tiny_txt), "--max-steps", "4", *BASE, "--set", "backbone.dropout=0.0",
            "--set", "train.batch_size=16", "--set", "train.checkpoint_every=2", *(LORA if mode == "lora" else [])]
    single = tmp_path / "single"
    assert main(["train", "--out", str(single), *args]) == 0
    double = tmp_path / "double"
    result = _torchrun(["train", "--out", str(double), *args])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 process(es)" in result.stderr
    for (step_a, loss_a), (step_b, loss_b) in zip(_losses(single), _losses(double), strict=True):
        assert step_a == step_b and loss_a == pytest.approx(loss_b, rel=1e-5)
    assert _grad_norms(double) == pytest.approx(_grad_norms(single), rel=1e-5)
    one, two = _weights(single), _weights(double)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_short_batch_skipped_at_an_epoch_end_still_ends_the_epoch(tiny_txt, tmp_path):
    """145 examples in batches of 16 leave one batch of 1, which two processes cannot share.
    With a seed whose shuffle puts it last, the step before it ends epoch 0: it validates."""
    from textvae.data.batching import LengthBucketSampler

    seed = next(s for s in range(100) if len(LengthBucketSampler([1] * 145, 16, s).epoch_batches(0)[-1]) == 1)
    run = tmp_path / "run"
    args = ["--data", str(tiny_txt), "--max-steps", "11", *BASE, "--set", "train.batch_size=16",
            "--set", "data.train_examples=145", "--set", f"train.seed={seed}"]
    result = _torchrun(["train", "--out", str(run), *args])
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "valid"] == [9, 11]  # epoch 0's 9 steps, then the end
    assert [r["epoch"] for r in records if r["split"] == "train" and r["step"] in (9, 10)] == [0, 1]


def test_processes_after_the_first_draw_their_own_numbers():
    from textvae.training.environment import process_seed, seed_everything

    draws = []
    for rank in range(3):
        seed_everything(process_seed(7, rank))
        draws.append(torch.randn(4))
    seed_everything(7)
    assert torch.equal(draws[0], torch.randn(4))  # one process draws what it always drew
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    assert process_seed(2**32 - 1, 7) < 2**32  # a seed NumPy takes


@pytest.mark.slow
def test_a_latent_model_trains_under_two_processes(tiny_txt, tmp_path):
    """Every DELLA parameter gets a gradient on every process (DDP would fail otherwise);
    each process draws its own posterior noise, so only completion and sane logs are checked."""
    run = tmp_path / "della"
    args = ["--data", str(tiny_txt), "--max-steps", "3", *BASE, *LATENT, "--set", "train.batch_size=16"]
    result = _torchrun(["train", "--out", str(run), *args])
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3]
    assert all(r["kl"] > 0 for r in records if r["split"] == "train")
    assert (run / "model.safetensors").is_file()


def test_a_non_finite_step_is_skipped_with_weights_and_optimizer_untouched(tiny_txt, tmp_path):
    from textvae.config import Config
    from textvae.data.batching import encode_examples
    from textvae.data.corpus import read_split
    from textvae.models.registry import create_model
    from textvae.training.environment import Environment
    from textvae.training.trainer import Trainer

    config = Config.from_dict({"model": {"name": "della", "latent_size": 4}, "data": {"vocab_size": 300},
                               "train": {"batch_size": 8, "warmup_steps": 0, "precision": "fp32"}})
    examples = read_split(tiny_txt, "train").examples
    model = create_model(config, [e.target for e in examples])
    encoded, _ = encode_examples(examples[:16], model.tokenizer, 32, 16, "truncate")
    trainer = Trainer(model, config.train, encoded, encoded, tmp_path, Environment(torch.device("cpu"), bf16=False))
    trainer._optimizer_step(list(range(8)), 1.0)  # a finite step: the optimizer has state now
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    def optimizer_state():
        return [{k: v.clone() for k, v in state.items()} for state in trainer.optimizer.state.values()]

    before = optimizer_state()
    with torch.no_grad():
        model.latents.posterior_from_text[0].bias.fill_(float("nan"))  # every loss is NaN now
    sums, grad_norm = trainer._optimizer_step(list(range(8)), 1.0)
    assert math.isnan(sums["loss"]) and trainer.bad_steps == 1 and trainer.skipped_steps == 1
    trainer._checkpoint(started_next_epoch=False)  # the counters outlive a resume
    again = Trainer(model, config.train, encoded, encoded, tmp_path, Environment(torch.device("cpu"), bf16=False))
    again._resume()
    assert (again.bad_steps, again.skipped_steps) == (1, 1)
    for name, parameter in model.named_parameters():
        if name != "latents.posterior_from_text.0.bias":
            assert torch.equal(parameter, weights[name]), name
    after = optimizer_state()
    assert len(after) == len(before) and all(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
                                             for a, b in zip(after, before))


@pytest.mark.slow
def test_a_diverging_run_stops_in_one_line_with_valid_metrics(tiny_txt, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--out", str(run), "--data", str(tiny_txt), "--max-steps", "40", *BASE, *LATENT,
            "--set", "train.lr=1000", "--set", "train.batch_size=16", "--set", "train.max_bad_steps=3",
            "--set", "train.checkpoint_every=2", "--set", "train.grad_clip=0"]
    assert main(args) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("textvae: error: training diverged: 3 consecutive steps up to step")
    assert "checkpoints/step-" in error
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]  # valid JSON throughout
    assert any(r["loss"] is None for r in records if r["split"] == "train")
    assert not (run / "model.safetensors").exists()
    latest = (run / "checkpoints" / "latest").read_text().strip()
    stored = load_file(str(run / "checkpoints" / latest / "model.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in stored.values())  # no NaN ever reached a checkpoint


def _checkpointed_run(tiny_txt, tmp_path, steps="6"):
    run = tmp_path / "run"
    args = ["train", "--out", str(run), "--data", str(tiny_txt), "--max-steps", steps, *BASE,
            "--set", "train.batch_size=16", "--set", "train.checkpoint_every=2"]
    return run, args


@pytest.mark.slow
def test_resume_falls_back_to_the_newest_intact_checkpoint(tiny_txt, tmp_path, capsys):
    run, args = _checkpointed_run(tiny_txt, tmp_path, steps="4")
    assert main(args) == 0
    straight = _weights(run)
    straight_log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    newest = run / "checkpoints" / "step-000004"
    (run / "model.safetensors").unlink()
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"split": "train", "st')  # a line cut short by a kill
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    captured = capsys.readouterr()
    assert f"{weights} is damaged" in captured.err and "resumed from step-000002" in captured.out + captured.err
    resumed = _weights(run)
    assert all(torch.equal(resumed[name], straight[name]) for name in straight)  # the same 4 steps
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]  # the cut line is gone
    assert [(r["split"], r["step"]) for r in records] == [(r["split"], r["step"]) for r in straight_log]


@pytest.mark.slow
def test_two_processes_resume_from_a_checkpoint_both_can_read(tiny_txt, tmp_path):
    """The second process's RNG state of step 6 is damaged: both processes take step 4."""
    run, args = _checkpointed_run(tiny_txt, tmp_path)
    assert _torchrun(args).returncode == 0
    (run / "checkpoints" / "step-000006" / "rng-rank1.json").write_text("{")
    (run / "model.safetensors").unlink()
    resumed = _torchrun([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "rng-rank1.json is damaged" in resumed.stderr and "resumed from step-000004" in resumed.stdout + resumed.stderr
    assert (run / "model.safetensors").is_file()  # steps 5 and 6 trained again
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("damage", ["model.safetensors", "optimizer.safetensors", "state.json", "rng-rank0.json",
                                    "rng-rank0.safetensors"])
@pytest.mark.slow
def test_resume_with_every_checkpoint_damaged_stops_in_one_line(damage, tiny_txt, tmp_path, capsys):
    run, args = _checkpointed_run(tiny_txt, tmp_path, steps="4")
    assert main(args) == 0
    for folder in (run / "checkpoints").glob("step-*"):
        path = folder / damage
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    (run / "model.safetensors").unlink()
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the data summary lines
    assert error.startswith("textvae: error: no intact checkpoint") and damage in error


@pytest.mark.slow
def test_a_kill_inside_a_checkpoint_write_leaves_the_previous_one_usable(tiny_txt, tmp_path):
    run, args = _checkpointed_run(tiny_txt, tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads for every run: bitwise comparable

    def textvae(arguments, **extra):
        return subprocess.run([sys.executable, "-m", "textvae", *arguments], env={**env, **extra},
                              capture_output=True, text=True, timeout=600).returncode

    assert textvae(args, TEXTVAE_FAULT="checkpoint-write:2") == -signal.SIGKILL  # dies writing step 4's
    assert (run / "checkpoints" / "latest").read_text() == "step-000002"
    assert (run / "checkpoints" / "step-000004.writing" / "model.safetensors").is_file()  # the write was under way
    assert textvae([*args, "--resume"]) == 0
    straight = tmp_path / "straight"
    assert textvae([*args[: args.index("--out") + 1], str(straight), *args[args.index("--out") + 2 :]]) == 0
    resumed, reference = _weights(run), _weights(straight)
    assert all(torch.equal(resumed[name], reference[name]) for name in reference)


def test_a_skipped_step_leaves_batch_norm_statistics_untouched(tiny_txt, tmp_path):
    from textvae.config import Config
    from textvae.data.batching import encode_examples
    from textvae.data.corpus import read_split
    from textvae.models.registry import create_model
    from textvae.training.environment import Environment
    from textvae.training.trainer import Trainer

    config = Config.from_dict({"model": {"name": "trace-r", "latent_size": 4, "segment_length": 4, "posterior_norm": "bn"},
                               "data": {"vocab_size": 300}, "train": {"batch_size": 8, "warmup_steps": 0, "precision": "fp32"}})
    examples = read_split(tiny_txt, "train").examples
    model = create_model(config, [e.target for e in examples])
    encoded, _ = encode_examples(examples[:16], model.tokenizer, 32, 16, "truncate", model.segmenter)
    trainer = Trainer(model, config.train, encoded, encoded, tmp_path, Environment(torch.device("cpu"), bf16=False))
    trainer._optimizer_step(list(range(8)), 1.0)
    statistics = {n: b.clone() for n, b in model.named_buffers() if "running" in n}
    assert statistics
    with torch.no_grad():
        model.residual_from_text.bias.fill_(float("inf"))
    trainer._optimizer_step(list(range(8)), 1.0)
    assert trainer.skipped_steps == 1
    assert all(torch.equal(b, statistics[n]) for n, b in model.named_buffers() if n in statistics)



def test_validation_with_an_enormous_kl_reports_an_infinite_bound_not_a_traceback(tiny_txt, tmp_path):
    from textvae.config import Config
    from textvae.data.batching import encode_examples
    from textvae.data.corpus import read_split
    from textvae.models.registry import create_model
    from textvae.training.environment import Environment
    from textvae.training.trainer import Trainer

    config = Config.from_dict({"model": {"name": "embed", "latent_size": 4}, "data": {"vocab_size": 300},
                               "train": {"batch_size": 8, "warmup_steps": 0, "precision": "fp32"}})
    examples = read_split(tiny_txt, "train").examples
    model = create_model(config, [e.target for e in examples])
    forward = model.forward

    def huge_kl(batch, beta=1.0):  # what BN over the log-variances gave early in annealing: 19,000 nats
        out = forward(batch, beta)
        out.kl = out.kl + 1e6
        return out

    model.forward = huge_kl
    encoded, _ = encode_examples(examples[:16], model.tokenizer, 32, 16, "truncate")
    trainer = Trainer(model, config.train, encoded, encoded, tmp_path, Environment(torch.device("cpu"), bf16=False))
    record = trainer.validate()
    assert record["ppl_bound"] == math.inf
    logged = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert logged["ppl_bound"] is None


@pytest.mark.slow
def test_resume_accepts_a_run_made_before_an_option_existed(tiny_txt, tmp_path):
    import yaml

    from textvae.models.registry import load_model

    run, args = _checkpointed_run(tiny_txt, tmp_path, steps="4")
    straight = tmp_path / "straight"
    assert main([*args[:2], str(straight), *args[3:]]) == 0
    child = multiprocessing.get_context("spawn").Process(target=_train_and_die, args=(args, 3))
    child.start()
    child.join(timeout=900)
    assert child.exitcode == -signal.SIGKILL
    meta = yaml.safe_load((run / "config.yaml").read_text())
    del meta["run"]["train"]["max_bad_steps"]  # as written by an older textvae
    del meta["run"]["backbone"]["adapter"]
    (run / "config.yaml").write_text(yaml.safe_dump(meta))
    assert main([*args, "--resume"]) == 0
    # the missing options took their defaults, so the run goes on as the uninterrupted one did
    _, config = load_model(run)
    assert config.train.max_bad_steps == 10 and config.backbone.adapter == "none"
    assert _losses(run) == _losses(straight)
    resumed, reference = _weights(run), _weights(straight)
    assert resumed.keys() == reference.keys() and all(torch.equal(resumed[n], reference[n]) for n in reference)


@pytest.mark.parametrize("native", [True, False])
def test_precision_auto_takes_bf16_only_where_it_is_native_and_asking_for_emulated_bf16_warns(native, monkeypatch, capsys):
    from textvae.training import environment

    monkeypatch.setattr(environment, "_cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert environment.resolve_bf16("auto", cpu) is native
    assert environment.resolve_bf16("fp32", cpu) is False
    assert capsys.readouterr().err == ""
    assert environment.resolve_bf16("bf16", cpu) is True  # kept as asked
    assert ("emulated" in capsys.readouterr().err) is not native
