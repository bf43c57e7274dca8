r"""The MrVI variational distribution :math:`q` as an explicit Pyro program.

.. math::

    u_n &\sim \mathcal{N}\big(\mu_\phi(x_n, s_n),\ \operatorname{diag}\sigma_\phi^2(x_n, s_n)\big)\\
    z_n &= z_{\text{base}}(u_n) + f_\phi(u_n, s_n) \qquad (\text{a Delta site})

:math:`\mu_\phi, \sigma_\phi` are the encoder (log1p counts, sample-conditional layer norm,
sample embedding, residual blocks); :math:`f_\phi` is attention between the layer-normed
``u`` and a learned sample embedding. A counterfactual :math:`z_n^{(s)}` swaps :math:`s_n` for
another sample in :math:`f_\phi` only, keeping :math:`u_n`. When the module's sample mapper is
not MAP (``qz_kwargs={"use_map": False}``), ``z`` is a Normal site around the same mean.

:func:`guide` has the same signature as :func:`mrvi_pyro.model.model`.
"""

from __future__ import annotations

import pyro
import torch
from pyro import distributions as dist

from .model import cells_plate, kl_scale


def guide(
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
    """MrVI guide. Arguments as in :func:`mrvi_pyro.model.model`.

    Needs ``module.encode_u(x, sample_index)``, ``module.z_base(u)`` and
    ``module.sample_offset(u, sample_index)``. Sites: ``u`` (n, L_u), ``z`` (n, L).
    """
    with cells_plate(x, n_obs, subsample, cell_scale):
        with kl_scale(kl_weight):
            loc, scale = module.encode_u(x, sample_index)
            u = pyro.sample("u", dist.Normal(loc, scale).to_event(1))
            offset = module.sample_offset(u, sample_index)
            if isinstance(offset, tuple):
                z_dist = dist.Normal(module.z_base(u) + offset[0], offset[1]).to_event(1)
            else:
                z_dist = dist.Delta(module.z_base(u) + offset, event_dim=1)
            z = pyro.sample("z", z_dist)
    return u, z
