"""Admissibility of cell-sample pairs (mrvi_pyro.admissibility and the facade method)."""

import numpy as np
import pytest
import torch

from mrvi_pyro import da
from mrvi_pyro.admissibility import nearest_component_log_density, outlier_cell_sample_pairs


def _pairwise_log_density(loc, scale):
    """(n, m) log N(mu_n; mu_m, sigma_m^2), literally, in float64."""
    loc, scale = loc.double(), scale.double()
    return torch.distributions.Normal(loc[None], scale[None]).log_prob(loc[:, None]).sum(-1)


def _brute_force_ball(loc, scale, samples, n_samples):
    """The scvi-tools ball rule written out densely: per sample the best component (self included),
    and under the own sample the best component other than self."""
    dens = _pairwise_log_density(loc, scale)
    best = np.full((len(loc), n_samples), -np.inf)
    for s in range(n_samples):
        mask = (samples == s).numpy()
        if mask.any():
            best[:, s] = dens[:, mask].max(1).values.numpy()
    loo = dens.clone().fill_diagonal_(-np.inf)
    loo[samples[:, None] != samples[None, :]] = -np.inf
    return best, loo.max(1).values.numpy()


def _brute_force_loo(loc, scale, samples, n_samples):
    """log q_s(u_n) with every cell a component and the cell's own component left out (float64)."""
    dens = _pairwise_log_density(loc, scale).fill_diagonal_(-np.inf)
    out = np.full((len(loc), n_samples), -np.inf)
    for s in range(n_samples):
        mask = (samples == s).numpy()
        if mask.any():
            count = mask.sum() - mask.astype(int)
            with np.errstate(divide="ignore", invalid="ignore"):
                out[:, s] = torch.logsumexp(dens[:, mask], 1).numpy() - np.log(count)
            out[count == 0, s] = np.nan
    return out


# ------------------------------------------------------------------------------------------
# ball rule (default)
# ------------------------------------------------------------------------------------------
def test_ball_matches_literal_rule_on_fifty_cells(trained_model):
    data = trained_model._cell_data()
    idx = np.arange(50)
    out = outlier_cell_sample_pairs(trained_model.module, data, idx, quantile_threshold=0.1)
    n_samples = trained_model.module.n_samples
    for key in ("log_probs", "log_ratios", "is_admissible"):
        assert out[key].shape == (50, n_samples)
    assert out["is_admissible"].dtype == bool
    loc, scale, samples = da.posterior_parameters(trained_model.module, data, idx)
    best, own_loo = _brute_force_ball(loc, scale, samples, n_samples)
    np.testing.assert_allclose(out["log_probs"], best, rtol=1e-5, atol=2e-3)
    # one global threshold: the quantile of the finite leave-one-out own-sample scores
    expected = np.quantile(own_loo[np.isfinite(own_loo)], 0.1)
    np.testing.assert_allclose(out["thresholds"], expected, rtol=1e-5, atol=2e-3)
    np.testing.assert_array_equal(out["is_admissible"], out["log_ratios"] > 0.0)
    # every cell is one of its own sample's components here, so it is admissible for its own sample
    assert out["is_admissible"][np.arange(50), out["sample_index"]].all()


@pytest.mark.parametrize("query_chunk, component_chunk", [(7, 16), (1, 8), (64, 4096)])
def test_chunked_equals_in_memory(query_chunk, component_chunk):
    gen = torch.Generator().manual_seed(0)
    n, n_samples = 90, 5
    loc = torch.randn(n, 4, generator=gen) * 2
    scale = 0.3 + torch.rand(n, 4, generator=gen)
    samples = torch.randint(0, n_samples - 1, (n,), generator=gen)  # the last sample has no cells
    components = da.select_components(samples, 12, seed=1)
    table = da.pack_components(loc, scale, samples, n_samples, components, row_size=8)
    best, own = nearest_component_log_density(loc, table, samples, own_position=table.position,
                                              query_chunk=query_chunk, component_chunk=component_chunk)
    # in memory: the dense (n, n_components) matrix, reduced at once
    dens = _pairwise_log_density(loc, scale)[:, components]
    comp_samples = samples[components]
    expected = np.full((n, n_samples), -np.inf)
    for s in range(n_samples - 1):
        expected[:, s] = dens[:, comp_samples == s].max(1).values.numpy()
    np.testing.assert_allclose(best.numpy(), expected, rtol=1e-5, atol=1e-4)
    same = (comp_samples[None, :] == samples[:, None]) & (torch.as_tensor(components)[None, :]
                                                           != torch.arange(n)[:, None])
    expected_own = torch.where(same, dens, -np.inf).max(1).values.numpy()
    np.testing.assert_allclose(own.numpy(), expected_own, rtol=1e-5, atol=1e-4)
    assert np.isneginf(best[:, -1].numpy()).all()


