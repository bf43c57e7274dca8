"""Registration, validation of bad input, minibatches and sample_info."""

import json

import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import mrvi_pyro
from mrvi_pyro import MRVI
from mrvi_pyro.data import REGISTRY_KEY, CellData, get_registry


@pytest.fixture
def raw():
    return mrvi_pyro.datasets.simulate(n_cells=200, n_genes=60, n_samples=4, seed=3, n_de_genes=10, n_group_genes=10)


def test_setup_writes_only_the_registry(raw):
    before_obs, before_x = raw.obs.copy(), raw.X.copy()
    MRVI.setup_anndata(raw, sample_key="sample", batch_key="batch", labels_key="cell_type")
    assert set(raw.uns) == {"simulation", REGISTRY_KEY}
    pd.testing.assert_frame_equal(raw.obs, before_obs)
    np.testing.assert_array_equal(raw.X, before_x)
    registry = get_registry(raw)
    assert registry.sample_categories == list(raw.obs["sample"].cat.categories)
    assert registry.label_categories == ["type_0", "type_1", "type_2", "type_3"]
    assert json.loads(raw.uns[REGISTRY_KEY])["batch_key"] == "batch"


def test_registry_survives_h5ad(raw, tmp_path):
    import anndata

    MRVI.setup_anndata(raw, sample_key="sample")
    raw.write_h5ad(tmp_path / "a.h5ad")
    assert get_registry(anndata.read_h5ad(tmp_path / "a.h5ad")) == get_registry(raw)


@pytest.mark.parametrize("key,argument", [("donor", "sample_key"), ("site", "batch_key"), ("ct", "labels_key")])
def test_missing_columns(raw, key, argument):
    kwargs = {"sample_key": "sample", argument: key}
    with pytest.raises(ValueError, match=rf"{argument} '{key}' is not a column of adata.obs"):
        MRVI.setup_anndata(raw, **kwargs)
    assert REGISTRY_KEY not in raw.uns


def test_missing_layer(raw):
    with pytest.raises(ValueError, match="Layer 'counts' not found"):
        MRVI.setup_anndata(raw, sample_key="sample", layer="counts")


@pytest.mark.parametrize("fmt", ["dense", "csr", "csc"])
@pytest.mark.parametrize("bad,message", [
    (-1.0, "negative values"), (0.5, "non-integer values"), (np.nan, "NaN or infinite"), (np.inf, "NaN or infinite"),
])
def test_bad_counts(raw, fmt, bad, message):
    x = raw.X.copy()
    x[3, 5] = bad
    raw.X = x if fmt == "dense" else getattr(sparse, f"{fmt}_matrix")(x)
    before = raw.X.copy()
    with pytest.raises(ValueError, match=message):
        MRVI.setup_anndata(raw, sample_key="sample")
    def dense(m):
        return m.toarray() if sparse.issparse(m) else m

    assert np.array_equal(dense(raw.X), dense(before), equal_nan=True)


def test_zero_count_cells_are_counted(raw):
    raw.X[[2, 7, 9]] = 0
    with pytest.raises(ValueError, match=r"3 cell\(s\) have zero total counts.*min_counts=1"):
        MRVI.setup_anndata(raw, sample_key="sample")


def test_needs_two_samples(raw):
    raw.obs["one"] = "s"
    with pytest.raises(ValueError, match="1 sample.*at least 2"):
        MRVI.setup_anndata(raw, sample_key="one")


def test_missing_values_in_key(raw):
    raw.obs["sample"] = raw.obs["sample"].astype(object)
    raw.obs.iloc[0, raw.obs.columns.get_loc("sample")] = None
    with pytest.raises(ValueError, match="missing value"):
        MRVI.setup_anndata(raw, sample_key="sample")


def test_not_set_up(raw):
    with pytest.raises(ValueError, match="setup_anndata"):
        MRVI(raw)


