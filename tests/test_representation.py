"""Representation metrics: importance-weighted bound vs ELBO, mutual information on a known
linear-Gaussian encoder, active units on constructed means, and the training tricks."""

import math

import pytest
import torch

from conftest import demo_lines, tiny_backbone
from textvae.backbone.backbone import Backbone
from textvae.config import Config
from textvae.data.batching import collate, encode_examples
from textvae.data.corpus import Example
from textvae.evaluation.likelihood import active_units, mutual_information
from textvae.latent.gaussian import DiagonalGaussian
from textvae.latent.regularizers import BagOfWords, MeanBatchNorm, thresholded_kl
from textvae.models.base import ImportanceWeights
from textvae.models.registry import MODELS, model_class, model_config
from textvae.models.single import Embed, SingleLatentConfig


def _batch(tokenizer, count=6):
    encoded, _ = encode_examples([Example(t) for t in demo_lines("train", count)], tokenizer, 64, 64, "truncate")
    return collate(encoded, tokenizer.pad_id)


@pytest.mark.slow
@torch.no_grad()
def test_iw_bound_is_tighter_than_elbo_and_reaches_log_px(tiny_tokenizer):
    """With the latent cut off from the decoder (W_e = 0), log p(x) = log p(x | z) is exact.
    The k-sample bound must start at the ELBO (k = 1, in expectation), rise with k and reach
    the exact value; a wrong prior or posterior density would miss it."""
    model = Embed(tiny_backbone("gpt2", vocab=tiny_tokenizer.vocab_size), tiny_tokenizer, SingleLatentConfig(latent_size=4))
    model.eval()
    model.latent_to_embedding.weight.zero_()
    model.posterior_head.bias[:4] += 0.3  # posterior means off the prior: KL of about half a nat
    model.posterior_head.bias[4:] += 0.3  # wider than the prior: bounded weights p / q
    batch = _batch(tiny_tokenizer, 3)
    torch.manual_seed(0)
    out = model(batch)
    log_px, kl = -out.rec, out.kl
    assert (kl > 0.4).all()
    samples = model.log_weights(batch, 6000)  # [B, 6000]

    def bound(k):  # mean of the k-sample estimate over disjoint groups of the samples
        groups = samples.view(batch.size, -1, k)
        return (torch.logsumexp(groups, -1) - math.log(k)).mean(1)

    elbo = log_px - kl
    torch.testing.assert_close(bound(1), elbo, atol=0.05, rtol=0)  # k = 1: the ELBO
    assert (bound(10) > bound(1)).all() and (bound(100) > bound(10)).all()
    assert (bound(6000) >= elbo + 0.3).all()
    # Monte Carlo error of one 6000-sample estimate here: about 0.015 nats (measured over seeds)
    torch.testing.assert_close(bound(6000), log_px, atol=0.06, rtol=0)


@pytest.mark.parametrize("name", list(MODELS))
def test_importance_weights_in_chunks_are_separate_calls_with_the_encoder_run_once(name, tiny_tokenizer):
    """Chunking changes the cost, not the numbers: k = 7 in chunks of 3 gives the weights of
    three separate calls of 3, 3 and 1 samples from the same seed, while the encoder (and
    softmax's body) runs once, not once a chunk."""
    options = {"latent_size": 6} if model_class(name).has_latent else {}
    if model_class(name).latent_groups == "segment":
        options["segment_length"] = 3  # several segments a text
    config = Config.from_dict({"model": {"name": name, **options}})
    torch.manual_seed(0)
    model = model_class(name)(tiny_backbone("gpt2", vocab=tiny_tokenizer.vocab_size), tiny_tokenizer, model_config(config)).eval()
    encoded, _ = encode_examples([Example(t) for t in demo_lines("train", 4)], tiny_tokenizer, 48, 16, "truncate", model.segmenter)
    batch = collate(encoded, tiny_tokenizer.pad_id)
    passes = []
    for module in model.modules():
        if isinstance(module, Backbone):
            module.register_forward_hook(lambda *_: passes.append(1))
    with torch.no_grad():
        torch.manual_seed(1)
        model.importance_weights(batch, 1)
        one_chunk, passes[:] = len(passes), []
        torch.manual_seed(1)
        chunked = model.importance_weights(batch, 7, chunk=3)
        three_chunks, passes[:] = len(passes), []
        torch.manual_seed(1)
        separate = ImportanceWeights.cat([model.importance_weights(batch, n) for n in (3, 3, 1)])
    assert chunked.total.shape == (4, 7)
    torch.testing.assert_close(chunked.reconstruction, separate.reconstruction, rtol=0, atol=0)
    torch.testing.assert_close(chunked.latent, separate.latent, rtol=0, atol=0)
    torch.testing.assert_close(chunked.groups, separate.groups, rtol=0, atol=0)
    decoder_passes_per_chunk = 0 if name in ("lm", "softmax") else 1  # the LM is exact; softmax's z only shifts the head
    assert three_chunks == one_chunk + 2 * decoder_passes_per_chunk
    if model.has_latent:
        assert chunked.latent.std(1).min() > 0  # seven different draws per example


