"""Distributions used by the MrVI model.

- :class:`NegativeBinomialLogMean` -- negative binomial parameterised by the **log** mean and the
  inverse dispersion, with a log-density written directly in log space (stable, and cheaper
  than going through probabilities or logits).
- :func:`mixture_of_gaussians` -- the (optionally label-guided) mixture prior on ``u``.

The negative binomial with mean :math:`\\mu` and inverse dispersion :math:`\\theta` has

.. math::

    \\log p(x) = \\log\\Gamma(x+\\theta) - \\log\\Gamma(\\theta) - \\log\\Gamma(x+1)
        + \\theta (\\log\\theta - \\log(\\theta+\\mu)) + x (\\log\\mu - \\log(\\theta+\\mu)),

which equals ``scipy.stats.nbinom(n=theta, p=theta / (theta + mu))``.
"""

from __future__ import annotations

import torch
from pyro import distributions as dist
from torch.distributions import constraints

LABEL_LOGIT_BOOST = 10.0
"""Added to the prior logit of a cell's own label component (label-guided prior)."""


class NegativeBinomialLogMean(dist.TorchDistribution):
    """Negative binomial with log mean ``log_mu`` and inverse dispersion ``theta``.

    Parameters
    ----------
    log_mu
        Log of the mean, any shape.
    theta
        Inverse dispersion (> 0), broadcastable with ``log_mu``.
    """

    arg_constraints = {"log_mu": constraints.real, "theta": constraints.positive}
    support = constraints.nonnegative_integer
    has_rsample = False

    def __init__(self, log_mu: torch.Tensor, theta: torch.Tensor, validate_args=None):
        self.log_mu, self.theta = torch.broadcast_tensors(log_mu, theta)
        super().__init__(batch_shape=self.log_mu.shape, validate_args=validate_args)

    @property
    def mean(self) -> torch.Tensor:
        return self.log_mu.exp()

    @property
    def variance(self) -> torch.Tensor:
        mu = self.mean
        return mu + mu**2 / self.theta

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return type(self)(self.log_mu.expand(batch_shape), self.theta.expand(batch_shape))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        theta = self.theta
        log_theta = theta.log()
        log_theta_mu = torch.logaddexp(log_theta, self.log_mu)
        return (
            torch.lgamma(value + theta)
            - torch.lgamma(theta)
            - torch.lgamma(value + 1.0)
            + theta * (log_theta - log_theta_mu)
            + value * (self.log_mu - log_theta_mu)
        )

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            theta = self.theta.expand(shape)
            rate = torch.distributions.Gamma(theta, theta / self.mean.expand(shape)).sample()
            return torch.poisson(rate)


def poisson_log_mean(log_mu: torch.Tensor) -> dist.Poisson:
    """Poisson likelihood with log mean ``log_mu`` (the ``likelihood="poisson"`` variant)."""
    return dist.Poisson(log_mu.exp())


def mixture_of_gaussians(
    logits: torch.Tensor,
    means: torch.Tensor,
    log_scales: torch.Tensor,
    label_index: torch.Tensor | None = None,
) -> dist.MixtureSameFamily:
    """Mixture-of-Gaussians prior with diagonal components.

    Parameters
    ----------
    logits
        Component logits, shape (K,).
    means, log_scales
        Component means and log standard deviations, shape (K, L).
    label_index
        Optional per-cell label codes, shape (n,). Each cell's own component gets
        :data:`LABEL_LOGIT_BOOST` added to its logit **for that cell only**, so the result has
        batch shape (n,) and one log-density per cell.

    Returns
    -------
    A distribution with event shape (L,) and batch shape () or (n,).
    """
    components = dist.Normal(means, log_scales.exp()).to_event(1)
    if label_index is None:
        return dist.MixtureSameFamily(dist.Categorical(logits=logits), components)
    boost = torch.nn.functional.one_hot(label_index, logits.shape[-1]).to(logits.dtype)
    cell_logits = logits + LABEL_LOGIT_BOOST * boost
    n = label_index.shape[0]
    components = dist.Normal(means.expand(n, *means.shape), log_scales.exp().expand(n, *means.shape))
    return dist.MixtureSameFamily(dist.Categorical(logits=cell_logits), components.to_event(1))
