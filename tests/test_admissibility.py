"""Admissibility of cell-sample pairs (mrvi_pyro.admissibility and the facade method)."""

import numpy as np
import pytest
import torch

from mrvi_pyro import da
from mrvi_pyro.admissibility import outlier_cell_sample_pairs


def _brute_force_loo(loc, scale, samples, n_samples):
    """log q_s(u_n) with every cell a component and the cell's own component left out (float64)."""
    loc, scale = loc.double(), scale.double()
    dens = torch.distributions.Normal(loc[None], scale[None]).log_prob(loc[:, None]).sum(-1)  # (n, m)
    dens.fill_diagonal_(-np.inf)
    out = np.full((len(loc), n_samples), -np.inf)
    for s in range(n_samples):
        mask = (samples == s).numpy()
        if mask.any():
            count = mask.sum() - mask.astype(int)
            with np.errstate(divide="ignore", invalid="ignore"):
                out[:, s] = torch.logsumexp(dens[:, mask], 1).numpy() - np.log(count)
            out[count == 0, s] = np.nan
    return out


def test_fifty_cells_match_brute_force(trained_model):
    data = trained_model._cell_data()
    idx = np.arange(50)
    with pytest.warns(UserWarning, match="single cell"):  # one sample has a single cell among the 50
        out = outlier_cell_sample_pairs(trained_model.module, data, idx)
    n_samples = trained_model.module.n_samples
    for key in ("log_probs", "log_ratios", "is_admissible"):
        assert out[key].shape == (50, n_samples)
    assert out["is_admissible"].dtype == bool
    loc, scale, samples = da.posterior_parameters(trained_model.module, data, idx)
    expected = _brute_force_loo(loc, scale, samples, n_samples)
    np.testing.assert_allclose(out["log_probs"], expected, rtol=1e-5, atol=1e-4)
    codes = out["sample_index"]
    singletons = [s for s in np.unique(codes) if (codes == s).sum() == 1]
    assert singletons and np.isnan(out["thresholds"][singletons]).all()
    for s in set(np.unique(codes)) - set(singletons):
        assert out["thresholds"][s] == pytest.approx(np.quantile(expected[codes == s, s], 0.05), rel=1e-5, abs=1e-4)
    with np.errstate(invalid="ignore"):
        assert np.array_equal(out["is_admissible"], out["log_ratios"] >= 0.0)
    assert not out["is_admissible"][:, singletons].any()


def test_facade_on_fifty_cells_does_not_modify_adata(trained_model, sim_adata):
    small = sim_adata[:50].copy()
    before = (small.obs.copy(), dict(small.obsm), dict(small.uns), small.X.copy())
    with pytest.warns(UserWarning, match="single cell"):
        ds = trained_model.get_outlier_cell_sample_pairs(small, batch_size=16)
    assert set(ds.data_vars) >= {"log_probs", "log_ratios", "is_admissible"}
    assert ds["is_admissible"].dims == ("cell_name", "sample")
    assert list(ds["sample"].values) == trained_model.registry.sample_categories
    assert list(ds["cell_name"].values) == list(small.obs_names)
    assert small.obs.equals(before[0]) and dict(small.obsm) == before[1]
    assert small.uns.keys() == before[2].keys()
    assert (small.X != before[3]).nnz == 0 if hasattr(small.X, "nnz") else np.array_equal(small.X, before[3])


def test_own_sample_rate_matches_quantile(trained_model):
    ds = trained_model.get_outlier_cell_sample_pairs(quantile_threshold=0.1)
    samples = trained_model.adata.obs["sample"].astype(str).to_numpy()
    own = ds["is_admissible"].values[np.arange(len(samples)), [ds["sample"].values.tolist().index(s) for s in samples]]
    # per sample, a fraction of about 1 - quantile_threshold of its own cells pass
    rates = [own[samples == s].mean() for s in np.unique(samples)]
    assert np.all(np.abs(np.array(rates) - 0.9) < 0.03)
    # every cell type is present in every sample, so most other pairs are admissible too
    assert ds["is_admissible"].values.mean() > 0.6


def test_missing_cell_type_makes_pairs_inadmissible(trained_model, sim_adata):
    obs = sim_adata.obs
    target = "sample_00"
    keep = ~((obs["sample"].astype(str) == target) & (obs["cell_type"] == "type_0")).to_numpy()
    sub = sim_adata[keep].copy()
    ds = trained_model.get_outlier_cell_sample_pairs(sub)
    is_type0 = (sub.obs["cell_type"] == "type_0").to_numpy()
    other = (sub.obs["sample"].astype(str) != target).to_numpy()
    rate_missing = ds["is_admissible"].sel(sample=target).values[is_type0 & other].mean()
    rate_present = ds["is_admissible"].sel(sample="sample_01").values[is_type0 & other].mean()
    assert rate_missing < 0.2 < 0.6 < rate_present


def test_subsample_is_seeded_and_bounded(trained_model):
    data = trained_model._cell_data()
    idx = np.arange(600)
    a = outlier_cell_sample_pairs(trained_model.module, data, idx, subsample_size=10, seed=3)
    b = outlier_cell_sample_pairs(trained_model.module, data, idx, subsample_size=10, seed=3)
    c = outlier_cell_sample_pairs(trained_model.module, data, idx, subsample_size=10, seed=4)
    np.testing.assert_array_equal(a["log_probs"], b["log_probs"])
    assert not np.allclose(a["log_probs"], c["log_probs"])
    full = outlier_cell_sample_pairs(trained_model.module, data, idx, subsample_size=None)
    big = outlier_cell_sample_pairs(trained_model.module, data, idx, subsample_size=5000)
    np.testing.assert_allclose(full["log_probs"], big["log_probs"], rtol=1e-6)


def test_absent_sample_is_never_admissible(trained_model, sim_adata):
    sub = sim_adata[(sim_adata.obs["sample"].astype(str) != "sample_03").to_numpy()].copy()
    with pytest.warns(UserWarning, match="sample_03"):
        ds = trained_model.get_outlier_cell_sample_pairs(sub)
    assert not ds["is_admissible"].sel(sample="sample_03").values.any()


@pytest.mark.parametrize(
    "kwargs, match",
    [({"quantile_threshold": 1.5}, "quantile_threshold"), ({"subsample_size": 0}, "subsample_size"),
     ({"batch_size": 0}, "batch_size")],
)
def test_bad_arguments(trained_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        trained_model.get_outlier_cell_sample_pairs(**kwargs)
