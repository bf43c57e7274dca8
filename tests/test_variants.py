"""Model variants: sample mappers, likelihoods, priors, a user-written guide, and a new likelihood
registered from outside the package taken through every analysis."""

import json

import numpy as np
import pytest
import torch
import xarray as xr
from pyro import distributions as dist
from torch import nn

import mrvi_pyro
from mrvi_pyro import MRVI, MrVIModule, components

from ._guides import student_t_guide


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
    registered = r"sample_mapper 'gnn' is not registered; registered: \['attention', 'mlp', 'linear'\]"
    with pytest.raises(ValueError, match=registered):
        MrVIModule(30, 4, 2, sample_mapper="gnn")
    with pytest.raises(ValueError, match="use_map=False needs sample_mapper='attention'"):
        MrVIModule(30, 4, 2, sample_mapper="mlp", qz_kwargs={"use_map": False})


@pytest.mark.parametrize("options", [
    {"sample_mapper": "mlp"}, {"sample_mapper": "linear"}, {"likelihood": "poisson"}, {"guide": student_t_guide},
])
def test_variants_train_and_save(small_adata, tmp_path, options):
    model = MRVI(small_adata, n_latent=8, n_latent_u=4, **options)
    model.train(max_epochs=3, progress_bar=False)
    assert np.isfinite(model.history["elbo_validation"]).all()
    if "guide" in options:  # not registered: the file cannot name it
        with pytest.warns(UserWarning, match="is not registered"):
            model.save(tmp_path / "m")
    else:
        model.save(tmp_path / "m")
    loaded = MRVI.load(tmp_path / "m", adata=small_adata, guide=options.get("guide"))
    np.testing.assert_array_equal(loaded.get_latent_representation(give_z=True),
                                  model.get_latent_representation(give_z=True))
    assert loaded.module.guide_program is model.module.guide_program


class ZeroInflatedNB(nn.Module):
    """Zero-inflated negative binomial with per-gene gates whose mean stays ``exp(log_mu)``:
    ``x ~ pi_g delta_0 + (1 - pi_g) NB(mean mu / (1 - pi_g), theta_g)`` (tutorial 3 writes the same)."""

    def __init__(self, config):
        super().__init__()
        self.gate_logits = nn.Parameter(torch.full((config["n_genes"],), -3.0))

    def forward(self, log_mu, theta):
        nb_log_mean = log_mu + nn.functional.softplus(self.gate_logits)  # log(mu / (1 - pi))
        return dist.ZeroInflatedNegativeBinomial(total_count=theta, logits=nb_log_mean - theta.log(),
                                                 gate_logits=self.gate_logits)


@pytest.fixture
def zinb_registered(monkeypatch):
    monkeypatch.setattr(components.LIKELIHOODS, "_entries", dict(components.LIKELIHOODS._entries))
    mrvi_pyro.register_likelihood("zinb", ZeroInflatedNB)


def test_registered_zinb_trains_saves_loads_and_runs_every_analysis(small_adata, tmp_path, zinb_registered):
    """A likelihood the package does not have, registered from outside: train, save, load (by name
    only), then distances, DE and DA through the facade, unchanged."""
    components.check_contract("likelihood", "zinb")
    model = MRVI(small_adata, n_latent=8, n_latent_u=4, likelihood="zinb")
    gates = model.module.likelihood.gate_logits.detach().clone()
    model.train(max_epochs=3, progress_bar=False)
    assert np.isfinite(model.history["elbo_validation"]).all()
    assert not torch.equal(model.module.likelihood.gate_logits.detach(), gates)  # trained with the rest
    model.save(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "model.json").read_text())
    assert saved["init_params"]["likelihood"] == "zinb" and "likelihood.gate_logits" in torch.load(
        tmp_path / "m" / "model.pt", weights_only=True)
    loaded = MRVI.load(tmp_path / "m", adata=small_adata)
    torch.testing.assert_close(loaded.module.likelihood.gate_logits, model.module.likelihood.gate_logits,
                               rtol=0, atol=0)

    distances = loaded.get_local_sample_distances(groupby="cell_type", keep_cell=False)
    xr.testing.assert_equal(distances, model.get_local_sample_distances(groupby="cell_type", keep_cell=False))
    by_type = distances["cell_type"].values
    assert np.isfinite(by_type).all() and (by_type >= 0).all()
    de = loaded.differential_expression(sample_cov_keys=["disease"], mc_samples=3, store_lfc=True, seed=0)
    assert np.isfinite(de["lfc"].values).all() and de["lfc"].shape[-1] == small_adata.n_vars
    da = loaded.differential_abundance(sample_cov_keys=["disease"])
    assert np.isfinite(da["disease_log_probs"].values).all()

    components.LIKELIHOODS._entries.pop("zinb")
    with pytest.raises(ValueError, match=r"saved with the likelihood 'zinb', which is not registered"):
        MRVI.load(tmp_path / "m", adata=small_adata)
