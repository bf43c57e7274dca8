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

import numpy as np
import torch
from pyro import distributions as dist
from torch.distributions import constraints

LABEL_LOGIT_BOOST = 10.0
"""Added to the prior logit of a cell's own label component (label-guided prior)."""


COUNT_TABLE_SIZE = 32
"""Counts below this use per-gene tables of the count-dependent terms (see :func:`count_tables`)."""


def count_tables(theta: torch.Tensor, size: int = COUNT_TABLE_SIZE, *, digamma: bool = False) -> torch.Tensor:
    """Per-gene tables of the count-dependent terms of the negative binomial, for counts ``k < size``.

    Returns ``lgamma(theta + k) - lgamma(theta) - lgamma(k + 1)`` (or, with ``digamma=True``,
    ``digamma(theta + k) - digamma(theta)``) with shape ``(G, size)`` for ``theta`` of shape
    ``(G,)``. Both follow from the recurrences ``lgamma(t + 1) = lgamma(t) + log t`` and
    ``digamma(t + 1) = digamma(t) + 1 / t``: a cumulative sum over ``k`` in float64, exact to
    float32 rounding, and far fewer evaluations than one per cell and gene.
    """
    t = theta.detach().to(torch.float64).unsqueeze(-1) + torch.arange(size - 1, dtype=torch.float64,
                                                                      device=theta.device)
    steps = t.reciprocal() if digamma else t.log() - torch.arange(1, size, dtype=torch.float64,
                                                                  device=theta.device).log()
    table = torch.nn.functional.pad(steps.cumsum(-1), (1, 0))
    return table.to(theta.dtype)


