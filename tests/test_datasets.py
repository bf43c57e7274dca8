"""Tests of :mod:`mrvi_pyro.datasets`: the simulated counts carry the documented planted truth."""

import hashlib
import json

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from mrvi_pyro.datasets import PRESETS, simulate

SAMPLE_LEVEL_COLUMNS = ["batch", "disease", "hidden_group", "age"]


@pytest.fixture(scope="module")
def adata():
    return simulate(seed=0)


@pytest.fixture(scope="module")
def log_normalised(adata):
    counts = np.asarray(adata.X, dtype=np.float64)
    return np.log1p(1e4 * counts / counts.sum(axis=1, keepdims=True))


def mean_difference(adata, log_normalised, cell_type, covariate, case_level, genes):
    """Per-gene mean log-normalised expression of ``case_level`` minus the rest, in one type."""
    gene_indices = adata.var_names.get_indexer(genes)
    of_type = (adata.obs["cell_type"] == cell_type).to_numpy()
    is_case = (adata.obs[covariate] == case_level).to_numpy()
    expression = log_normalised[:, gene_indices]
    return expression[of_type & is_case].mean(axis=0) - expression[of_type & ~is_case].mean(axis=0)


def sample_table(adata):
    return adata.obs.groupby("sample", observed=True)[SAMPLE_LEVEL_COLUMNS].first()


def test_layout_and_names(adata):
    assert adata.shape == (2000, 200)
    assert isinstance(adata.X, np.ndarray) and adata.X.dtype == np.float32
    np.testing.assert_array_equal(adata.X, np.round(adata.X))
    assert adata.X.min() >= 0
    assert adata.var_names[0] == "gene_000" and adata.var_names[-1] == "gene_199"
    assert adata.obs_names[0] == "cell_0000" and adata.obs_names[-1] == "cell_1999"
    expected_columns = ["sample", "batch", "cell_type", "disease", "hidden_group", "age"]
    assert list(adata.obs.columns) == expected_columns
    categories = {
        "sample": [f"sample_{i:02d}" for i in range(12)],
        "batch": ["batch_0", "batch_1"],
        "cell_type": ["type_0", "type_1", "type_2", "type_3"],
        "disease": ["healthy", "disease"],
        "hidden_group": ["A", "B"],
    }
    for column, expected in categories.items():
        assert isinstance(adata.obs[column].dtype, pd.CategoricalDtype)
        assert list(adata.obs[column].cat.categories) == expected
        assert set(adata.obs[column]) == set(expected), column
    assert adata.obs["age"].dtype == np.float64


def test_every_sample_and_cell_nonempty(adata):
    assert adata.obs["sample"].value_counts().min() >= 5
    assert np.asarray(adata.X.sum(axis=1)).min() >= 1


def test_zero_total_cells_get_one_count():
    tiny = simulate(n_cells=300, mean_library_size=0.5, seed=1)
    totals = np.asarray(tiny.X.sum(axis=1)).ravel()
    assert totals.min() == 1


def test_same_seed_same_data_different_seed_different():
    first, second, other = simulate(seed=3), simulate(seed=3), simulate(seed=4)
    np.testing.assert_array_equal(first.X, second.X)
    pd.testing.assert_frame_equal(first.obs, second.obs)
    assert first.uns["simulation"] == second.uns["simulation"]
    assert not np.array_equal(first.X, other.X)
    assert not first.obs["cell_type"].equals(other.obs["cell_type"])


def test_sparse_equals_dense_across_chunks():
    # 1000 genes make several generation chunks for 5000 cells.
    dense = simulate(n_cells=5000, n_genes=1000, n_samples=20, seed=2)
    sparse = simulate(n_cells=5000, n_genes=1000, n_samples=20, seed=2, sparse=True)
    assert sp.issparse(sparse.X) and sparse.X.format == "csr" and sparse.X.dtype == np.float32
    np.testing.assert_array_equal(sparse.X.toarray(), dense.X)
    pd.testing.assert_frame_equal(sparse.obs, dense.obs)


