"""The single-latent models (embed, memory, softmax, optimus, norec): each trains, saves,
reloads and evaluates to the same numbers on both backbone families; the CLI end to end."""

import json

import pytest
import torch

from conftest import demo_lines, tiny_backbone, uncached_greedy
from textvae.cli import main
from textvae.config import Config
from textvae.data.batching import collate, encode_examples
from textvae.data.corpus import Example
from textvae.evaluation.likelihood import evaluate_likelihood
from textvae.models.registry import load_model, model_class, model_config, save_model
from textvae.training.environment import Environment
from textvae.training.trainer import Trainer

CASES = [("embed", "gpt2"), ("memory", "gpt2"), ("memory", "llama"), ("softmax", "llama"),
         ("optimus", "gpt2"), ("optimus", "llama"), ("norec", "gpt2")]


def _encoded(tokenizer, split, count):
    examples = [Example(text) for text in demo_lines(split, count)]
    return encode_examples(examples, tokenizer, 48, 16, "truncate")[0]


@pytest.mark.parametrize(("name", "family"), CASES)
def test_model_trains_saves_reloads_and_evaluates_the_same(name, family, tiny_tokenizer, tmp_path):
    config = Config.from_dict({
        "model": {"name": name, "latent_size": 8},
        "train": {"batch_size": 16, "lr": 3e-3, "warmup_steps": 0, "max_steps": 24, "log_every": 4,
                  "precision": "fp32", "checkpoint_every": 100},
    })
    torch.manual_seed(0)
    model = model_class(name)(tiny_backbone(family, vocab=tiny_tokenizer.vocab_size), tiny_tokenizer, model_config(config))
    train, valid = _encoded(tiny_tokenizer, "train", 96), _encoded(tiny_tokenizer, "valid", 12)
    trainer = Trainer(model, config.train, train, valid, tmp_path, Environment(torch.device("cpu"), bf16=False))
    before = trainer.validate()["elbo"]
    after = trainer.train()["elbo"]
    assert after < before - 20  # nats per example on held-out data

    save_model(model, tmp_path / "saved", config.to_dict())
    reloaded, _ = load_model(tmp_path / "saved")
    assert type(reloaded) is type(model)
    first = evaluate_likelihood(model, valid, batch_size=8, iw_samples=6)
    again = evaluate_likelihood(reloaded, valid, batch_size=8, iw_samples=6)
    assert first == again
    means = {"ppl", "nll", "elbo", "rec", "kl", "kl_layer_mean", "elbo_layer_mean", "ppl_layer_mean"}
    assert set(first) == means | {f"{key}_stderr" for key in means} | {
        "mi", "au", "mi_minibatch", "mi_minibatch_size", "tokens", "examples"}
    for key in ("kl", "elbo", "ppl"):  # one latent: the papers' layer means are the true values
        assert first[f"{key}_layer_mean"] == pytest.approx(first[key], rel=1e-9)
    # the IW bound is never looser than the ELBO in expectation; both are estimates (one
    # posterior sample per example for the ELBO), so allow their noise on a dozen examples
    assert first["nll"] <= first["elbo"] + 1.0
    assert first["kl"] > 0 and 0 <= first["au"] <= 8


def _randomise_latent_maps(model, std=0.5):
    """The latent maps start at zero (the bare backbone); give them weight."""
    with torch.no_grad():
        for name in ("latent_to_embedding", "latent_to_memory", "latent_to_head"):
            if hasattr(model, name):
                torch.nn.init.normal_(getattr(model, name).weight, std=std)