class _NegativeBinomialLogProb(torch.autograd.Function):
    """Negative binomial log-density with a hand-written backward pass.

    For counts ``x`` (n, G) (no gradient), log means ``log_mu`` (n, G) and per-gene inverse
    dispersion ``theta`` (G,), with :math:`p = \\mu / (\\theta + \\mu)`:

    .. math::

        \\partial_{\\log\\mu} = x - (\\theta + x)\\,p, \\qquad
        \\partial_\\theta = \\psi(x+\\theta) - \\psi(\\theta) + \\log\\theta + 1
            - \\log(\\theta+\\mu) - (\\theta + x)/(\\theta + \\mu).

    The count-dependent terms ``lgamma(x + theta) - lgamma(theta) - log x!`` and
    ``psi(x + theta) - psi(theta)`` come from per-gene tables (:func:`count_tables`) for counts
    below :data:`COUNT_TABLE_SIZE`, looked up with one gather; the few larger counts are
    computed directly. Fusing all this saves the many intermediate tensors of the autograd
    graph; this function is the hot spot of training (checked against autograd in the tests).
    """

    ROWS = 128
    """Cells per block: the elementwise work runs block by block so temporaries stay in cache."""

    @staticmethod
    def _table_index(x: torch.Tensor, size: int) -> torch.Tensor:
        # Flat index gene * size + min(x, size - 1) into a (G, size) table (int32: converting
        # floats to int32 is several times faster than to int64 on CPU).
        offsets = torch.arange(0, x.shape[-1] * size, size, device=x.device, dtype=torch.int32)
        return (x.clamp(max=size - 1).to(torch.int32) + offsets).view(-1)

    @staticmethod
    def forward(ctx, x, log_mu, theta):
        size = COUNT_TABLE_SIZE
        log_theta = theta.log()
        # theta * log(theta) is per gene: fold it into the table of count terms.
        table = count_tables(theta, size).add_((theta * log_theta).detach().unsqueeze(-1)).view(-1)
        out = torch.empty_like(log_mu)
        log_theta_mu = torch.empty_like(log_mu)  # log(theta + mu), kept for the backward pass
        index = _NegativeBinomialLogProb._table_index(x, size).view(x.shape)  # kept as well
        for start in range(0, x.shape[0], _NegativeBinomialLogProb.ROWS):
            rows = slice(start, start + _NegativeBinomialLogProb.ROWS)
            xb, lmb, ltm, ob = x[rows], log_mu[rows], log_theta_mu[rows], out[rows]
            counts = table.index_select(0, index[rows].reshape(-1)).view_as(xb)
            torch.logaddexp(log_theta, lmb, out=ltm)
            # counts + theta log theta + x (log mu - log(theta + mu)) - theta log(theta + mu)
            torch.addcmul(counts, xb, lmb - ltm, out=ob).addcmul_(ltm, theta, value=-1.0)
        # Counts at or above the table size: replace the table's last column by the exact terms.
        large = (x >= size).nonzero(as_tuple=True)
        if len(large[0]):
            xl, tl = x[large], theta[large[1]]
            exact = torch.lgamma(xl + tl) - torch.lgamma(tl) - torch.lgamma(xl + 1.0)
            out[large] += exact - (table.view(-1, size)[large[1], size - 1] - (tl * tl.log()))
        ctx.large = large
        ctx.save_for_backward(x, log_mu, theta, log_theta_mu, index)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, log_mu, theta, log_theta_mu, index = ctx.saved_tensors
        size = COUNT_TABLE_SIZE
        want_mu, want_theta = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_log_mu = torch.empty_like(log_mu) if want_mu else None
        grad_theta = torch.zeros_like(theta) if want_theta else None
        table = count_tables(theta, size, digamma=True).view(-1) if want_theta else None
        for start in range(0, x.shape[0], _NegativeBinomialLogProb.ROWS):
            rows = slice(start, start + _NegativeBinomialLogProb.ROWS)
            xb, gb, ltm = x[rows], grad_out[rows], log_theta_mu[rows]
            # q = (theta + x) / (theta + mu); then d/dlog_mu = x - (theta + x) mu / (theta + mu)
            # = theta (q - 1) and the per-element part of d/dtheta is psi-difference - ltm - q.
            q = torch.add(xb, theta).mul_(torch.neg(ltm).exp_())
            if want_mu:
                torch.sub(q, 1.0, out=grad_log_mu[rows]).mul_(theta).mul_(gb)
            if want_theta:
                per_element = table.index_select(0, index[rows].reshape(-1)).view_as(xb).sub_(ltm).sub_(q)
                grad_theta += per_element.mul_(gb).sum(0)
        if want_theta:
            grad_theta += grad_out.sum(0) * (1.0 + theta.log())
            large = ctx.large
            if len(large[0]):
                xl, tl = x[large], theta[large[1]]
                exact = torch.digamma(xl + tl) - torch.digamma(tl)
                correction = grad_out[large] * (exact - table.view(-1, size)[large[1], size - 1])
                grad_theta.index_add_(0, large[1], correction)
        return None, grad_log_mu, grad_theta


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
        # theta is kept at its own (usually per-gene) shape so that per-gene terms are computed
        # once per gene, not once per cell and gene.
        self.log_mu, self.theta = log_mu, theta
        batch_shape = torch.Size(np.broadcast_shapes(log_mu.shape, theta.shape))
        super().__init__(batch_shape=batch_shape, validate_args=validate_args)

    @property
    def mean(self) -> torch.Tensor:
        return self.log_mu.exp().expand(self.batch_shape)

    @property
    def variance(self) -> torch.Tensor:
        mu = self.mean
        return mu + mu**2 / self.theta

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return type(self)(self.log_mu.expand(batch_shape), self.theta)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        theta = self.theta
        if value.dim() == 2 and self.log_mu.shape == value.shape and theta.shape == value.shape[-1:]:
            return _NegativeBinomialLogProb.apply(value, self.log_mu, theta)
        log_theta = theta.log()
        log_theta_mu = torch.logaddexp(log_theta, self.log_mu)
        return (
            torch.lgamma(value + theta)
            - torch.lgamma(value + 1.0)
            + (theta * log_theta - torch.lgamma(theta))
            - (theta + value) * log_theta_mu
            + value * self.log_mu
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
