"""Gaussian densities and KL against references; the KL schedules at chosen steps."""

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from textvae.errors import TextVAEError
from textvae.latent.gaussian import DiagonalGaussian
from textvae.latent.schedules import KLSchedule


def _pair(seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = DiagonalGaussian(torch.randn(3, 5, generator=generator), torch.randn(3, 5, generator=generator) * 0.5)
    p = DiagonalGaussian(torch.randn(3, 5, generator=generator), torch.randn(3, 5, generator=generator) * 0.5)
    return q, p


def test_log_prob_and_kl_match_torch_distributions():
    q, p = _pair()
    z = torch.randn(3, 5)
    reference_q = Normal(q.mean, q.std)
    torch.testing.assert_close(q.log_prob(z), reference_q.log_prob(z).sum(-1))
    torch.testing.assert_close(q.kl(p), kl_divergence(reference_q, Normal(p.mean, p.std)).sum(-1))
    samples = torch.randn(3, 7, 5)  # k samples per row
    torch.testing.assert_close(q.log_prob(samples), reference_q.log_prob(samples.transpose(0, 1)).sum(-1).T)


def test_analytic_kl_equals_monte_carlo_estimate():
    torch.manual_seed(0)
    q, p = _pair(1)
    z = q.rsample(200_000)  # [3, k, 5]
    monte_carlo = (q.log_prob(z) - p.log_prob(z)).mean(-1)
    torch.testing.assert_close(monte_carlo, q.kl(p), rtol=0.02, atol=0.02)
    assert (q.kl(p) > 0.5).all()  # not a trivially small KL


def test_kl_to_itself_is_zero_and_standard_prior():
    q, _ = _pair()
    assert q.kl(q).abs().max() < 1e-6
    standard = DiagonalGaussian.standard(*q.mean.shape, q.mean.device)
    expected = 0.5 * (q.log_var.exp() + q.mean**2 - 1 - q.log_var).sum(-1)
    torch.testing.assert_close(q.kl(standard), expected)


def test_cyclical_schedule_follows_the_della_appendix():
    schedule = KLSchedule(schedule="cyclical")  # period 2 epochs: 1e-5 half, rise a quarter, 1 a quarter
    steps_per_epoch = 100  # period = 200 steps
    assert schedule(0, steps_per_epoch) == 1e-5
    assert schedule(99, steps_per_epoch) == 1e-5
    assert schedule(100, steps_per_epoch) == pytest.approx(1e-5)
    assert schedule(125, steps_per_epoch) == pytest.approx(0.5 + 0.5e-5)
    assert schedule(150, steps_per_epoch) == 1.0
    assert schedule(199, steps_per_epoch) == 1.0
    assert schedule(200, steps_per_epoch) == 1e-5  # the next cycle starts low again
    assert schedule(325, steps_per_epoch) == pytest.approx(0.5 + 0.5e-5)


def test_linear_and_constant_schedules_and_validation():
    assert KLSchedule(schedule="linear", warmup_steps=10)(5, 100) == 0.5
    assert KLSchedule(schedule="linear", warmup_steps=10)(50, 100) == 1.0
    assert KLSchedule(beta=0.3)(7, 100) == 0.3
    with pytest.raises(TextVAEError):
        KLSchedule(schedule="cyclical", hold_low=0.9, rise=0.2).validate()
