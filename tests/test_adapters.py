"""Backbone training modes: LoRA adapters (PEFT) over a frozen base, frozen bottom layers, the
encoder's own adapter over the same base, trainable rows for added tokens, and adapter runs
that store only what they train and rebuild (and check) their base on loading."""

import pytest
import torch
from safetensors.torch import load_file

from conftest import demo_lines, save_hf_folder
from textvae.cli import main
from textvae.config import Config, TrainConfig
from textvae.data.batching import collate, encode_examples
from textvae.data.corpus import Example
from textvae.data.tokenizer import TextTokenizer
from textvae.errors import TextVAEError
from textvae.models.registry import create_model, load_model, save_model
from textvae.training.environment import Environment
from textvae.training.trainer import Trainer

FAST = ["--set", "data.max_length=32", "--set", "train.precision=fp32", "--set", "train.log_every=1",
        "--set", "train.warmup_steps=0", "--set", "train.batch_size=8", "--set", "train.lr=0.01"]
LORA = ["--set", "backbone.adapter=lora", "--set", "backbone.lora_rank=2"]


def _config(name="della", preset="gpt2-tiny", backbone=None, **model_options):
    raw = {"model": {"name": name, **({"latent_size": 4} if name != "lm" else {}), **model_options},
           "backbone": {"spec": preset, **(backbone or {})}, "data": {"vocab_size": 300}, "train": {"seed": 0}}
    return Config.from_dict(raw)


def _batch(model, count=4):
    encoded, _ = encode_examples([Example(t) for t in demo_lines("valid", count)], model.tokenizer, 32, 16, "truncate")
    return collate(encoded, model.tokenizer.pad_id)


def _base_names(model):
    """Parameter names of the Hugging Face base (not LoRA, not what the model adds)."""
    prefix = "backbone.causal_lm."
    return {n for n, _ in model.named_parameters() if n.startswith(prefix) and ".lora_" not in n and ".fusion." not in n}


