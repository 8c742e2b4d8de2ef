"""DELLA: identity fusion leaves the backbone unchanged, the chain densities and KL are
exact, every ablation trains and evaluates, cached decoding matches recomputation."""

import json

import pytest
import torch

from conftest import FAMILIES, demo_lines, tiny_backbone, uncached_greedy
from textvae.backbone import masks
from textvae.config import Config
from textvae.data.batching import collate, encode_examples
from textvae.data.corpus import Example
from textvae.evaluation.likelihood import evaluate_likelihood
from textvae.generation.decode import DecodingConfig, decode
from textvae.models.della import Della, DellaConfig, LowRankTensorFusion, ProductOfSumsFusion
from textvae.models.registry import load_model, model_config, save_model
from textvae.training.environment import Environment
from textvae.training.trainer import Trainer


def _batch(tokenizer, count=6, split="train"):
    encoded, _ = encode_examples([Example(t) for t in demo_lines(split, count)], tokenizer, 48, 16, "truncate")
    return encoded, collate(encoded, tokenizer.pad_id)


def _della(tokenizer, family="gpt2", **options):
    return Della(tiny_backbone(family, vocab=tokenizer.vocab_size), tokenizer, DellaConfig(latent_size=6, **options))


def _with_strong_fusions(model):
    """Random fusion weights large enough that z visibly changes the decoder (the released
    normal(0, 0.02) initialisation damps the values ~100x on a 32-wide backbone)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".fusion." in name:
                parameter.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fusion", ({"fusion": "ltp"}, {"fusion": "add"}, {"ltp_form": "paper"}), ids=lambda o: str(o))
def test_identity_initialised_fusion_leaves_the_backbone_logits_unchanged(family, fusion, tiny_tokenizer):
    _, batch = _batch(tiny_tokenizer)
    bare = tiny_backbone(family, vocab=tiny_tokenizer.vocab_size)
    with torch.no_grad():
        expected = bare.logits(bare(batch.input_ids, batch.attention_mask).hidden)
        model = _della(tiny_tokenizer, family, **fusion).eval()
        z = model.sample_prior_latent([[1]] * batch.size, "cpu") * 3
        hidden = model.backbone(batch.input_ids, batch.attention_mask, injection=model.injection(z)).hidden
        torch.testing.assert_close(model.backbone.logits(hidden), expected, rtol=0, atol=1e-5)
        form = {} if fusion == {"fusion": "add"} else fusion  # -LTP's shift starts at zero either way
        random = _della(tiny_tokenizer, family, ltp_init="random", **form).eval()  # the released initialisation
        hidden = random.backbone(batch.input_ids, batch.attention_mask, injection=random.injection(z)).hidden
        assert (random.backbone.logits(hidden) - expected).abs().max() > 1e-2


def test_low_rank_fusion_matches_its_definition_for_long_and_short_inputs():
    """v' = sum_j (U_j [v; 1]) * (V_j [z; 1]), by both the per-example-matrix and direct paths."""
    torch.manual_seed(0)
    fusion = LowRankTensorFusion(value_size=5, latent_size=3, rank=2, init="random")
    z = torch.randn(2, 3)
    gates = fusion.gates(z).view(2, 2, 5)
    for length in (1, 7):  # 1 <= rank: direct path; 7 > rank: per-example matrix
        values = torch.randn(2, length, 5)
        expected = sum(
            (values @ fusion.value_maps[j].T + fusion.value_bias[j]) * gates[:, j, None] for j in range(2)
        )
        torch.testing.assert_close(fusion(values, z), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fusion(values, fusion.prepare(z)), expected, rtol=1e-5, atol=1e-5)