@pytest.mark.parametrize("fmt", ["csr", "csc"])
def test_sparse_minibatches_equal_dense(raw, fmt):
    MRVI.setup_anndata(raw, sample_key="sample", batch_key="batch")
    dense = CellData(raw, get_registry(raw))
    other = raw.copy()
    other.X = getattr(sparse, f"{fmt}_matrix")(raw.X)
    data = CellData(other, get_registry(raw))
    idx = np.array([17, 3, 150, 3, 99])
    for key, value in dense.batch(idx).items():
        if value is not None:
            np.testing.assert_array_equal(value.numpy(), data.batch(idx)[key].numpy())
    assert sparse.isspmatrix(other.X) and other.X.format == fmt  # the user's matrix is untouched


def test_layer_is_read(raw):
    raw.layers["counts"] = raw.X.copy()
    raw.X = np.log1p(raw.X)  # normalised X must not matter
    MRVI.setup_anndata(raw, sample_key="sample", layer="counts")
    data = CellData(raw, get_registry(raw))
    np.testing.assert_array_equal(data.counts(np.arange(5)).numpy(), raw.layers["counts"][:5])


def test_prediction_data_must_match(raw):
    MRVI.setup_anndata(raw, sample_key="sample", batch_key="batch")
    registry = get_registry(raw)
    with pytest.raises(ValueError, match="same genes in the same order"):
        CellData(raw[:, ::-1].copy(), registry)
    other = raw.copy()
    other.obs["sample"] = other.obs["sample"].cat.rename_categories(lambda c: c + "_new")
    with pytest.raises(ValueError, match=r"adata.obs\['sample'\] has categories the model was not trained on"):
        CellData(other, registry)
    # a subset with fewer samples is fine
    subset = raw[raw.obs["sample"].isin(["sample_00", "sample_01"])].copy()
    assert set(CellData(subset, registry).sample_index) == {0, 1}


def test_sample_info(raw):
    raw.obs["site_note"] = raw.obs["batch"].astype(str)
    # a covariate with an annotation error in one sample
    raw.obs["sex"] = np.where(raw.obs["sample"].cat.codes % 2 == 0, "F", "M")
    raw.obs.iloc[0, raw.obs.columns.get_loc("sex")] = "M" if raw.obs["sex"].iloc[0] == "F" else "F"
    MRVI.setup_anndata(raw, sample_key="sample", batch_key="batch")
    with pytest.warns(UserWarning, match=r"\['sex'\] are constant within most samples"):
        model = MRVI(raw)
    info = model.sample_info
    assert list(info.index) == ["sample_00", "sample_01", "sample_02", "sample_03"]
    assert {"disease", "hidden_group", "age", "batch", "site_note", "n_cells"} <= set(info.columns)
    assert "sex" not in info and "cell_type" not in info
    assert info["n_cells"].sum() == raw.n_obs
    assert list(info["disease"].cat.categories) == ["healthy", "disease"]
    for sample, row in info.iterrows():
        assert (raw.obs.loc[raw.obs["sample"] == sample, "age"] == row["age"]).all()
    # update_sample_info picks up new sample-level columns
    raw.obs["site_id"] = raw.obs["batch"].cat.codes
    model.update_sample_info()
    assert "site_id" in model.sample_info


@pytest.mark.parametrize("fmt", ["dense", "csr"])
def test_backed_anndata_minibatches(raw, tmp_path, fmt):
    import anndata

    if fmt == "csr":
        raw.X = sparse.csr_matrix(raw.X)
    raw.write_h5ad(tmp_path / "a.h5ad")
    backed = anndata.read_h5ad(tmp_path / "a.h5ad", backed="r")
    MRVI.setup_anndata(backed, sample_key="sample", batch_key="batch")
    data = CellData(backed, get_registry(backed))
    idx = np.array([17, 3, 150, 3, 99])
    dense = raw.X.toarray() if fmt == "csr" else raw.X
    np.testing.assert_array_equal(data.counts(idx).numpy(), dense[idx])
    model = MRVI(backed, n_latent=4, n_latent_u=2)
    model.train(max_epochs=1, progress_bar=False)
    assert np.isfinite(model.history["elbo_train"]).all()


