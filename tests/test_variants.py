"""Model variants: sample mappers, likelihoods, priors and a user-written guide."""

import numpy as np
import pyro
import pytest
import torch
from pyro import distributions as dist

from mrvi_pyro import MRVI, MrVIModule
from mrvi_pyro.model import cells_plate, kl_scale


@pytest.mark.parametrize("mapper", ["attention", "mlp", "linear"])
def test_sample_mappers_broadcast_and_differ_by_sample(mapper):
    torch.manual_seed(0)
    module = MrVIModule(30, 5, 2, n_latent=8, n_latent_u=4, sample_mapper=mapper).eval()
    with torch.no_grad():
        for p in module.sample_mapper.parameters():
            p.add_(0.1 * torch.randn_like(p))
    u = torch.randn(7, 4)
    all_z = module.counterfactual_z(u)
    assert all_z.shape == (7, 5, 8)
    for s in range(5):
        torch.testing.assert_close(all_z[:, s], module.counterfactual_z(u, torch.full((7,), s)))
    assert (all_z[:, 0] - all_z[:, 1]).abs().max() > 1e-4
    assert module.counterfactual_z(torch.randn(3, 7, 4)).shape == (3, 7, 5, 8)


def test_variant_arguments_are_checked():
    with pytest.raises(ValueError, match=r"sample_mapper 'gnn' is not registered; registered: \['attention', 'mlp', 'linear'\]"):
        MrVIModule(30, 4, 2, sample_mapper="gnn")
    with pytest.raises(ValueError, match="use_map=False needs sample_mapper='attention'"):
        MrVIModule(30, 4, 2, sample_mapper="mlp", qz_kwargs={"use_map": False})


def scaled_guide(module, x, sample_index, batch_index, label_index=None, *, n_obs=None, subsample=None,
                 kl_weight=1.0, cell_scale=None):
    """A user-written guide: the MrVI guide with a Student-t posterior on u (same sites)."""
    with cells_plate(x, n_obs, subsample, cell_scale), kl_scale(kl_weight):
        loc, scale = module.encode_u(x, sample_index)
        u = pyro.sample("u", dist.StudentT(5.0, loc, scale).to_event(1))
        pyro.sample("z", dist.Delta(module.counterfactual_z(u, sample_index), event_dim=1))


@pytest.mark.parametrize("options", [
    {"sample_mapper": "mlp"}, {"sample_mapper": "linear"}, {"likelihood": "poisson"}, {"guide": scaled_guide},
])
def test_variants_train_and_save(small_adata, tmp_path, options):
    model = MRVI(small_adata, n_latent=8, n_latent_u=4, **options)
    model.train(max_epochs=3, progress_bar=False)
    assert np.isfinite(model.history["elbo_validation"]).all()
    model.save(tmp_path / "m")
    loaded = MRVI.load(tmp_path / "m", adata=small_adata, guide=options.get("guide"))
    np.testing.assert_array_equal(loaded.get_latent_representation(give_z=True),
                                  model.get_latent_representation(give_z=True))
    assert loaded.module.guide_program is model.module.guide_program