def test_paper_form_is_a_product_of_two_sums():
    """Eq. 9: v' = (sum_j W_v^j v + b_v^j) * (sum_j W_z^j z + b_z^j), for decoding's prepared gate too."""
    torch.manual_seed(0)
    fusion = ProductOfSumsFusion(value_size=5, latent_size=3, rank=3, init="random")
    with torch.no_grad():
        for parameter in (fusion.value_bias, fusion.gate_bias):
            parameter.normal_()
    z, values = torch.randn(2, 3), torch.randn(2, 7, 5)
    value_sum = sum(values @ fusion.value_maps[j].T + fusion.value_bias[j] for j in range(3))
    gate_sum = sum(z @ fusion.gate_maps[j].T + fusion.gate_bias[j] for j in range(3))
    expected = value_sum * gate_sum[:, None]
    torch.testing.assert_close(fusion(values, z), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fusion(values[:, :1], fusion.prepare(z)), expected[:, :1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", (LowRankTensorFusion, ProductOfSumsFusion))
def test_random_init_is_the_released_one(form):
    torch.manual_seed(0)
    fusion = form(value_size=64, latent_size=32, rank=4, init="random")
    for name, parameter in fusion.named_parameters():
        if "bias" in name:
            assert torch.equal(parameter, torch.zeros_like(parameter)), name
        else:
            assert float(parameter.detach().mean()) == pytest.approx(0.0, abs=2e-3), name
            assert float(parameter.detach().std()) == pytest.approx(0.02, rel=0.05), name


def test_pooling_reads_the_first_token_or_the_mean_of_the_real_positions():
    from textvae.models.encoder import make_pooling

    hidden = torch.randn(2, 3, 5, 4)  # [B, layers, T, H]
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])  # right and left padding
    first = make_pooling("first", 4, 3)(hidden, mask)
    torch.testing.assert_close(first, torch.stack([hidden[0, :, 0], hidden[1, :, 2]]))
    mean = make_pooling("mean", 4, 3)(hidden, mask)
    torch.testing.assert_close(mean, torch.stack([hidden[0, :, :3].mean(1), hidden[1, :, 2:].mean(1)]))
    assert list(make_pooling("first", 4, 3).parameters()) == []


def test_della_with_first_token_pooling_reads_the_bos_state(tiny_tokenizer):
    _, batch = _batch(tiny_tokenizer, 3)
    model = _della(tiny_tokenizer, pooling="first").eval()
    with torch.no_grad():
        states = model.encoder.states(model.backbone, batch.input_ids, masks.bidirectional(batch.attention_mask))
        pooled = model.encode(batch)[0]
    torch.testing.assert_close(pooled, states[:, :, 0])  # right-padded: position 0 is BOS


@pytest.mark.parametrize("independent", (False, True))
def test_log_weights_sum_the_layer_densities_along_the_sampled_chain(independent, tiny_tokenizer):
    _, batch = _batch(tiny_tokenizer, 3)
    model = _della(tiny_tokenizer, independent=independent).eval()
    with torch.no_grad():
        torch.manual_seed(5)
        weights = model.log_weights(batch, 4)
        torch.manual_seed(5)
        posterior, prior = model.posterior(batch), model.prior(batch)
        z = posterior.rsample(4)  # [B, 4, nP]: the same draws
        chunks = z.split(6, dim=-1)
        assert len(chunks) == 2
        log_q = log_p = 0.0
        for (q_layer, part), (p_layer, _) in zip(posterior.layers_along(z), prior.layers_along(z)):
            log_q = log_q + q_layer.log_prob(part)
            log_p = log_p + p_layer.log_prob(part)
        if not independent:  # the second layer's prior depends on z_1
            assert not torch.allclose(prior.layers_along(z)[1][0].mean, torch.zeros(1))
        rec = torch.stack([model.decoder_nll(batch, z[:, i]) for i in range(4)], dim=1)
        torch.testing.assert_close(weights, -rec + log_p - log_q, rtol=1e-5, atol=1e-3)