def test_decoder_starts_as_the_backbone_and_every_injection_point_carries_z(tiny_tokenizer):
    batch = collate(_encoded(tiny_tokenizer, "train", 4), tiny_tokenizer.pad_id)
    bare = tiny_backbone("llama", vocab=tiny_tokenizer.vocab_size)
    with torch.no_grad():
        bare_hidden = bare(batch.input_ids, batch.attention_mask).hidden
    for name in ("embed", "memory", "softmax", "optimus"):
        config = Config.from_dict({"model": {"name": name, "latent_size": 8}})
        model = model_class(name)(tiny_backbone("llama", vocab=tiny_tokenizer.vocab_size), tiny_tokenizer, model_config(config)).eval()
        z = torch.randn(4, 8)
        with torch.no_grad():
            if "memory" not in model.injection_points:  # a zero memory slot still takes attention
                hidden = model.backbone(batch.input_ids, batch.attention_mask, injection=model.injection(z)).hidden
                torch.testing.assert_close(hidden, bare_hidden, rtol=0, atol=1e-6)
            _randomise_latent_maps(model)
            assert not torch.allclose(model.decoder_nll(batch, z), model.decoder_nll(batch, -z)), name


@pytest.mark.slow
def test_vae_cli_trains_with_tricks_evaluates_interpolates_and_reconstructs(tiny_txt, tmp_path, capsys):
    run = tmp_path / "run"
    sets = ["data.max_length=32", "data.vocab_size=400", "train.batch_size=16", "train.log_every=2",
            "train.precision=fp32", "kl.schedule=cyclical", "kl.period_epochs=1", "model.bow_weight=0.5",
            "model.mean_bn_gamma=0.8", "model.latent_size=16"]
    args = ["train", "--model", "optimus", "--data", str(tiny_txt), "--out", str(run), "--max-steps", "10"]
    assert main([*args, *[part for item in sets for part in ("--set", item)]]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert {"rec", "kl", "beta", "bow"} <= set(train[0])
    assert [r["beta"] for r in train][:2] == [1e-5, 1e-5]  # 10 steps per epoch: low for the first 5
    assert train[-1]["beta"] == 1.0
    capsys.readouterr()

    assert main(["evaluate", str(run), "--iw-samples", "4", "--au-delta", "0.2", "--precision", "bf16", "--json", str(tmp_path / "m.json"),
                 "--generate", "6", "--metrics", "bleu,self_bleu,dist_2", "--samples-out", str(tmp_path / "samples.txt")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert {"ppl", "nll", "elbo", "kl", "mi", "au", "tokens", "examples", "bleu", "self_bleu", "dist_2"} <= set(metrics)
    assert len((tmp_path / "samples.txt").read_text().splitlines()) == 6 and 0 <= metrics["bleu"] <= 1
    assert metrics["nll"] <= metrics["elbo"] + 1.0  # both estimates; see the model tests

    capsys.readouterr()
    assert main(["interpolate", str(run), "a man is sleeping .", "two dogs play outside .", "--steps", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["0.00", "0.33", "0.67", "1.00"]

    (tmp_path / "texts.txt").write_text("a man is sleeping .\ntwo dogs play outside .\n")
    for latent in ("mean", "sample"):
        assert main(["generate", str(run), "--reconstruct", str(tmp_path / "texts.txt"), "--latent", latent,
                     "--decoding", "greedy", "--max-new-tokens", "12"]) == 0
        assert len(capsys.readouterr().out.splitlines()) == 2

    assert main(["generate", str(run), "--num", "3", "--decoding", "sample", "--max-new-tokens", "12"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3  # latents drawn from the prior

    assert main(["interpolate", str(run), "a", "b", "--steps", "1"]) == 2
    assert "--steps must be >= 2" in capsys.readouterr().err
    assert main(["train", "--model", "embed", "--data", str(tiny_txt), "--out", str(tmp_path / "x"), "--set", "kl.schedule=wavy"]) == 2
    assert "kl.schedule must be" in capsys.readouterr().err
    assert main(["train", "--model", "embed", "--data", str(tiny_txt), "--out", str(tmp_path / "x"), "--set", "model.latent_size=0"]) == 2
    assert "model.latent_size" in capsys.readouterr().err


@pytest.mark.parametrize("family", ("gpt2", "llama"))
@pytest.mark.parametrize("name", ("embed", "memory", "softmax", "optimus"))
def test_cached_decoding_with_a_latent_equals_full_recomputation(name, family, tiny_tokenizer):
    """The KV-cached loop (memory pre-filled in the cache, offsets on every new token) picks
    the same greedy tokens as re-running the whole prefix with z injected at every step."""
    from textvae.generation.decode import DecodingConfig, decode

    config = Config.from_dict({"model": {"name": name, "latent_size": 8}})
    torch.manual_seed(1)
    model = model_class(name)(tiny_backbone(family, vocab=tiny_tokenizer.vocab_size), tiny_tokenizer, model_config(config)).eval()
    _randomise_latent_maps(model, std=2.0)  # a latent strong enough to steer the tokens
    z = torch.randn(3, 8)
    prompts = [[tiny_tokenizer.bos_id]] * 3
    cached = decode(model, prompts, z, DecodingConfig(strategy="greedy", max_new_tokens=10))
    for row in range(3):
        assert cached[row] == uncached_greedy(model, z[row : row + 1], len(cached[row]))
    assert len({tuple(row) for row in cached}) > 1  # different latents, different texts
    beams = decode(model, prompts, z, DecodingConfig(strategy="beam", num_beams=3, max_new_tokens=10))
    assert len(beams) == 3


def test_separate_encoder_has_its_own_weights_and_pooling_ignores_padding(tiny_tokenizer):
    from textvae.models.encoder import TextEncoder

    backbone = tiny_backbone("gpt2", vocab=tiny_tokenizer.vocab_size)
    shared = TextEncoder(backbone, layers=[1, 2])
    separate = TextEncoder(backbone, layers=[2], share=False)
    assert not any(name.startswith("own_backbone") for name, _ in shared.named_parameters())
    assert any(name.startswith("own_backbone") for name, _ in separate.named_parameters())
    assert separate.own_backbone.causal_lm.transformer.h[0].attn.c_attn.weight is not backbone.layers[0].attn.c_attn.weight
    ids = torch.tensor([[1, 40, 41, 42, 2, 0], [1, 50, 51, 2, 0, 0]])
    mask = (torch.arange(6) < torch.tensor([[5], [4]])).long()
    with torch.no_grad():
        pooled = shared(backbone, ids, mask)
        assert pooled.shape == (2, 2, 32)
        other_padding = shared(backbone, ids.masked_fill(mask == 0, 77), mask)
        torch.testing.assert_close(other_padding, pooled)  # pad tokens are neither read nor pooled
        later_token = ids.clone()
        later_token[0, 3] = 60
        changed = shared(backbone, later_token, mask)  # a real token changes its own row only
        assert not torch.allclose(changed[0], pooled[0]) and torch.allclose(changed[1], pooled[1])
        torch.testing.assert_close(separate(backbone, ids, mask)[:, 0], pooled[:, 1])  # same weights at the start


def test_softmax_log_weights_shortcut_equals_the_full_decoder(tiny_tokenizer):
    """`softmax` runs the body once for all k samples; it must equal k full decoder passes."""
    config = Config.from_dict({"model": {"name": "softmax", "latent_size": 8}})
    model = model_class("softmax")(tiny_backbone("gpt2", vocab=tiny_tokenizer.vocab_size), tiny_tokenizer, model_config(config)).eval()
    batch = collate(_encoded(tiny_tokenizer, "train", 3), tiny_tokenizer.pad_id)
    with torch.no_grad():
        torch.manual_seed(0)
        shortcut = model.log_weights(batch, 4)
        torch.manual_seed(0)
        posterior = model.posterior(batch)
        z = posterior.rsample(4)
        full = torch.stack([-model.decoder_nll(batch, z[:, i]) for i in range(4)], 1)
        full = full + model.prior(batch).log_prob(z) - posterior.log_prob(z)
    torch.testing.assert_close(shortcut, full, rtol=1e-5, atol=1e-4)
