"""Evaluation extras: standard errors over examples, and the papers' reporting conventions
(latent densities averaged over groups, He et al.'s minibatch MI) beside the true values."""

import math

import pytest
import torch

from conftest import demo_lines, tiny_backbone, tiny_lm
from textvae.data.batching import collate, encode_examples
from textvae.data.corpus import Example
from textvae.evaluation.likelihood import evaluate_likelihood, log_marginals, minibatch_mutual_information
from textvae.latent.gaussian import DiagonalGaussian
from textvae.models.della import Della, DellaConfig


def _encoded(tokenizer, count=20):
    encoded, _ = encode_examples([Example(t) for t in demo_lines("valid", count)], tokenizer, 48, 16, "truncate")
    return encoded


def test_standard_errors_are_those_of_the_per_example_values(tiny_tokenizer):
    model = tiny_lm(tiny_tokenizer)
    data = _encoded(tiny_tokenizer)
    metrics = evaluate_likelihood(model, data, batch_size=7, iw_samples=1)
    batch = collate(data, tiny_tokenizer.pad_id)
    with torch.no_grad():
        nll = model(batch).rec.double()
    tokens = batch.target_mask.sum(1).double()
    assert metrics["nll"] == pytest.approx(float(nll.mean()), rel=1e-6)
    assert metrics["nll_stderr"] == pytest.approx(float(nll.std() / math.sqrt(len(nll))), rel=1e-6)
    # the delta-method error of exp(sum nll / sum tokens) against a bootstrap over examples
    generator = torch.Generator().manual_seed(0)
    draws = torch.randint(len(nll), (4000, len(nll)), generator=generator)
    bootstrap = torch.exp(nll[draws].sum(1) / tokens[draws].sum(1)).std()
    assert metrics["ppl_stderr"] == pytest.approx(float(bootstrap), rel=0.1)


def _calc_mi_reference(mean, log_var):
    """He et al. (2019)'s calc_mi, transcribed from its formula for one minibatch [M, P]."""
    size, dim = mean.shape
    negative_entropy = (-0.5 * dim * math.log(2 * math.pi) - 0.5 * (1 + log_var).sum(-1)).mean()
    z = mean + torch.exp(0.5 * log_var) * torch.randn_like(mean)
    dev = z[:, None] - mean[None]  # [z_i, x_j]
    log_density = -0.5 * (dev**2 / log_var.exp()[None]).sum(-1) - 0.5 * (dim * math.log(2 * math.pi) + log_var.sum(-1)[None])
    log_qz = torch.logsumexp(log_density, dim=1) - math.log(size)
    return float(negative_entropy - log_qz.mean())


def test_minibatch_mi_is_he_et_al_calc_mi_averaged_over_batches():
    torch.manual_seed(0)
    batches = [(torch.randn(6, 3) * 2, torch.randn(6, 3) * 0.3 - 1), (torch.randn(4, 3), torch.randn(4, 3) * 0.3)]
    torch.manual_seed(1)
    ours = minibatch_mutual_information([DiagonalGaussian(m, v) for m, v in batches])
    torch.manual_seed(1)
    reference = [_calc_mi_reference(m, v) for m, v in batches]
    assert ours == pytest.approx((6 * reference[0] + 4 * reference[1]) / 10, rel=1e-5)
    assert ours <= math.log(6) + 1e-6  # an aggregate over M examples caps it at log M


def test_layer_mean_conventions_divide_the_latent_terms_by_the_latent_layers(tiny_tokenizer):
    torch.manual_seed(0)
    model = Della(tiny_backbone("gpt2", vocab=tiny_tokenizer.vocab_size), tiny_tokenizer, DellaConfig(latent_size=4)).eval()
    data = _encoded(tiny_tokenizer, 8)
    batch = collate(data, tiny_tokenizer.pad_id)
    torch.manual_seed(5)
    weights = model.importance_weights(batch, 1)
    torch.manual_seed(5)
    true, layer_mean = log_marginals(model, batch, 1)
    torch.testing.assert_close(true, weights.total[:, 0])
    torch.testing.assert_close(layer_mean, weights.reconstruction[:, 0] + weights.latent[:, 0] / 2)  # 2 layers
    metrics = evaluate_likelihood(model, data, batch_size=8, iw_samples=3)
    assert metrics["kl_layer_mean"] == pytest.approx(metrics["kl"] / 2, rel=1e-9)
    assert metrics["elbo_layer_mean"] == pytest.approx(metrics["rec"] + metrics["kl"] / 2, rel=1e-9)
    assert metrics["kl"] > 0 and metrics["ppl_layer_mean"] != metrics["ppl"]
    assert metrics["mi_minibatch_size"] == 8


def test_one_example_has_means_but_no_standard_errors_or_active_units(tiny_tokenizer):
    torch.manual_seed(0)
    model = Della(tiny_backbone("gpt2", vocab=tiny_tokenizer.vocab_size), tiny_tokenizer, DellaConfig(latent_size=4)).eval()
    metrics = evaluate_likelihood(model, _encoded(tiny_tokenizer, 1), batch_size=8, iw_samples=2)
    errors = {key: value for key, value in metrics.items() if key.endswith("_stderr")}
    assert set(errors) >= {"nll_stderr", "ppl_stderr", "elbo_stderr", "kl_stderr"} and set(errors.values()) == {None}
    assert metrics["au"] is None and "au_groups" not in metrics and "au_mean" not in metrics  # a variance over one
    assert math.isfinite(metrics["nll"]) and metrics["kl"] > 0
    two = evaluate_likelihood(model, _encoded(tiny_tokenizer, 2), batch_size=8, iw_samples=2)
    assert two["nll_stderr"] > 0 and isinstance(two["au"], int) and len(two["au_groups"]) == 2