def test_summed_kl_equals_a_monte_carlo_estimate_of_the_chain_kl(tiny_tokenizer):
    """E_q[sum_l KL(q(z_l|z_<l,x) || p(z_l|z_<l))] = KL(q(z|x) || p(z)) of the whole chain."""
    _, batch = _batch(tiny_tokenizer, 3)
    model = _della(tiny_tokenizer).eval()
    with torch.no_grad():
        for module in model.latents.modules():  # a chain whose layers depend strongly on each other
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(4)
        torch.manual_seed(0)
        posterior, prior = model.posterior(batch), model.prior(batch)
        z = posterior.rsample(40_000)
        monte_carlo = (posterior.log_prob(z) - prior.log_prob(z)).mean(1)
        layer_kls = [q.kl(p) for (q, _), (p, _) in zip(posterior.layers_along(z), prior.layers_along(z))]
        analytic = sum(kl if kl.dim() == 2 else kl[:, None] for kl in layer_kls).mean(1)  # layer 1: [B]
        torch.manual_seed(1)
        out = model(batch)  # the training objective's KL is this sum at its own sampled chain
        torch.manual_seed(1)
        z = posterior.rsample()
        at_z = sum(q.kl(p) for (q, _), (p, _) in zip(posterior.layers_along(z), prior.layers_along(z)))
    assert (monte_carlo > 1).all()
    torch.testing.assert_close(analytic, monte_carlo, rtol=0.03, atol=0.05)
    torch.testing.assert_close(out.z, z)
    torch.testing.assert_close(out.kl, at_z)
    torch.testing.assert_close(out.kl_groups.sum(1), out.kl)


ABLATIONS = [
    {},
    {"fusion": "add"},
    {"independent": True},
    {"layerwise": False},
    {"kl_layers": "first"},
    {"kl_layers": "last", "kl_reduction": "mean"},
    {"latent_begin": 2},
    {"latent_end": 1},
    {"ltp_init": "random", "rank": 2},
    {"ltp_form": "paper", "ltp_init": "random", "pooling": "first", "state_norm": False},
    {"pooling": "mean"},
    {"kl_threshold": 0.1, "bow_weight": 0.5, "share_encoder": False},
]


@pytest.mark.parametrize("options", ABLATIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "della")
def test_every_ablation_trains_saves_reloads_and_evaluates(options, tiny_tokenizer, tmp_path):
    config = Config.from_dict({
        "model": {"name": "della", "latent_size": 6, **options},
        "train": {"batch_size": 16, "lr": 3e-3, "warmup_steps": 0, "max_steps": 12, "log_every": 4,
                  "precision": "fp32", "checkpoint_every": 100},
    })
    torch.manual_seed(0)
    family = "llama" if options.get("independent") else "gpt2"
    model = Della(tiny_backbone(family, vocab=tiny_tokenizer.vocab_size), tiny_tokenizer, model_config(config))
    train, _ = _batch(tiny_tokenizer, 64)
    valid, _ = _batch(tiny_tokenizer, 10, "valid")
    trainer = Trainer(model, config.train, train, valid, tmp_path, Environment(torch.device("cpu"), bf16=False))
    before = trainer.validate()["elbo"]
    assert trainer.train()["elbo"] < before - 10
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in logged if r["split"] == "train"][-1]
    per_layer = [last[f"kl_layer_{layer}"] for layer in model.inference_layers]
    assert sum(per_layer) == pytest.approx(last["kl"], rel=1e-4)  # the logged KL is their sum
    save_model(model, tmp_path / "saved", config.to_dict())
    reloaded, _ = load_model(tmp_path / "saved")
    first = evaluate_likelihood(model, valid, batch_size=5, iw_samples=4)
    assert first == evaluate_likelihood(reloaded, valid, batch_size=5, iw_samples=4)
    layers = len(model.inference_layers)
    assert len(first["kl_groups"]) == layers if layers > 1 else "kl_groups" not in first
    # the IW bound is never looser than the ELBO in expectation; both are estimates (one
    # posterior sample per example for the ELBO), so allow their noise on a dozen examples
    assert first["nll"] <= first["elbo"] + 1.0


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decoding_with_value_fusion_equals_full_recomputation(family, tiny_tokenizer):
    torch.manual_seed(2)
    model = _with_strong_fusions(_della(tiny_tokenizer, family)).eval()
    z = model.sample_prior_latent([[1]] * 3, "cpu")
    prompts = [[tiny_tokenizer.bos_id]] * 3
    cached = decode(model, prompts, z, DecodingConfig(strategy="greedy", max_new_tokens=8))
    for row in range(3):
        assert cached[row] == uncached_greedy(model, z[row : row + 1], len(cached[row]))