def _backed_csr(raw, tmp_path, empty_row: bool = False, **write_kwargs):
    import anndata

    raw = raw.copy()
    dense = np.asarray(raw.X, dtype=np.float32).copy()
    if empty_row:
        dense[5] = 0  # the reader handles rows without entries (CellData refuses such cells)
    raw.X = sparse.csr_matrix(dense)
    raw.write_h5ad(tmp_path / "a.h5ad", **write_kwargs)
    return dense, anndata.read_h5ad(tmp_path / "a.h5ad", backed="r")


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_backed_csr_rows_match_the_matrix(raw, tmp_path, compression):
    from mrvi_pyro.data import BackedCSRRows

    dense, backed = _backed_csr(raw, tmp_path, empty_row=True, compression=compression)
    assert BackedCSRRows.supported(backed.X) and not BackedCSRRows.supported(sparse.csr_matrix(dense))
    reader = BackedCSRRows(backed.X.group)
    rng = np.random.default_rng(0)
    for rows in (np.arange(200), np.array([5]), np.array([4, 5, 6, 7, 50, 51, 199]), np.array([], dtype=np.int64),
                 np.sort(rng.choice(200, 64, replace=False))):
        got = reader(rows)
        assert got.dtype == np.float32 and got.shape == (len(rows), dense.shape[1])
        np.testing.assert_array_equal(got, dense[rows])


def test_read_ahead_yields_the_batches_in_order(raw, tmp_path, monkeypatch):
    monkeypatch.setenv("MRVI_PYRO_READ_AHEAD", "1")  # the worker, whatever the cores and threads
    dense, backed = _backed_csr(raw, tmp_path)
    MRVI.setup_anndata(backed, sample_key="sample", batch_key="batch")
    data = CellData(backed, get_registry(backed))
    assert data.backed
    lists = [np.array([3, 1, 3]), np.array([199, 0]), np.array([7])]
    batches = list(data.read_ahead(lists))
    assert len(batches) == 3
    for cells, batch in zip(lists, batches):
        np.testing.assert_array_equal(batch["x"].numpy(), dense[cells])
        np.testing.assert_array_equal(batch["sample_index"].numpy(), data.sample_index[cells])
    reads = data.read_ahead(iter(lists))
    next(reads)
    reads.close()  # leaving early waits for the pending read and stops the thread


def test_backed_training_equals_in_memory_training(raw, tmp_path, monkeypatch):
    """Reading the counts from disk (with read-ahead) changes nothing in what is learned."""
    monkeypatch.setenv("MRVI_PYRO_READ_AHEAD", "1")
    dense, backed = _backed_csr(raw, tmp_path)
    memory = raw.copy()
    memory.X = dense
    results = []
    for adata in (memory, backed):
        MRVI.setup_anndata(adata, sample_key="sample", batch_key="batch")
        model = MRVI(adata, n_latent=4, n_latent_u=2, seed=0)
        model.train(max_epochs=2, batch_size=64, seed=0, progress_bar=False)
        results.append(model)
    np.testing.assert_array_equal(results[0].history["elbo_validation"], results[1].history["elbo_validation"])
    for (name, a), b in zip(results[0].module.state_dict().items(), results[1].module.state_dict().values()):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)


def test_a_writable_backed_file_is_read_in_place_and_rechecked(raw, tmp_path, monkeypatch):
    """Opened r+, the file is locked against a second reader and its counts may change: no
    read-ahead worker, and the fingerprint is checked again on each use."""
    import anndata

    monkeypatch.setenv("MRVI_PYRO_READ_AHEAD", "1")  # asked for, but a writable file is read in place
    dense, read_only = _backed_csr(raw, tmp_path)
    read_only.file.close()
    writable = anndata.read_h5ad(tmp_path / "a.h5ad", backed="r+")
    MRVI.setup_anndata(writable, sample_key="sample", batch_key="batch")
    data = CellData(writable, get_registry(writable))
    assert data.backed and not data._read_only
    batches = list(data.read_ahead([np.array([2, 0]), np.array([9])]))
    np.testing.assert_array_equal(batches[0]["x"].numpy(), dense[[2, 0]])
    assert data.is_current(writable)