@pytest.mark.parametrize("flavor", ["ball", "mog"])
def test_rare_cell_type_is_admissible_only_where_present(trained_model, sim_adata, flavor):
    """type_3 (the type without planted sample effects, so that its cells of different samples
    overlap in u) kept in three samples only: its cells are inadmissible for the other nine samples and
    admissible for the three far more often; the common types stay admissible everywhere.

    How often the rare cells are admissible for the samples that have them depends on how tightly
    the model's u gathers them. Measured with this recipe (60 epochs, batch 256, architecture 3)
    over initialisations 0-4 with one thread (stop 31): ball 0.85, 0.41, 1.00, 0.99, 0.99; mog
    0.81, 0.75, 1.00, 0.98, 0.98, the lowest with initialisation 1 (the shared fixture; in the
    suite, with torch's default threads, it trains to ball 0.30, mog 0.73), and about as low when
    the three samples share a batch (ball 0.48, mog 0.82), so the batch is not the cause; for the
    nine other samples 0.000 in every case. Architecture 2 (initialisation 1) gave above 0.9."""
    obs = sim_adata.obs
    having = ["sample_00", "sample_01", "sample_02"]
    rare = (obs["cell_type"] == "type_3").to_numpy()
    sub = sim_adata[~(rare & ~obs["sample"].astype(str).isin(having).to_numpy())].copy()
    ds = trained_model.get_outlier_cell_sample_pairs(sub, flavor=flavor)
    assert ds.attrs["flavor"] == flavor
    adm = ds["is_admissible"].values
    has = np.isin(ds["sample"].values, having)
    is_rare = (sub.obs["cell_type"] == "type_3").to_numpy()
    assert adm[is_rare][:, ~has].mean() < 0.02
    assert adm[is_rare][:, has].mean() > {"ball": 0.2, "mog": 0.5}[flavor]
    # The common types include type_0, whose disease shift a 60-epoch model partly keeps in u:
    # measured 0.91-0.96 (minimum over samples 0.84-0.95) with architecture 3 over initialisations
    # 0-4, 0.83 (ball) with architecture 2, 0.93 with architecture 1.
    assert adm[~is_rare].mean() > 0.75 and adm[~is_rare].mean(0).min() > 0.65


def test_ball_threshold_is_global_and_quantile_moves_it(trained_model):
    loose = trained_model.get_outlier_cell_sample_pairs(quantile_threshold=0.01)
    strict = trained_model.get_outlier_cell_sample_pairs(quantile_threshold=0.5)
    for ds in (loose, strict):
        assert np.unique(ds["threshold"].values).size == 1
    assert strict["threshold"].values[0] > loose["threshold"].values[0]
    assert strict["is_admissible"].values.mean() < loose["is_admissible"].values.mean()
    np.testing.assert_array_equal(strict["log_probs"].values, loose["log_probs"].values)


# ------------------------------------------------------------------------------------------
# mixture rule (flavor="mog")
# ------------------------------------------------------------------------------------------
def test_mog_fifty_cells_match_brute_force(trained_model):
    data = trained_model._cell_data()
    idx = np.arange(50)
    with pytest.warns(UserWarning, match="single cell"):  # one sample has a single cell among the 50
        out = outlier_cell_sample_pairs(trained_model.module, data, idx, flavor="mog")
    n_samples = trained_model.module.n_samples
    loc, scale, samples = da.posterior_parameters(trained_model.module, data, idx)
    expected = _brute_force_loo(loc, scale, samples, n_samples)
    np.testing.assert_allclose(out["log_probs"], expected, rtol=1e-5, atol=1e-4)
    codes = out["sample_index"]
    singletons = [s for s in np.unique(codes) if (codes == s).sum() == 1]
    assert singletons and np.isnan(out["thresholds"][singletons]).all()
    for s in set(np.unique(codes)) - set(singletons):
        assert out["thresholds"][s] == pytest.approx(np.quantile(expected[codes == s, s], 0.05), rel=1e-5, abs=1e-4)
    with np.errstate(invalid="ignore"):
        assert np.array_equal(out["is_admissible"], out["log_ratios"] > 0.0)
    assert not out["is_admissible"][:, singletons].any()