def _conditional(tokenizer, tiny_jsonl):
    from textvae.data.corpus import read_split

    examples = read_split(tiny_jsonl, "train").examples[:4]
    encoded, _ = encode_examples(examples, tokenizer, 64, 16, "truncate")
    torch.manual_seed(3)
    model = _with_strong_fusions(_della(tokenizer, "llama", conditional=True)).eval()
    return model, examples, encoded, collate(encoded, tokenizer.pad_id)


def test_conditional_della_reads_the_source_only_through_c_and_scores_only_targets(tiny_tokenizer, tiny_jsonl):
    model, examples, encoded, batch = _conditional(tiny_tokenizer, tiny_jsonl)
    with torch.no_grad():
        text, condition = model.encode(batch)
        changed = batch.input_ids.clone()
        last_target = batch.attention_mask.sum(1) - 2  # the token before EOS
        changed[torch.arange(4), last_target] = 7
        from textvae.data.batching import Batch

        other = Batch(changed, batch.attention_mask, batch.target_mask)
        text2, condition2 = model.encode(other)
        torch.testing.assert_close(condition2, condition)  # c never sees the target
        assert not torch.allclose(text2, text)
        # the prior depends on the source: different sources, different prior means
        prior_means = model.prior(batch).mean
        assert (prior_means[0] - prior_means[1]).abs().max() > 1e-3
        # rec counts target tokens (and EOS) only
        z = model.posterior(batch).rsample()
        hidden = model.backbone(batch.input_ids, batch.attention_mask, injection=model.injection(z)).hidden
        logits = model.backbone.logits(hidden[:, :-1])
        token_nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch.input_ids[:, 1:], reduction="none")
        expected = (token_nll * batch.target_mask[:, 1:]).sum(1)
        torch.testing.assert_close(model.decoder_nll(batch, z), expected, rtol=1e-5, atol=1e-4)
    for row, item in enumerate(encoded):  # [BOS] source [SEP] is never a target
        assert item.prefix_length > 2 and not batch.target_mask[row, : item.prefix_length].any()
        assert batch.input_ids[row, item.prefix_length - 1] == tiny_tokenizer.sep_id


def test_conditional_della_samples_differ_for_the_same_prompt(tiny_tokenizer, tiny_jsonl):
    from textvae.generation.decode import generate_texts

    model, examples, _, _ = _conditional(tiny_tokenizer, tiny_jsonl)
    config = DecodingConfig(strategy="greedy", max_new_tokens=10)  # only the latent varies
    texts = generate_texts(model, 4, config, seed=0, sources=[examples[0].source, examples[1].source])
    assert len(texts) == 8
    assert len(set(texts[:4])) > 1 and len(set(texts[4:])) > 1