@pytest.mark.parametrize("preset", ("gpt2-tiny", "llama-tiny"))
def test_lora_freezes_the_base_and_trains_adapters_and_everything_the_vae_adds(preset):
    model = create_model(_config(preset=preset, backbone={"adapter": "lora", "lora_rank": 2}), demo_lines("train", 200))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert not _base_names(model) & set(trainable)  # the base is frozen
    lora = {n: p for n, p in trainable.items() if ".lora_" in n}
    # rank 2 on every target projection of the 4 layers: r (in + out) per projection
    expected = 0
    for name, module in model.backbone.causal_lm.named_modules():
        if hasattr(module, "lora_A"):
            base = module.base_layer
            fan_in, fan_out = (base.weight.shape if preset.startswith("gpt2") else base.weight.shape[::-1])
            expected += 2 * (fan_in + fan_out)
    assert sum(p.numel() for p in lora.values()) == expected > 0
    suffixes = {n.split(".lora_")[0].removesuffix(".projection").split(".")[-1] for n in lora}  # DELLA wraps values
    assert suffixes == ({"c_attn", "c_proj", "c_fc"} if preset.startswith("gpt2")
                        else {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
    added = [n for n in trainable if ".lora_" not in n]
    assert any(".fusion." in n for n in added) and any(n.startswith("latents.") for n in added)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ({"adapter": "lora", "lora_rank": 2}, {"freeze_layers": 2}), ids=("lora", "freeze"))
def test_training_steps_leave_the_frozen_base_unchanged(backbone, tmp_path):
    config = _config(backbone=backbone)
    config.train = TrainConfig(batch_size=8, lr=0.01, warmup_steps=0, max_steps=3, precision="fp32", checkpoint_every=100)
    model = create_model(config, demo_lines("train", 200))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    encoded, _ = encode_examples([Example(t) for t in demo_lines("train", 48)], model.tokenizer, 32, 16, "truncate")
    Trainer(model, config.train, encoded, encoded[:8], tmp_path, Environment(torch.device("cpu"), bf16=False)).train()
    after = dict(model.named_parameters())
    frozen = [n for n, p in after.items() if not p.requires_grad]
    assert frozen and all(torch.equal(after[n], before[n]) for n in frozen)
    moved = [n for n, p in after.items() if p.requires_grad and not torch.equal(p, before[n])]
    assert any(".fusion." in n for n in moved)
    assert any(".lora_B." in n for n in moved) if "adapter" in backbone else any(".h.3." in n for n in moved)
    save_model(model, tmp_path / "saved", config.to_dict())  # what it trained, and the base it trained over
    reloaded, _ = load_model(tmp_path / "saved")
    batch = _batch(model)
    with torch.no_grad():
        torch.manual_seed(1)
        trained = model.eval().log_weights(batch, 3)
        torch.manual_seed(1)
        again = reloaded.log_weights(batch, 3)
    torch.testing.assert_close(again, trained, rtol=0, atol=0)


@pytest.mark.slow
def test_adapter_run_stores_only_trained_weights_and_reloads_equal(tiny_txt, tmp_path):
    full, adapter = tmp_path / "full", tmp_path / "adapter"
    common = ["train", "--model", "della", "--data", str(tiny_txt), "--max-steps", "2", *FAST, "--set", "model.latent_size=4"]
    assert main([*common, "--out", str(full)]) == 0
    assert main([*common, "--out", str(adapter), *LORA]) == 0
    stored = load_file(str(adapter / "model.safetensors"))
    assert not any(name in stored for name in _base_names(load_model(adapter)[0]))
    assert (adapter / "model.safetensors").stat().st_size < 0.5 * (full / "model.safetensors").stat().st_size
    model, _ = load_model(adapter)
    batch = _batch(model)
    torch.manual_seed(0)
    again, _ = load_model(adapter)
    with torch.no_grad():
        torch.manual_seed(1)
        first = model.log_weights(batch, 3)
        torch.manual_seed(1)
        second = again.log_weights(batch, 3)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert main(["evaluate", str(adapter), "--iw-samples", "2"]) == 0
    assert main(["generate", str(adapter), "--num", "2"]) == 0


@pytest.mark.parametrize("family", ("gpt2", "llama"))
def test_pretrained_folder_adapter_run_checks_its_base_on_loading(family, tiny_txt, tmp_path, capsys):
    bpe = TextTokenizer.train_bpe(demo_lines("train", 300), vocab_size=300)
    folder = tmp_path / "hf"
    original = save_hf_folder(folder, family, bpe, missing_rows=3)
    run = tmp_path / "run"
    assert main(["train", "--model", "trace-r", "--backbone", str(folder), "--data", str(tiny_txt), "--out", str(run),
                 "--max-steps", "2", *FAST, *LORA, "--set", "model.latent_size=4"]) == 0
    model, _ = load_model(run)
    rows = model.backbone.new_tokens
    assert rows is not None and rows.first == original.config.vocab_size == bpe.vocab_size - 3
    base_rows = model.backbone.causal_lm.get_input_embeddings().weight
    assert not torch.equal(rows.input_rows, base_rows[rows.first:])  # the new rows trained
    with torch.no_grad():  # the base changes under the run: loading refuses it in one line
        original.get_input_embeddings().weight[5] += 1.0
    original.save_pretrained(folder)
    capsys.readouterr()
    assert main(["evaluate", str(run), "--iw-samples", "1"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "fingerprint" in error and str(folder) in error


def test_a_frozen_base_with_the_same_weights_but_another_config_is_refused_on_loading(tiny_txt, tmp_path, capsys):
    bpe = TextTokenizer.train_bpe(demo_lines("train", 300), vocab_size=300)
    folder = tmp_path / "hf"
    original = save_hf_folder(folder, "llama", bpe)
    run = tmp_path / "run"
    assert main(["train", "--model", "embed", "--backbone", str(folder), "--data", str(tiny_txt), "--out", str(run),
                 "--max-steps", "1", *FAST, *LORA, "--set", "model.latent_size=4"]) == 0
    load_model(run)  # the same folder, moved or not: loads
    original.config.rms_norm_eps = 1e-2  # the same weights compute otherwise
    original.save_pretrained(folder)
    capsys.readouterr()
    assert main(["evaluate", str(run), "--iw-samples", "1"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "rms_norm_eps: 1e-06 in the run, 0.01 now" in error, error


def test_freeze_layers_freezes_embeddings_and_the_bottom_layers_only():
    model = create_model(_config(backbone={"freeze_layers": 2}), demo_lines("train", 200))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert any("wte" in n for n in frozen) and any("wpe" in n for n in frozen)
    for layer in range(4):
        names = {n for n, _ in model.named_parameters() if f".h.{layer}." in n and ".fusion." not in n}
        assert (names <= frozen) if layer < 2 else not (names & frozen), layer
    with_lora = create_model(_config(backbone={"freeze_layers": 3, "adapter": "lora"}), demo_lines("train", 200))
    adapted = {n.split(".h.")[1].split(".")[0] for n, _ in with_lora.named_parameters() if ".lora_" in n}
    assert adapted == {"3"}  # no adapter below the frozen layers


def test_frozen_bottom_layers_get_no_backward_pass_in_the_lm():
    model = create_model(_config(name="lm", backbone={"freeze_layers": 3}), demo_lines("train", 200))
    needs_grad = []
    for layer in model.backbone.layers:
        layer.register_forward_hook(lambda module, args, out: needs_grad.append(out[0].requires_grad))
    model(_batch(model)).loss.backward()
    assert needs_grad == [False, False, False, True]  # autograd's graph starts above the frozen stack


def test_separate_encoder_gets_its_own_adapter_over_the_same_base():
    shared = create_model(_config(backbone={"adapter": "lora"}), demo_lines("train", 200))
    separate = create_model(_config(backbone={"adapter": "lora"}, share_encoder=False), demo_lines("train", 200)).eval()
    count = lambda m, key: sum(p.numel() for n, p in m.named_parameters() if key(n))  # noqa: E731
    assert count(separate, lambda n: ".lora_" not in n) == count(shared, lambda n: ".lora_" not in n)  # no base copy
    assert count(separate, lambda n: ".lora_" in n) == 2 * count(shared, lambda n: ".lora_" in n)
    batch = _batch(separate)
    with torch.no_grad():
        posterior = separate.posterior(batch).mean
        decoder_hidden = separate.backbone(batch.input_ids, batch.attention_mask).hidden
        for name, parameter in separate.named_parameters():
            if ".lora_B.encoder" in name:
                parameter.normal_()
        assert not torch.allclose(separate.posterior(batch).mean, posterior)  # the encoder reads its adapter
        torch.testing.assert_close(separate.backbone(batch.input_ids, batch.attention_mask).hidden, decoder_hidden)
    separate.train()(batch).loss.backward()  # one step trains both adapters
    grads = {n: p.grad for n, p in separate.named_parameters() if ".lora_B." in n}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert {n.split(".lora_B.")[1].split(".")[0] for n in grads} == {"encoder", "decoder"}


@pytest.mark.parametrize(("sets", "message"), [
    ({"adapter": "dora"}, "backbone.adapter"), ({"lora_rank": 0}, "backbone.lora_rank"),
    ({"lora_dropout": 1.5}, "backbone.lora_dropout"), ({"freeze_layers": -1}, "backbone.freeze_layers"),
])
def test_bad_training_modes_are_refused(sets, message):
    with pytest.raises(TextVAEError, match=message):
        _config(backbone=sets).validate()


def test_too_many_frozen_layers_or_unknown_targets_are_refused():
    with pytest.raises(TextVAEError, match="freeze_layers=9"):
        create_model(_config(backbone={"freeze_layers": 9}), demo_lines("train", 100))
    with pytest.raises(TextVAEError, match="match no module"):
        create_model(_config(backbone={"adapter": "lora", "lora_targets": ["nothing"]}), demo_lines("train", 100))


def test_frozen_linear_weights_held_in_bf16_change_no_number_of_a_bf16_step(tmp_path):
    from textvae.training.environment import restore_weights

    config = _config(backbone={"adapter": "lora", "lora_rank": 2})
    config.train = TrainConfig(batch_size=8, warmup_steps=0, max_steps=1, precision="bf16", checkpoint_every=100)
    losses, weights = [], []
    for precast in (True, False):
        torch.manual_seed(0)
        model = create_model(config, demo_lines("train", 200))
        encoded, _ = encode_examples([Example(t) for t in demo_lines("train", 8)], model.tokenizer, 32, 16, "truncate")
        trainer = Trainer(model, config.train, encoded, encoded, tmp_path, Environment(torch.device("cpu"), bf16=True))
        frozen = model.backbone.causal_lm.transformer.h[0].mlp.c_fc.base_layer.weight
        assert frozen.dtype == torch.bfloat16 and model.backbone.causal_lm.transformer.wte.weight.dtype == torch.float32
        if not precast:
            restore_weights(trainer.fp32_frozen_weights)  # autocast casts them at every use instead
        torch.manual_seed(1)
        losses.append(trainer._optimizer_step(list(range(8)), 1.0)[0]["loss"])
        weights.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    assert losses[0] == losses[1]
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])


def test_a_bf16_evaluation_casts_each_weight_once_and_changes_no_number():
    """`bf16_inference` holds every linear weight in bf16 for the pass (autocast would cast
    them at every use in a no-grad pass): the importance weights are those of plain autocast,
    bit for bit, and the weights are float32 again afterwards, also after an error."""
    from textvae.evaluation.likelihood import log_marginals
    from textvae.training.environment import bf16_inference

    torch.manual_seed(0)
    model = create_model(_config(backbone={"adapter": "lora", "lora_rank": 2}), demo_lines("train", 200)).eval()
    batch = _batch(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = log_marginals(model, batch, 6, 3)
    torch.manual_seed(1)
    with bf16_inference(model):
        held = [p.dtype for p in model.parameters()]
        got = log_marginals(model, batch, 6, 3)
    assert held.count(torch.bfloat16) > 10
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    with pytest.raises(RuntimeError, match="inside"), bf16_inference(model):
        raise RuntimeError("inside")
    assert all(p.dtype == torch.float32 and torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_added_lr_trains_what_the_model_adds_at_its_own_rate(tmp_path):
    """`train.added_lr`: DELLA's fusions (wrapped into the backbone), chain and heads get groups
    of their own at added_lr / lr times the schedule's rate; LoRA pairs stay at lr. Without it,
    the optimizer has the two groups checkpoints made before it hold."""
    config = _config(backbone={"adapter": "lora", "lora_rank": 2})
    torch.manual_seed(0)
    model = create_model(config, demo_lines("train", 200))
    added = {id(p) for p in model.added_parameters()}
    names = {n for n, p in model.named_parameters() if id(p) in added}
    assert any(".fusion." in n for n in names) and any(n.startswith("latents.") for n in names)
    assert not any(".lora_" in n for n in names) and not (names & _base_names(model))
    encoded, _ = encode_examples([Example(t) for t in demo_lines("train", 8)], model.tokenizer, 32, 16, "truncate")
    plain = TrainConfig(batch_size=8, warmup_steps=0, max_steps=1, precision="fp32", checkpoint_every=100, lr=1e-3)
    assert len(Trainer(model, plain, encoded, encoded, tmp_path, Environment(torch.device("cpu"), bf16=False)).optimizer.param_groups) == 2
    faster = TrainConfig(**{**plain.__dict__, "added_lr": 1e-2})
    trainer = Trainer(model, faster, encoded, encoded, tmp_path / "run", Environment(torch.device("cpu"), bf16=False))
    lora = next(p for n, p in model.named_parameters() if ".lora_B." in n)  # B (zero at the start) gets the first gradient
    fusion = next(p for n, p in model.named_parameters() if ".fusion.gates.weight" in n)
    before = lora.detach().clone(), fusion.detach().clone()
    trainer.train()
    # Adam's first step moves each weight with a gradient by its rate (|m / sqrt(v)| = 1)
    assert float((lora.detach() - before[0]).abs().max()) == pytest.approx(1e-3, rel=0.02)
    assert float((fusion.detach() - before[1]).abs().max()) == pytest.approx(1e-2, rel=0.02)
    assert sorted(group["lr"] for group in trainer.optimizer.param_groups) == pytest.approx([1e-3, 1e-3, 1e-2, 1e-2])
    with pytest.raises(TextVAEError, match="train.added_lr must be > 0"):
        TrainConfig(added_lr=0.0).validate()


def test_training_returns_the_frozen_weights_in_float32(tmp_path):
    config = _config(name="lm", backbone={"adapter": "lora", "lora_rank": 2})
    config.train = TrainConfig(batch_size=8, warmup_steps=0, max_steps=1, precision="bf16", checkpoint_every=100)
    model = create_model(config, demo_lines("train", 200))
    encoded, _ = encode_examples([Example(t) for t in demo_lines("train", 8)], model.tokenizer, 32, 16, "truncate")
    Trainer(model, config.train, encoded, encoded, tmp_path, Environment(torch.device("cpu"), bf16=True)).train()
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.parametrize(("preset", "name", "share"), [
    ("gpt2-tiny", "della", False), ("llama-tiny", "embed", True), ("llama-tiny", "memory", False), ("gpt2-tiny", "trace-r", True),
])
def test_merged_adapter_scores_as_the_adapters_do_and_puts_every_weight_back(preset, name, share):
    """Inside `merged_adapter` the decoder's LoRA pairs are folded into the base weights (the
    adapters off), the encoder's own adapter still reads the base: the importance weights are
    those of the unmerged model to float rounding, and afterwards every weight and
    requires_grad flag is as before, also after an error."""
    from textvae.evaluation.likelihood import log_marginals

    torch.manual_seed(0)
    model = create_model(_config(name, preset, backbone={"adapter": "lora", "lora_rank": 2}, share_encoder=share),
                         demo_lines("train", 200)).eval()
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if ".lora_B." in parameter_name:  # B starts at zero: a merge of nothing could not fail
                parameter.normal_(std=0.3)
    batch = _batch(model)
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    with torch.no_grad():
        torch.manual_seed(1)
        expected = log_marginals(model, batch, 4, 2)
        torch.manual_seed(1)
        with model.backbone.merged_adapter():
            merged_weights = [n for n, p in model.named_parameters() if not torch.equal(p, before[n][0])]
            got = log_marginals(model, batch, 4, 2)
    assert len(merged_weights) == sum(".lora_A.decoder" in n for n in before)  # one base weight per decoder pair
    for want, have in zip(expected, got):
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-4)
    with pytest.raises(RuntimeError, match="inside"), torch.no_grad(), model.backbone.merged_adapter():
        raise RuntimeError("inside")
    after = {n: (p.detach(), p.requires_grad) for n, p in model.named_parameters()}
    assert all(torch.equal(after[n][0], before[n][0]) and after[n][1] == before[n][1] for n in before)


def _lora_model_with_nonzero_deltas():
    model = create_model(_config(backbone={"adapter": "lora", "lora_rank": 2}), demo_lines("train", 200)).eval()
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if ".lora_B." in parameter_name:  # B starts at zero: a merge would change nothing to see
                parameter.normal_(std=0.3)
    return model


def test_merged_adapter_changes_nothing_where_gradients_flow_under_autocast_or_in_training_mode():
    model = _lora_model_with_nonzero_deltas()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    unchanged = lambda: all(torch.equal(p, weights[n]) for n, p in model.named_parameters())  # noqa: E731
    with torch.no_grad(), model.backbone.merged_adapter():
        assert not unchanged()  # in eval mode without gradients it does merge
    with torch.enable_grad(), model.backbone.merged_adapter():
        assert unchanged()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), model.backbone.merged_adapter():
        assert unchanged()
    model.train()  # LoRA dropout would apply to the adapters' path
    with torch.no_grad(), model.backbone.merged_adapter():
        assert unchanged()


def test_an_interrupt_while_merging_puts_every_weight_back(monkeypatch):
    from textvae.backbone import adapters

    model = _lora_model_with_nonzero_deltas()
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    real = adapters._set_merged

    def half_merged_then_interrupted(merged, on):
        if on:
            real(merged[:1], True)
            raise KeyboardInterrupt
        real(merged, on)

    monkeypatch.setattr(adapters, "_set_merged", half_merged_then_interrupted)
    with pytest.raises(KeyboardInterrupt), torch.no_grad(), model.backbone.merged_adapter():
        pass
    monkeypatch.undo()
    assert all(torch.equal(p, before[n][0]) and p.requires_grad == before[n][1] for n, p in model.named_parameters())
    with torch.no_grad(), model.backbone.merged_adapter():  # and the next merge is not taken for a nested one
        assert any(not torch.equal(p, before[n][0]) for n, p in model.named_parameters())


def test_new_token_rows_give_the_logits_of_the_full_head_with_their_own_columns():
    from conftest import tiny_backbone
    from textvae.backbone.adapters import NewTokenRows

    hf = tiny_backbone("llama").causal_lm  # 97 tokens, the last 3 taken as added ones
    rows = NewTokenRows(hf, first=94)
    own = rows.input_rows if rows.tied else rows.output_rows
    with torch.no_grad():
        own.normal_()
    head = hf.get_output_embeddings()
    hidden = torch.randn(2, 5, head.in_features)
    expected = torch.cat([head(hidden)[..., :94], hidden @ own.T], dim=-1)
    torch.testing.assert_close(rows.logits(hidden, head), expected)


def test_a_rebuilt_backbone_is_float32_whatever_the_default_dtype():
    """Runs are rebuilt from their stored config, then filled with their float32 weights."""
    from conftest import tiny_backbone
    from textvae.backbone.load import rebuild

    stored = tiny_backbone("llama").causal_lm.config.to_dict()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        rebuilt = rebuild(stored, "eager")
    finally:
        torch.set_default_dtype(default)
    assert {p.dtype for p in rebuilt.parameters()} == {torch.float32}