def test_sample_level_columns_constant_within_samples(adata):
    distinct_per_sample = adata.obs.groupby("sample", observed=True)[SAMPLE_LEVEL_COLUMNS].nunique()
    assert (distinct_per_sample == 1).all().all()


def test_batches_disease_and_hidden_group_balanced(adata):
    samples = sample_table(adata)
    sample_index = np.array([int(name.split("_")[1]) for name in samples.index])
    np.testing.assert_array_equal(samples["batch"].cat.codes.to_numpy(), sample_index % 2)
    assert (samples["disease"].value_counts() == 6).all()
    assert (samples["hidden_group"].value_counts() == 6).all()
    disease_by_batch = pd.crosstab(samples["batch"], samples["disease"])
    assert (disease_by_batch == 3).all().all()
    group_by_disease = pd.crosstab(samples["disease"], samples["hidden_group"])
    assert (group_by_disease == 3).all().all()
    group_by_batch = pd.crosstab(samples["batch"], samples["hidden_group"])
    assert (group_by_batch == 3).all().all()


@pytest.mark.parametrize(("n_samples", "n_batches"), [(10, 1), (14, 3), (40, 7)])
def test_balance_for_uneven_designs(n_samples, n_batches):
    adata = simulate(n_cells=5 * n_samples, n_samples=n_samples, n_batches=n_batches)
    samples = sample_table(adata)
    assert (samples["disease"].value_counts() == n_samples // 2).all()
    assert (samples["hidden_group"].value_counts() == n_samples // 2).all()
    pairs = [("batch", "disease"), ("batch", "hidden_group"), ("disease", "hidden_group")]
    for rows, columns in pairs:
        table = pd.crosstab(samples[rows], samples[columns])
        assert (table.max(axis=1) - table.min(axis=1)).max() <= 1, (rows, columns)


def test_de_genes_shifted_in_type_0_only(adata, log_normalised):
    truth = adata.uns["simulation"]
    signs = np.sign(truth["de_log_fold_changes"])
    assert truth["de_cell_type"] == "type_0" and truth["de_covariate"] == "disease"
    assert len(truth["de_genes"]) == 20 and set(signs) == {-1.0, 1.0}
    assert np.allclose(np.abs(truth["de_log_fold_changes"]), 1.5)
    genes = truth["de_genes"]
    affected = mean_difference(adata, log_normalised, "type_0", "disease", "disease", genes)
    np.testing.assert_array_equal(np.sign(affected), signs)
    assert np.mean(affected * signs) > 1.0
    unaffected = mean_difference(adata, log_normalised, "type_3", "disease", "disease", genes)
    assert abs(np.mean(unaffected * signs)) < 0.15
    assert np.mean(np.abs(unaffected)) < 0.25


def test_grouping_genes_shifted_in_type_1_only(adata, log_normalised):
    truth = adata.uns["simulation"]
    genes, signs = truth["grouping_genes"], np.sign(truth["grouping_log_fold_changes"])
    assert truth["grouping_cell_type"] == "type_1" and truth["grouping_covariate"] == "hidden_group"
    assert len(genes) == 20 and not set(genes) & set(truth["de_genes"])
    affected = mean_difference(adata, log_normalised, "type_1", "hidden_group", "B", genes)
    np.testing.assert_array_equal(np.sign(affected), signs)
    assert np.mean(affected * signs) > 1.0
    for cell_type in ["type_0", "type_2", "type_3"]:
        unaffected = mean_difference(adata, log_normalised, cell_type, "hidden_group", "B", genes)
        assert abs(np.mean(unaffected * signs)) < 0.15, cell_type
        assert np.mean(np.abs(unaffected)) < 0.25, cell_type


def test_age_is_a_sample_level_null_covariate(adata):
    assert adata.uns["simulation"]["null_covariate"] == "age"
    ages = sample_table(adata)["age"]
    assert ages.between(20, 80).all()
    assert ages.nunique() == len(ages)


def test_type_2_more_abundant_in_disease(adata):
    truth = adata.uns["simulation"]
    assert truth["da_cell_type"] == "type_2" and truth["da_covariate"] == "disease"
    assert truth["da_fold_change"] == 3.0
    proportions = pd.crosstab(adata.obs["sample"], adata.obs["cell_type"], normalize="index")
    disease = sample_table(adata)["disease"].reindex(proportions.index)
    type_2 = proportions["type_2"].groupby(disease, observed=True).mean()
    assert type_2["disease"] > 1.6 * type_2["healthy"]
    type_0 = proportions["type_0"].groupby(disease, observed=True).mean()
    assert type_0["disease"] < type_0["healthy"]


def test_batch_library_multiplier_visible(adata):
    multipliers = adata.uns["simulation"]["batch_library_multipliers"]
    assert multipliers == pytest.approx([1.0, 1.6])
    totals = pd.Series(np.asarray(adata.X.sum(axis=1)).ravel(), index=adata.obs_names)
    mean_totals = totals.groupby(adata.obs["batch"], observed=True).mean()
    assert mean_totals["batch_0"] == pytest.approx(1500, rel=0.1)
    assert mean_totals["batch_1"] / mean_totals["batch_0"] == pytest.approx(1.6, rel=0.1)


def test_cell_types_separated_by_markers(adata, log_normalised):
    markers = adata.uns["simulation"]["marker_genes"]
    for cell_type, genes in markers.items():
        expression = log_normalised[:, adata.var_names.get_indexer(genes)]
        of_type = (adata.obs["cell_type"] == cell_type).to_numpy()
        in_type = expression[of_type].mean(axis=0) - expression[~of_type].mean(axis=0)
        assert np.all(in_type > 0.3) and np.mean(in_type) > 1.0, cell_type


def test_truth_survives_h5ad_round_trip(adata, tmp_path):
    path = tmp_path / "simulated.h5ad"
    adata.write_h5ad(path)
    loaded = anndata.read_h5ad(path)
    written, read = adata.uns["simulation"], loaded.uns["simulation"]
    assert set(read) == set(written)
    for key, value in written.items():
        if isinstance(value, dict):
            assert {k: list(v) for k, v in read[key].items()} == value, key
        elif isinstance(value, list):
            assert list(read[key]) == value, key
        else:
            assert read[key] == value, key
    np.testing.assert_array_equal(loaded.X, adata.X)
    pd.testing.assert_frame_equal(loaded.obs, adata.obs)


def test_default_data_unchanged_by_the_effect_size_knobs():
    # Counts written by the simulator before presets and batch strength existed.
    adata = simulate(n_cells=240, n_genes=80, n_samples=4, seed=0)
    digest = hashlib.sha256(adata.X.tobytes()).hexdigest()
    assert digest == "74977d27cb6d83a624ca5c69bddbba1a646ef57d698cb31c9989365974f34bb3"
    truth = adata.uns["simulation"]
    assert truth["preset"] == "strong" and truth["batch_effect_scale"] == 1.0


def _digest(adata) -> str:
    """sha256 of the counts, every obs column and the planted truth."""
    h = hashlib.sha256()
    X = adata.X.toarray() if sp.issparse(adata.X) else adata.X
    h.update(np.ascontiguousarray(X).tobytes())
    for column in adata.obs.columns:
        values = adata.obs[column]
        h.update((values.cat.codes if hasattr(values, "cat") else values).to_numpy().tobytes())
    h.update(json.dumps(adata.uns["simulation"], sort_keys=True).encode())
    return h.hexdigest()


@pytest.mark.parametrize(("preset", "seed", "options", "expected"), [
    ("strong", 0, {}, "5caf55eabd7f3c67a8f53b932bf2df7be1e27f2c8346ceb5a6200079b0aa5eaa"),
    ("strong", 7, {"sparse": True}, "014fb04185c1381baa04f083b97919ec8630989fe37acd69d215e882bd1059ac"),
    ("weak", 0, {}, "2f2b93e4d0031a89cae009863f83825eff91e3b83e1a4ec8802018aa7612783d"),
    ("weak", 7, {"n_batches": 3, "n_cell_types": 5},
     "09a3af20eedf67ce209c6878c6ef1b8ba9b72cb5dad1df40b7fcf0b192e53789"),
])
def test_simulation_is_unchanged_by_its_split_into_steps(preset, seed, options, expected):
    """Digests of data simulated by ``simulate`` as one 228-line function (before its split into
    named steps): counts, obs and truth are bit for bit the same."""
    adata = simulate(n_cells=600, n_genes=120, n_samples=6, seed=seed, preset=preset, **options)
    assert _digest(adata) == expected


def test_weak_preset_sets_the_documented_effect_sizes():
    truth = simulate(n_cells=600, n_genes=300, preset="weak", seed=0).uns["simulation"]
    assert PRESETS["weak"]["de_log_fold_change"] == 0.5
    assert len(truth["de_genes"]) == 30 and len(truth["grouping_genes"]) == 30
    assert np.allclose(np.abs(truth["de_log_fold_changes"]), 0.5)
    assert np.allclose(np.abs(truth["grouping_log_fold_changes"]), 0.5)
    assert truth["da_fold_change"] == 1.8 and truth["preset"] == "weak"
    assert truth["batch_gene_effect_sd"] == pytest.approx(0.6)
    assert truth["batch_library_multipliers"] == pytest.approx([1.0, 1.6**1.5])
    overridden = simulate(n_cells=600, n_genes=300, preset="weak", n_de_genes=10, seed=0)
    assert len(overridden.uns["simulation"]["de_genes"]) == 10


def test_group_shift_is_separate_and_follows_de_shift_by_default():
    follows = simulate(de_log_fold_change=0.75, seed=0).uns["simulation"]
    assert np.allclose(np.abs(follows["grouping_log_fold_changes"]), 0.75)
    separate = simulate(de_log_fold_change=0.75, group_log_fold_change=0.0, seed=0)
    truth = separate.uns["simulation"]
    assert np.allclose(np.abs(truth["de_log_fold_changes"]), 0.75)
    assert np.allclose(truth["grouping_log_fold_changes"], 0.0)
    counts = np.asarray(separate.X, dtype=np.float64)
    log_normalised = np.log1p(1e4 * counts / counts.sum(axis=1, keepdims=True))
    genes = truth["grouping_genes"]
    unshifted = mean_difference(separate, log_normalised, "type_1", "hidden_group", "B", genes)
    assert np.mean(np.abs(unshifted)) < 0.25


def test_effect_size_scales_the_planted_shift():
    shifts = {}
    for lfc in (0.75, 1.5):
        adata = simulate(de_log_fold_change=lfc, seed=5)
        counts = np.asarray(adata.X, dtype=np.float64)
        log_normalised = np.log1p(1e4 * counts / counts.sum(axis=1, keepdims=True))
        truth = adata.uns["simulation"]
        signs = np.sign(truth["de_log_fold_changes"])
        difference = mean_difference(
            adata, log_normalised, "type_0", "disease", "disease", truth["de_genes"]
        )
        shifts[lfc] = np.mean(difference * signs)
    assert shifts[0.75] > 0.3
    assert shifts[1.5] / shifts[0.75] == pytest.approx(2.0, rel=0.3)


def test_batch_strength_zero_makes_means_batch_independent():
    def batch_gap(scale):
        adata = simulate(n_cells=4000, batch_effect_scale=scale, seed=2)
        counts = np.asarray(adata.X, dtype=np.float64)
        totals = counts.sum(axis=1)
        is_batch_1 = (adata.obs["batch"] == "batch_1").to_numpy()
        library_ratio = totals[is_batch_1].mean() / totals[~is_batch_1].mean()
        log_normalised = np.log1p(1e4 * counts / totals[:, None])
        of_type = (adata.obs["cell_type"] == "type_3").to_numpy()
        gene_gap = log_normalised[of_type & is_batch_1].mean(0) - log_normalised[
            of_type & ~is_batch_1
        ].mean(0)
        return adata.uns["simulation"], library_ratio, np.mean(np.abs(gene_gap))

    truth, library_ratio, gene_gap = batch_gap(0.0)
    assert truth["batch_library_multipliers"] == [1.0, 1.0]
    assert truth["batch_gene_effect_sd"] == 0.0
    assert library_ratio == pytest.approx(1.0, abs=0.05)
    _, default_ratio, default_gap = batch_gap(1.0)
    assert default_ratio == pytest.approx(1.6, rel=0.1)
    assert gene_gap < 0.25 * default_gap


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"n_samples": 2}, "n_samples must be even and at least 4"),
        ({"n_samples": 7}, "n_samples must be even and at least 4"),
        ({"n_samples": 4, "n_batches": 3}, "at least 2 \\* n_batches"),
        ({"n_batches": 0}, "n_batches must be at least 1"),
        ({"n_cell_types": 2}, "n_cell_types must be at least 3"),
        ({"n_cells": 50}, "n_cells must be at least 5 \\* n_samples = 60"),
        ({"n_genes": 100, "n_de_genes": 50}, "n_genes = 100 is too small"),
        ({"n_de_genes": -1}, "n_de_genes must be non-negative"),
        ({"n_cells": 100.5}, "n_cells must be an integer"),
        ({"de_log_fold_change": -1.0}, "de_log_fold_change is a magnitude"),
        ({"da_fold_change": 0.0}, "da_fold_change must be positive"),
        ({"mean_library_size": float("nan")}, "mean_library_size must be finite"),
        ({"mean_library_size": -5.0}, "mean_library_size must be positive"),
        ({"preset": "medium"}, "preset must be one of \\['strong', 'weak'\\]"),
        ({"group_log_fold_change": -0.5}, "group_log_fold_change is a magnitude"),
        ({"batch_effect_scale": -1.0}, "batch_effect_scale must be non-negative"),
        ({"batch_effect_scale": "big"}, "batch_effect_scale must be a real number"),
    ],
)
def test_invalid_arguments_raise(arguments, message):
    with pytest.raises(ValueError, match=message):
        simulate(**arguments)


