"""A user-written guide shared by the tests of custom components (not a test module)."""

import pyro
from pyro import distributions as dist

from mrvi_pyro.model import cells_plate, kl_scale


def student_t_guide(module, x, sample_index, batch_index, label_index=None, *, n_obs=None, subsample=None,
                    kl_weight=1.0, cell_scale=None):
    """The MrVI guide with a Student-t posterior on u (same sites)."""
    with cells_plate(x, n_obs, subsample, cell_scale), kl_scale(kl_weight):
        loc, scale = module.encode_u(x, sample_index)
        u = pyro.sample("u", dist.StudentT(5.0, loc, scale).to_event(1))
        pyro.sample("z", dist.Delta(module.counterfactual_z(u, sample_index), event_dim=1))
