import numpy as np
import pytest
import torch
from scipy import stats

from mrvi_pyro.distributions import LABEL_LOGIT_BOOST, NegativeBinomialLogMean, mixture_of_gaussians


@pytest.mark.parametrize("theta", [0.3, 2.0, 50.0])
def test_negative_binomial_matches_scipy(theta):
    mu = np.array([0.01, 0.5, 3.0, 40.0, 1000.0])
    x = np.array([0, 1, 5, 37, 1210])
    ours = NegativeBinomialLogMean(torch.tensor(np.log(mu)), torch.tensor(theta, dtype=torch.float64)).log_prob(
        torch.tensor(x, dtype=torch.float64))
    ref = stats.nbinom(n=theta, p=theta / (theta + mu)).logpmf(x)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-10, atol=1e-10)


def test_negative_binomial_samples_have_right_moments():
    torch.manual_seed(0)
    d = NegativeBinomialLogMean(torch.tensor([np.log(4.0)]), torch.tensor([2.0]))
    draws = d.sample((200_000,))
    assert abs(draws.mean().item() - 4.0) < 0.05
    assert abs(draws.var().item() - (4.0 + 16.0 / 2.0)) < 0.2
    assert d.log_prob(draws[:5]).shape == (5, 1)


def test_mixture_prior_matches_manual_density():
    torch.manual_seed(0)
    logits, means, log_scales = torch.randn(3), torch.randn(3, 2), 0.3 * torch.randn(3, 2)
    u = torch.randn(4, 2)
    d = mixture_of_gaussians(logits, means, log_scales)
    comp = torch.distributions.Normal(means, log_scales.exp()).log_prob(u[:, None]).sum(-1)
    manual = torch.logsumexp(torch.log_softmax(logits, 0) + comp, dim=-1)
    torch.testing.assert_close(d.log_prob(u), manual)


def test_label_guided_prior_gives_one_density_per_cell():
    torch.manual_seed(0)
    logits, means, log_scales = torch.zeros(3), torch.randn(3, 2), torch.zeros(3, 2)
    u = torch.randn(5, 2)
    labels = torch.tensor([0, 1, 2, 0, 1])
    d = mixture_of_gaussians(logits, means, log_scales, labels)
    lp = d.log_prob(u)
    assert lp.shape == (5,)
    comp = torch.distributions.Normal(means, 1.0).log_prob(u[:, None]).sum(-1)  # (5, 3)
    weights = torch.log_softmax(logits + LABEL_LOGIT_BOOST * torch.nn.functional.one_hot(labels, 3), -1)
    torch.testing.assert_close(lp, torch.logsumexp(weights + comp, -1))
    # Each cell's density depends on its own label only: changing another cell's label changes nothing.
    other = labels.clone()
    other[1] = 2
    lp2 = mixture_of_gaussians(logits, means, log_scales, other).log_prob(u)
    torch.testing.assert_close(lp2[[0, 2, 3, 4]], lp[[0, 2, 3, 4]])
    assert not torch.isclose(lp2[1], lp[1])


def test_fused_negative_binomial_gradients_match_autograd():
    torch.manual_seed(0)
    x = torch.poisson(torch.rand(7, 5, dtype=torch.float64) * 6)
    log_mu = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    theta = (torch.rand(5, dtype=torch.float64) + 0.3).requires_grad_()
    fused = NegativeBinomialLogMean(log_mu, theta).log_prob(x)
    log_theta_mu = torch.logaddexp(theta.log(), log_mu)
    manual = (torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1)
              + theta * (theta.log() - log_theta_mu) + x * (log_mu - log_theta_mu))
    torch.testing.assert_close(fused, manual)
    weights = torch.randn(7, 5, dtype=torch.float64)
    g_fused = torch.autograd.grad((fused * weights).sum(), (log_mu, theta))
    g_manual = torch.autograd.grad((manual * weights).sum(), (log_mu, theta))
    for a, b in zip(g_fused, g_manual):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda m, t: NegativeBinomialLogMean(m, t).log_prob(x), (log_mu, theta))


def test_count_tables_match_lgamma_and_digamma():
    from mrvi_pyro.distributions import count_tables

    theta = torch.tensor([0.05, 0.7, 3.0, 250.0], dtype=torch.float64)
    k = torch.arange(32, dtype=torch.float64)
    t = theta[:, None]
    torch.testing.assert_close(count_tables(theta, 32), torch.lgamma(t + k) - torch.lgamma(t) - torch.lgamma(k + 1))
    torch.testing.assert_close(count_tables(theta, 32, digamma=True), torch.digamma(t + k) - torch.digamma(t))
    # float32 tables are float32 roundings of the float64 values
    t32 = count_tables(theta.float(), 32)
    assert t32.dtype == torch.float32
    torch.testing.assert_close(t32.double(), count_tables(theta, 32), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_negative_binomial_with_large_counts_matches_autograd(dtype):
    # Counts on both sides of the table size (31, 32, 33) and far above it.
    from mrvi_pyro.distributions import COUNT_TABLE_SIZE

    torch.manual_seed(1)
    x = torch.poisson(torch.rand(40, 6, dtype=torch.float64) * 4)
    x[0, :] = torch.tensor([COUNT_TABLE_SIZE - 1, COUNT_TABLE_SIZE, COUNT_TABLE_SIZE + 1, 500, 12345, 0])
    x[7, 2] = 90.0
    x = x.to(dtype)
    log_mu = (torch.randn(40, 6, dtype=dtype) + 1).requires_grad_()
    theta = (torch.rand(6, dtype=dtype) * 5 + 0.1).requires_grad_()
    fused = NegativeBinomialLogMean(log_mu, theta).log_prob(x)
    log_theta_mu = torch.logaddexp(theta.log(), log_mu)
    manual = (torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1)
              + theta * (theta.log() - log_theta_mu) + x * (log_mu - log_theta_mu))
    tol = {} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-3}
    torch.testing.assert_close(fused, manual, **tol)
    weights = torch.randn(40, 6, dtype=dtype)
    g_fused = torch.autograd.grad((fused * weights).sum(), (log_mu, theta))
    g_manual = torch.autograd.grad((manual * weights).sum(), (log_mu, theta))
    for a, b in zip(g_fused, g_manual):
        torch.testing.assert_close(a, b, **tol)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda m, t: NegativeBinomialLogMean(m, t).log_prob(x), (log_mu, theta))