def test_mog_own_sample_rate_matches_quantile(trained_model):
    ds = trained_model.get_outlier_cell_sample_pairs(quantile_threshold=0.1, flavor="mog")
    samples = trained_model.adata.obs["sample"].astype(str).to_numpy()
    own = ds["is_admissible"].values[np.arange(len(samples)), [ds["sample"].values.tolist().index(s) for s in samples]]
    # per sample, a fraction of about 1 - quantile_threshold of its own cells pass
    rates = [own[samples == s].mean() for s in np.unique(samples)]
    assert np.all(np.abs(np.array(rates) - 0.9) < 0.03)
    assert ds["is_admissible"].values.mean() > 0.6


# ------------------------------------------------------------------------------------------
# shared behaviour
# ------------------------------------------------------------------------------------------
def test_facade_on_fifty_cells_does_not_modify_adata(trained_model, sim_adata):
    small = sim_adata[:50].copy()
    before = (small.obs.copy(), dict(small.obsm), dict(small.uns), small.X.copy())
    ds = trained_model.get_outlier_cell_sample_pairs(small, batch_size=16)
    assert set(ds.data_vars) >= {"log_probs", "log_ratios", "is_admissible", "threshold"}
    assert ds["is_admissible"].dims == ("cell_name", "sample")
    assert list(ds["sample"].values) == trained_model.registry.sample_categories
    assert list(ds["cell_name"].values) == list(small.obs_names)
    assert small.obs.equals(before[0]) and dict(small.obsm) == before[1]
    assert small.uns.keys() == before[2].keys()
    assert (small.X != before[3]).nnz == 0 if hasattr(small.X, "nnz") else np.array_equal(small.X, before[3])


@pytest.mark.parametrize("flavor", ["ball", "mog"])
def test_subsample_is_seeded_and_bounded(trained_model, flavor):
    data = trained_model._cell_data()
    idx = np.arange(600)
    a = outlier_cell_sample_pairs(trained_model.module, data, idx, flavor=flavor, subsample_size=10, seed=3)
    b = outlier_cell_sample_pairs(trained_model.module, data, idx, flavor=flavor, subsample_size=10, seed=3)
    c = outlier_cell_sample_pairs(trained_model.module, data, idx, flavor=flavor, subsample_size=10, seed=4)
    np.testing.assert_array_equal(a["log_probs"], b["log_probs"])
    assert not np.allclose(a["log_probs"], c["log_probs"])
    full = outlier_cell_sample_pairs(trained_model.module, data, idx, flavor=flavor, subsample_size=None)
    big = outlier_cell_sample_pairs(trained_model.module, data, idx, flavor=flavor, subsample_size=5000)
    np.testing.assert_allclose(full["log_probs"], big["log_probs"], rtol=1e-6)
    # fewer components: a cell's nearest component can only be farther (ball)
    if flavor == "ball":
        assert (a["log_probs"] <= full["log_probs"] + 1e-4).all()


def test_absent_sample_is_never_admissible(trained_model, sim_adata):
    sub = sim_adata[(sim_adata.obs["sample"].astype(str) != "sample_03").to_numpy()].copy()
    with pytest.warns(UserWarning, match="sample_03"):
        ds = trained_model.get_outlier_cell_sample_pairs(sub)
    assert np.isneginf(ds["log_probs"].sel(sample="sample_03").values).all()
    assert not ds["is_admissible"].sel(sample="sample_03").values.any()


@pytest.mark.parametrize(
    "kwargs, match",
    [({"quantile_threshold": 1.5}, "quantile_threshold"), ({"subsample_size": 0}, "subsample_size"),
     ({"batch_size": 0}, "batch_size"), ({"flavor": "knn"}, "flavor must be one of")],
)
def test_bad_arguments(trained_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        trained_model.get_outlier_cell_sample_pairs(**kwargs)


def test_ball_needs_two_cells_in_some_sample(trained_model, sim_adata):
    one_each = sim_adata[sim_adata.obs.reset_index().groupby("sample", observed=True).head(1).index.to_numpy()].copy()
    with pytest.raises(ValueError, match="No sample has two cells"):
        trained_model.get_outlier_cell_sample_pairs(one_each)