def test_write_simulated_h5ad_equals_simulate_without_holding_the_counts(tmp_path):
    """Written block by block (several blocks here), the file holds what simulate returns."""
    from mrvi_pyro.datasets import CHUNK_ENTRIES, write_simulated_h5ad

    n_cells, n_genes = 2 * (CHUNK_ENTRIES // 1000) + 7, 1000  # three blocks of cells
    path = tmp_path / "cohort.h5ad"
    write_simulated_h5ad(path, n_cells, n_genes, n_samples=8, seed=5, preset="weak", block_entries=4096)
    expected = simulate(n_cells, n_genes, n_samples=8, seed=5, preset="weak", sparse=True)
    backed = anndata.read_h5ad(path, backed="r")
    assert backed.shape == (n_cells, n_genes) and backed.X.format == "csr"
    np.testing.assert_array_equal(backed.X[np.arange(0, n_cells, 97)].toarray(),
                                  expected.X[np.arange(0, n_cells, 97)].toarray())
    loaded = anndata.read_h5ad(path)
    assert (loaded.X != expected.X).nnz == 0
    pd.testing.assert_frame_equal(loaded.obs, expected.obs)
    assert list(loaded.var_names) == list(expected.var_names)
    assert list(loaded.uns["simulation"]["de_genes"]) == expected.uns["simulation"]["de_genes"]
    with pytest.raises(ValueError, match="already exists"):
        write_simulated_h5ad(path, n_cells, n_genes)
    with pytest.raises(ValueError, match="Unknown argument"):
        write_simulated_h5ad(tmp_path / "other.h5ad", n_cells, n_genes, n_sample=8)
    assert not (tmp_path / "other.h5ad").exists()