@pytest.mark.slow
def test_cli_makes_della_conditional_on_jsonl_data_and_generates_per_prompt(tiny_jsonl, tmp_path, capsys):
    from textvae.cli import main

    run = tmp_path / "run"
    sets = ["data.max_length=40", "data.max_source_length=16", "data.vocab_size=400", "train.batch_size=8", "train.precision=fp32", "model.latent_size=4"]
    args = ["train", "--model", "della", "--data", str(tiny_jsonl), "--out", str(run), "--max-steps", "3",
            "--backbone", "llama-tiny", *[part for item in sets for part in ("--set", item)]]
    assert main(args) == 0
    model, config = load_model(run)
    assert model.conditional and config.model["conditional"] is True
    (tmp_path / "prompts.txt").write_text("a man is sleeping .\ntwo dogs run .\n")
    capsys.readouterr()
    assert main(["generate", str(run), "--prompts", str(tmp_path / "prompts.txt"), "--num", "2", "--max-new-tokens", "6"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 4
    assert main([*args[:6], str(tmp_path / "txt-run"), *args[7:], "--set", "model.conditional=true", "--data", str(tmp_path)]) == 2


def test_single_latent_ablation_fuses_one_latent_into_every_layer(tiny_tokenizer):
    model = _della(tiny_tokenizer, layerwise=False)
    assert model.latent_group_sizes == [6] and model.inference_layers == [2] and model.latent_layers == [1, 2]
    z = torch.randn(3, 6)
    layers = model.injection(z).value_latents
    assert len(layers) == 2 and all(torch.equal(layer, z) for layer in layers)
    _, batch = _batch(tiny_tokenizer, 3)
    assert model.posterior(batch).rsample().shape == (3, 6)


@pytest.mark.slow
def test_evaluate_generates_texts_for_each_source_on_conditional_data(tiny_jsonl, tmp_path):
    from textvae.cli import main

    run = tmp_path / "run"
    sets = ["data.max_length=40", "data.max_source_length=16", "data.vocab_size=400", "train.batch_size=8", "train.precision=fp32", "model.latent_size=4"]
    assert main(["train", "--model", "della", "--data", str(tiny_jsonl), "--out", str(run), "--max-steps", "2",
                 *[part for item in sets for part in ("--set", item)]]) == 0
    out = tmp_path / "m.json"
    assert main(["evaluate", str(run), "--iw-samples", "2", "--generate", "5", "--samples-per-source", "2",
                 "--json", str(out), "--samples-out", str(tmp_path / "s.txt")]) == 0
    metrics = json.loads(out.read_text())
    assert {"bleu_ref", "rouge_1", "rouge_2", "rouge_l", "bertscore", "self_bleu", "jaccard", "dist_1"} <= set(metrics)
    assert metrics["decoding"] == "top-k"  # not a summarization or paraphrase run
    assert len((tmp_path / "s.txt").read_text().splitlines()) == 10


def test_state_norm_keeps_the_posterior_sane_on_a_backbone_with_large_hidden_states(tiny_tokenizer):
    """Pretrained pre-norm backbones carry residual streams of rms 30+ (SmolLM2) below the top
    layer. Raw, they push a fresh posterior's log-variances so far that the initial KL is
    astronomical; layer-normalised (the default) every position's state is unit-scale."""
    _, batch = _batch(tiny_tokenizer)
    kls = {}
    for state_norm in (True, False):
        model = _della(tiny_tokenizer, "llama", state_norm=state_norm)
        with torch.no_grad():
            model.backbone.causal_lm.get_input_embeddings().weight.mul_(3000.0)  # a large residual stream
            states = model.encoder.states(model.backbone, batch.input_ids, masks.bidirectional(batch.attention_mask))
            kls[state_norm] = model(batch).kl.mean().item()
        if state_norm:  # every real position: mean 0, standard deviation 1 over the hidden units
            real = states.transpose(1, 2)[batch.attention_mask.bool()]  # [N, layers, H]
            torch.testing.assert_close(real.mean(-1), torch.zeros(real.shape[:-1]), atol=1e-4, rtol=0)
            torch.testing.assert_close(real.std(-1, unbiased=False), torch.ones(real.shape[:-1]), atol=1e-3, rtol=0)
    assert kls[True] < 2.0  # 12 latent dimensions: as on an ordinary backbone
    assert kls[False] > 1e4 * kls[True]  # raw: the mean term grows with the square of the scale
