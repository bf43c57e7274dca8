r"""The MrVI generative model :math:`p` as an explicit Pyro program.

For each cell :math:`n` in ``pyro.plate("cells", size=N, subsample=idx)``:

.. math::

    u_n &\sim \sum_{k=1}^{K} \pi_{nk}\, \mathcal{N}(\mu_k, \operatorname{diag}\sigma_k^2)
        \qquad (\pi_{nk} \propto e^{a_k + 10\,[k = y_n]} \text{ with labels } y_n)\\
    z_n \mid u_n &\sim \mathcal{N}\big(z_{\text{base}}(u_n),\ \sigma_z^2 I_L\big)\\
    h_n &= \operatorname{softmax}\big(A\,[z_n + g(z_n, b_n)] + \gamma\big)\\
    x_{ng} &\sim \operatorname{NB}\big(\text{mean}=\ell_n h_{ng},\ \text{inverse dispersion}=r_g\big),
        \qquad \ell_n = \textstyle\sum_g x_{ng}.

The ``u`` and ``z`` sites are scaled by the KL warm-up weight :math:`w` (``poutine.scale``; at
:math:`w=0` they are masked out, since Pyro requires positive scales). ``cell_scale`` optionally
reweights every term of each cell (``scale_observations``: one over its sample's cell count).
With ``z_u_prior=False`` on the module, the ``z`` site is masked and contributes nothing.

Both :func:`model` and :func:`mrvi_pyro.guide.guide` take the same arguments, so
``pyro.infer.Trace_ELBO().differentiable_loss(model, guide, *args, **kwargs)`` is the
(negative) ELBO. The networks and parameters come from ``module`` (a
:class:`mrvi_pyro.module.MrVIModule` or any object with the same methods).
"""

from __future__ import annotations

import contextlib

import pyro
import torch
from pyro import distributions as dist
from pyro import poutine


def kl_scale(kl_weight: float | torch.Tensor):
    """Handler that applies the KL warm-up weight to the latent sites (masks them at zero)."""
    if not isinstance(kl_weight, torch.Tensor) and kl_weight == 0:
        return poutine.mask(mask=False)
    if not isinstance(kl_weight, torch.Tensor) and kl_weight == 1:
        return contextlib.nullcontext()
    return poutine.scale(scale=kl_weight)


def cells_plate(x: torch.Tensor, n_obs: int | None, subsample: torch.Tensor | None, cell_scale=None):
    """The ``cells`` plate (and the optional per-cell scale) shared by model and guide."""
    n = x.shape[0]
    if subsample is None:
        subsample = torch.arange(n, device=x.device)
    stack = contextlib.ExitStack()
    stack.enter_context(pyro.plate("cells", size=n if n_obs is None else n_obs, subsample=subsample))
    if cell_scale is not None:
        stack.enter_context(poutine.scale(scale=cell_scale))
    return stack


def model(
    module,
    x: torch.Tensor,
    sample_index: torch.Tensor,
    batch_index: torch.Tensor,
    label_index: torch.Tensor | None = None,
    *,
    n_obs: int | None = None,
    subsample: torch.Tensor | None = None,
    kl_weight: float | torch.Tensor = 1.0,
    cell_scale: torch.Tensor | None = None,
):
    """MrVI generative program.

    Parameters
    ----------
    module
        Owner of the networks: needs ``u_prior(label_index)``, ``z_base(u)``, ``z_u_scale``,
        ``z_u_prior``, ``decode(z, batch_index)`` and ``observation_distribution(log_mu)``.
    x
        Counts of the minibatch, shape (n, G).
    sample_index, batch_index
        Integer codes, shape (n,).
    label_index
        Optional label codes (label-guided prior), shape (n,).
    n_obs
        Number of cells in the full data set (plate size); defaults to n.
    subsample
        Indices of the minibatch cells in the full data set, shape (n,).
    kl_weight
        KL warm-up weight applied to the ``u`` and ``z`` sites.
    cell_scale
        Optional per-cell weight, shape (n,).

    Sites
    -----
    ``u`` (n, L_u); ``z`` (n, L); ``x`` (n, G), observed.
    """
    with cells_plate(x, n_obs, subsample, cell_scale):
        with kl_scale(kl_weight):
            u = pyro.sample("u", module.u_prior(label_index))
            with poutine.mask(mask=bool(module.z_u_prior)):
                z = pyro.sample("z", dist.Normal(module.z_base(u), module.z_u_scale).to_event(1))
        log_h = module.decode(z, batch_index)
        log_mu = log_h + torch.log(x.sum(-1, keepdim=True))
        pyro.sample("x", module.observation_distribution(log_mu).to_event(1), obs=x)
    return z