def test_mutual_information_of_a_linear_gaussian_encoder():
    """x ~ N(0, I), q(z|x) = N(A x, s^2 I): I(x; z) = 1/2 log det(I + A A^T / s^2)."""
    torch.manual_seed(0)
    x = torch.randn(3000, 2)
    matrix, std = torch.tensor([[1.0, 0.0], [0.5, 0.5]]), 0.5
    means = x @ matrix.T
    log_var = torch.full_like(means, math.log(std**2))
    batches = [DiagonalGaussian(means[i : i + 256], log_var[i : i + 256]) for i in range(0, 3000, 256)]
    expected = 0.5 * torch.logdet(torch.eye(2) + matrix @ matrix.T / std**2).item()
    assert expected == pytest.approx(1.199, abs=1e-3)
    assert mutual_information(batches) == pytest.approx(expected, abs=0.06)
    constant = [DiagonalGaussian(torch.zeros_like(q.mean), q.log_var) for q in batches]  # z independent of x
    assert mutual_information(constant) == pytest.approx(0.0, abs=0.01)


def test_active_units_counts_the_dimensions_whose_means_vary():
    torch.manual_seed(0)
    means = torch.zeros(500, 6)
    means[:, :3] = torch.randn(500, 3) * torch.tensor([0.5, 1.0, 2.0])  # variances 0.25, 1, 4
    means[:, 3] = torch.randn(500) * 0.05  # variance 0.0025 < 0.01
    means[:, 4] = 7.0  # constant
    means[:, 5] = torch.randn(500) * 0.3  # variance 0.09: active at 0.01, not at 0.2
    assert active_units(means, 0.01).tolist() == [True, True, True, False, False, True]
    assert int(active_units(means, 0.2).sum()) == 3


def test_kl_threshold_drops_only_the_dimensions_below_it():
    kl_per_dim = torch.tensor([[0.1, 0.6, 2.0], [0.0, 0.4, 0.5]])
    assert thresholded_kl(kl_per_dim, 0.5).tolist() == pytest.approx([2.6, 0.0])
    assert thresholded_kl(kl_per_dim, 0.0).tolist() == pytest.approx([2.7, 0.9])


def test_bag_of_words_loss_counts_every_target_token():
    torch.manual_seed(0)
    bow = BagOfWords(latent_size=3, vocab_size=5)
    z = torch.randn(2, 3)
    ids = torch.tensor([[1, 4, 4, 2], [1, 3, 0, 0]])
    targets = torch.tensor([[False, True, True, True], [False, True, False, False]])
    log_probs = torch.log_softmax(bow.project(z), -1)
    expected = torch.stack([-(2 * log_probs[0, 4] + log_probs[0, 2]), -log_probs[1, 3]])
    torch.testing.assert_close(bow(z, ids, targets), expected)


def test_mean_batch_norm_fixes_the_spread_of_the_posterior_means():
    norm = MeanBatchNorm(4, gamma=0.7).train()
    means = torch.randn(64, 4) * 5 + 3
    normalised = norm(means)
    # E_x[mu_d^2] = gamma^2 (+ shift^2, zero here): the expected KL per dimension >= gamma^2 / 2
    torch.testing.assert_close(normalised.pow(2).mean(0), torch.full((4,), 0.49), atol=1e-3, rtol=0)
    norm.eval()
    assert norm(means[:1]).shape == (1, 4)  # eval mode uses running statistics
