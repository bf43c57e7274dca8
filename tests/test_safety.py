"""Issue 11: no lost user data, no silent wrong answers. One test per numbered item."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from scipy import sparse

import mrvi_pyro
from mrvi_pyro import MRVI, TrainingDivergedError
from mrvi_pyro.cli import main

UNTRAINED = "ignore:This model has not been trained"


def _tiny(n_cells=120, seed=1, **kwargs):
    adata = mrvi_pyro.datasets.simulate(n_cells=n_cells, n_genes=20, n_samples=4, seed=seed, n_de_genes=4,
                                        n_group_genes=4, **kwargs)
    MRVI.setup_anndata(adata, sample_key="sample", batch_key="batch")
    return adata


def _model(adata, epochs=1):
    model = MRVI(adata, n_latent=4, n_latent_u=2, encoder_n_hidden=16, seed=0)
    if epochs:
        model.train(max_epochs=epochs, batch_size=64, progress_bar=False)
    return model


@pytest.fixture(scope="module")
def tiny_model():
    return _model(_tiny())


def _user_folder(path):
    path.mkdir()
    (path / "notes.txt").write_text("precious")
    return path


# ----- data loss ------------------------------------------------------------------------------
def test_1_zarr_writers_refuse_a_non_empty_target_and_keep_it(tiny_model, tmp_path):
    folder = _user_folder(tmp_path / "myproject")
    with pytest.raises(ValueError, match="already exists and is not empty; pass overwrite=True"):
        tiny_model.differential_expression(sample_cov_keys=["disease"], store_lfc=True, mc_samples=2,
                                           zarr_path=folder)
    with pytest.raises(ValueError, match="is not a zarr store"):  # overwrite never deletes foreign files
        tiny_model.differential_expression(sample_cov_keys=["disease"], store_lfc=True, mc_samples=2,
                                           zarr_path=folder, overwrite=True)
    with pytest.raises(ValueError, match="already exists and is not empty"):
        tiny_model.get_local_sample_distances(zarr_path=folder)
    with pytest.raises(ValueError, match="is not a zarr store"):
        tiny_model.get_local_sample_distances(zarr_path=folder, overwrite=True)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"] and (folder / "notes.txt").read_text() == "precious"
    # a store we wrote is replaced as a whole with overwrite=True, and nothing is left beside it
    store = tmp_path / "de.zarr"
    tiny_model.differential_expression(sample_cov_keys=["disease"], store_lfc=True, mc_samples=2, zarr_path=store)
    again = tiny_model.differential_expression(sample_cov_keys=["age"], store_lfc=True, mc_samples=2,
                                               zarr_path=store, overwrite=True)
    assert list(again["covariate"].values) == ["age"] and np.isfinite(again["lfc"].values).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["de.zarr", "myproject"]
    distances = tiny_model.get_local_sample_distances(zarr_path=tmp_path / "d.zarr")
    assert distances.attrs["zarr_path"] == str(tmp_path / "d.zarr") and distances["cell"].shape == (120, 4, 4)


def _write_data(adata, path):
    raw = adata.copy()
    del raw.uns["_mrvi_pyro"]
    raw.write_h5ad(path)
    return path


def _fit(data, out, *extra):
    return main(["fit", str(data), "--sample-key", "sample", "--out", str(out), "--max-epochs", "1", "--quiet",
                 "--batch-size", "64", *extra])


@pytest.fixture(scope="module")
def fitted_run(tmp_path_factory):
    """``(data file, run directory)`` of one ``mrvi-pyro fit``; tests work on copies of the run."""
    folder = tmp_path_factory.mktemp("fitted")
    data = _write_data(_tiny(), folder / "data.h5ad")
    assert _fit(data, folder / "run") == 0
    return data, folder / "run"


def _copy_run(fitted_run, tmp_path):
    import shutil

    return fitted_run[0], Path(shutil.copytree(fitted_run[1], tmp_path / "run"))


def test_2_fit_refuses_a_trained_run_and_overwrite_clears_its_outputs(fitted_run, tmp_path, capsys):
    data, run = _copy_run(fitted_run, tmp_path)
    assert main(["analyze", str(run), "--groupby", "cell_type", "--quiet"]) == 0
    weights = (run / "model" / "model.pt").read_bytes()
    capsys.readouterr()
    assert _fit(data, run, "--seed", "5") == 2
    captured = capsys.readouterr()
    assert "already exists and is not empty; pass --overwrite" in captured.err and "epochs in" not in captured.out
    assert (run / "model" / "model.pt").read_bytes() == weights
    assert _fit(data, run, "--seed", "5", "--overwrite") == 0
    assert (run / "model" / "model.pt").read_bytes() != weights
    assert not (run / "report.html").exists() and not (run / "results").exists()  # old analysis gone
    (run / "mine.txt").write_text("x")
    assert _fit(data, run, "--overwrite") == 2
    assert "does not write (['mine.txt'])" in capsys.readouterr().err and (run / "mine.txt").exists()


_KILL_DURING_SAVE = """
import os, signal, sys, torch
import mrvi_pyro
from mrvi_pyro import MRVI, io
adata = mrvi_pyro.datasets.simulate(n_cells=60, n_genes=20, n_samples=4, seed=2, n_de_genes=4, n_group_genes=4)
MRVI.setup_anndata(adata, sample_key="sample")
model = MRVI(adata, n_latent=4, n_latent_u=2, encoder_n_hidden=16, seed=3)
save = torch.save
def save_then_die(obj, path):
    save(obj, path)
    if sys.argv[2] == "after_weights":
        os.kill(os.getpid(), signal.SIGKILL)
    with open(path, "r+b") as file:  # die half-way through the weights
        file.truncate(100)
    os.kill(os.getpid(), signal.SIGKILL)
io.torch.save = save_then_die
model.save(sys.argv[1], overwrite=True)
"""


def test_3_a_kill_during_save_leaves_the_previous_model(tmp_path, moment="inside_weights"):
    adata = _tiny()
    old = _model(adata, epochs=0)
    old.save(tmp_path / "m")
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}
    result = subprocess.run([sys.executable, "-c", _KILL_DURING_SAVE, str(tmp_path / "m"), moment],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == -9, result.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before
    loaded = MRVI.load(tmp_path / "m", adata=adata)
    for key, value in old.module.state_dict().items():
        torch.testing.assert_close(loaded.module.state_dict()[key], value)


def test_3_an_interrupted_fit_leaves_the_previous_run(fitted_run, tmp_path, monkeypatch, capsys):
    data, run = _copy_run(fitted_run, tmp_path)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    outputs = {name: value for name, value in before.items() if name.parts[0] != "checkpoint"}

    def save_model_then_stop(self, *args, **kwargs):
        original_save(self, *args, **kwargs)  # model.json written, fit.json not yet
        raise KeyboardInterrupt

    original_save = MRVI.save
    monkeypatch.setattr(MRVI, "save", save_model_then_stop)
    assert _fit(data, run, "--overwrite", "--seed", "4") == 130  # item 14: Ctrl-C
    err = capsys.readouterr().err
    assert "earlier outputs in" in err and err.rstrip().endswith("--overwrite --seed 4 --resume")
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert {name: value for name, value in after.items() if name.parts[0] != "checkpoint"} == outputs
    # the checkpoint is now the interrupted fit's (seed 4), ready for --resume
    assert json.loads((run / "checkpoint" / "checkpoint.json").read_text())["identity"]["training"]["seed"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging left


def test_4_overwriting_a_save_drops_its_old_anndata(tmp_path):
    adata = _tiny()
    model = _model(adata, epochs=0)
    model.save(tmp_path / "m", save_anndata=True)
    model.save(tmp_path / "m", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.json", "model.pt"]
    with pytest.raises(ValueError, match="has no saved AnnData"):
        MRVI.load(tmp_path / "m")
    (tmp_path / "m" / "mine.txt").write_text("x")
    with pytest.raises(ValueError, match=r"does not write \(\['mine.txt'\]\)"):
        model.save(tmp_path / "m", overwrite=True)
    assert (tmp_path / "m" / "mine.txt").exists()


def test_5_key_added_never_replaces_a_user_column(tiny_model):
    adata = tiny_model.adata
    samples = adata.obs["sample"].copy()
    for key in ("sample", "cell_type"):
        with pytest.raises(ValueError, match=f"key_added='{key}'"):
            tiny_model.cluster_cells_by_sample_distances(n_clusters=2, key_added=key)
    pd.testing.assert_series_equal(adata.obs["sample"], samples)
    for _ in range(2):  # our own column may be rewritten
        tiny_model.cluster_cells_by_sample_distances(n_clusters=2, key_added="mrvi_test_cluster")
    assert adata.obs["mrvi_test_cluster"].nunique() == 2
    del adata.obs["mrvi_test_cluster"], adata.uns["mrvi_test_cluster"]


# ----- silent wrong answers -------------------------------------------------------------------
def _log_normalise(x):
    return np.log1p(x / x.sum(1, keepdims=True) * 1e4).astype(x.dtype)


def test_6_counts_are_checked_wherever_data_enter(fitted_run, tmp_path, tiny_model, capsys):
    adata = _tiny()
    model = _model(adata, epochs=0)
    adata.X = _log_normalise(adata.X)  # after setup, before training
    with pytest.raises(ValueError, match="non-integer values"):
        model.train(max_epochs=1, progress_bar=False)
    other = tiny_model.adata.copy()
    other.X = _log_normalise(other.X)
    with pytest.raises(ValueError, match="non-integer values"):
        tiny_model.get_latent_representation(other)
    with pytest.raises(ValueError, match="non-integer values"):
        tiny_model.differential_expression(other, sample_cov_keys=["disease"])
    tiny_model.save(tmp_path / "m")
    with pytest.raises(ValueError, match="non-integer values"):
        MRVI.load(tmp_path / "m", adata=other)
    _write_data(other, tmp_path / "normalised.h5ad")
    assert main(["analyze", str(fitted_run[1]), "--data", str(tmp_path / "normalised.h5ad"),
                 "--groupby", "cell_type", "--quiet"]) == 2
    assert "non-integer values" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [np.float32, np.int64])
def test_7_counts_changed_after_training_are_refused_whatever_the_dtype(dtype):
    adata = _tiny()
    adata.X = adata.X.astype(dtype)
    model = _model(adata)
    model.get_latent_representation()
    adata.X[:] = (adata.X * 2).astype(dtype)  # in place: still integer counts, but not the trained ones
    with pytest.raises(ValueError, match="changed after the model first read it"):
        model.get_latent_representation()


def test_8_mixed_type_sample_ids_are_refused():
    adata = _tiny()
    adata.obs["donor"] = pd.Series([1, "1", 2, "2"] * 30, index=adata.obs_names, dtype=object)
    with pytest.raises(ValueError, match=r"read the same as text: 1 \(int\), '1' \(str\)"):
        MRVI.setup_anndata(adata, sample_key="donor")


@pytest.mark.filterwarnings(UNTRAINED)
def test_9_bad_arguments_are_value_errors(tiny_model):
    adata = tiny_model.adata
    for kwargs, name in [({"clip_norm": -1}, "clip_norm"), ({"clip_norm": 0}, "clip_norm"), ({"lr": 0}, "lr"),
                         ({"early_stopping_patience": 0}, "early_stopping_patience"), ({"batch_size": 0}, "batch_size"),
                         ({"max_epochs": 1.5}, "max_epochs"), ({"train_size": 0}, "train_size")]:
        model = _model(adata, epochs=0)
        before = [p.detach().clone() for p in model.module.parameters()]
        with pytest.raises(ValueError, match=f"^{name} must be"):
            model.train(**{"max_epochs": 1, **kwargs}, progress_bar=False)
        assert all(torch.equal(a, b) for a, b in zip(before, model.module.parameters()))
    cases = [
        (lambda: tiny_model.differential_expression(sample_cov_keys=["disease"], delta=-0.1), "delta must be"),
        (lambda: tiny_model.differential_expression(sample_cov_keys=["disease"], eps_lfc=0), "eps_lfc must be"),
        (lambda: tiny_model.differential_expression(sample_cov_keys=["disease"], batch_size=0), "batch_size must"),
        (lambda: tiny_model.differential_abundance(sample_cov_keys=["disease"], batch_size=-1), "batch_size must"),
        (lambda: tiny_model.get_latent_representation(batch_size=0), "batch_size must"),
        (lambda: tiny_model.get_local_sample_representation(batch_size=0), "batch_size must"),
        (lambda: tiny_model.get_outlier_cell_sample_pairs(batch_size=0), "batch_size must"),
        (lambda: tiny_model.get_latent_representation(indices=np.ones(5, dtype=bool)), "one entry per cell"),
        (lambda: tiny_model.get_latent_representation(indices=[0.0, 1.5]), "must be integers"),
        (lambda: tiny_model.get_normalized_expression(library_size=0), "library_size must be"),
        (lambda: tiny_model.get_normalized_expression(library_size=-1e4), "library_size must be"),
        (lambda: MRVI(adata, n_latent=0), "n_latent must be"),
        (lambda: MRVI(adata, encoder_n_hidden=2.5), "encoder_n_hidden must be"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_10_a_diverged_model_refuses_analyses_also_after_save_and_load(tmp_path):
    adata = _tiny()
    model = _model(adata)
    with torch.no_grad():
        model.module.decoder.linear.bias[3] = float("nan")
    with pytest.raises(TrainingDivergedError):
        model.train(max_epochs=1, progress_bar=False)
    with pytest.raises(ValueError, match="diverged"):
        model.get_latent_representation()
    model.save(tmp_path / "m")
    with pytest.raises(ValueError, match="diverged"):
        MRVI.load(tmp_path / "m", adata=adata).differential_abundance(sample_cov_keys=["disease"])


def test_11_analyses_of_an_untrained_model_warn(tiny_model):
    model = _model(tiny_model.adata, epochs=0)
    with pytest.warns(UserWarning, match="has not been trained"):
        model.get_latent_representation()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_model.get_latent_representation()


def test_12_a_reassigned_sample_column_is_read_again():
    adata = _tiny()
    model = _model(adata)
    before = model.get_latent_representation(give_z=True)
    swap = {"sample_00": "sample_01", "sample_01": "sample_00"}
    adata.obs["sample"] = adata.obs["sample"].astype(str).replace(swap).astype("category")
    after = model.get_latent_representation(give_z=True)
    np.testing.assert_array_equal(after, model.get_latent_representation(adata.copy(), give_z=True))  # uncached
    assert not np.allclose(before, after)
    assert int(model.sample_info.loc["sample_00", "n_cells"]) == int((adata.obs["sample"] == "sample_00").sum())


# ----- command line ---------------------------------------------------------------------------
def test_13_fit_checks_its_output_before_training(fitted_run, tmp_path, capsys):
    data = fitted_run[0]
    (tmp_path / "afile").write_text("x")
    for out, message in [(tmp_path / "afile", "is an existing file"),
                         (tmp_path / "afile" / "run", "cannot be created")]:
        assert _fit(data, out) == 2
        captured = capsys.readouterr()
        assert message in captured.err and len(captured.err.strip().splitlines()) == 1
        assert "epochs in" not in captured.out  # refused before training
    assert (tmp_path / "afile").read_text() == "x"


def test_15_a_second_analyze_into_the_same_directory_is_refused(fitted_run, tmp_path, capsys):
    _, run = _copy_run(fitted_run, tmp_path)
    (run / ".mrvi_pyro.lock").write_text(f"{os.getpid()} analyze\n")  # a live process holds it
    assert main(["analyze", str(run), "--groupby", "cell_type", "--quiet"]) == 2
    assert "another mrvi-pyro process (pid" in capsys.readouterr().err and not (run / "report.html").exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run / ".mrvi_pyro.lock").write_text(f"{dead.stdout.strip()} analyze\n")  # left by a killed run
    assert main(["analyze", str(run), "--groupby", "cell_type", "--quiet"]) == 0
    assert not (run / ".mrvi_pyro.lock").exists()
    assert main(["analyze", str(run), "--groupby", "cell_type", "--quiet"]) == 2  # outputs exist
    assert "already holds analysis outputs" in capsys.readouterr().err


def test_16_hostile_or_damaged_metadata_gives_one_line_errors(tmp_path, tiny_model, capsys):
    tiny_model.save(tmp_path / "m")
    meta_file = tmp_path / "m" / "model.json"
    good = json.loads(meta_file.read_text())
    for change, message in [({"encoder_n_hidden": 10**6}, "do not fit the configuration"),
                            ({"n_latent": "30"}, "n_latent must be an integer"),
                            ({"u_prior_mixture": "yes"}, "u_prior_mixture must be True or False")]:
        meta_file.write_text(json.dumps({**good, "init_params": {**good["init_params"], **change}}))
        with pytest.raises(ValueError, match=message):
            MRVI.load(tmp_path / "m", adata=tiny_model.adata)
    meta_file.write_text(json.dumps({**good, "registry": {**good["registry"], "sample_key": 3}}))
    with pytest.raises(ValueError, match="sample_key must be a string"):
        MRVI.load(tmp_path / "m", adata=tiny_model.adata)
    run = tmp_path / "run"
    run.mkdir()
    (run / "fit.json").write_text(json.dumps({"data": 5}))
    assert main(["analyze", str(run), "--groupby", "cell_type"]) == 2
    (run / "fit.json").write_text("[1, 2]")
    assert main(["analyze", str(run), "--groupby", "cell_type"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "'data' must be a file path" in err[0] and "pass --data" in err[1]


# ----- random inputs --------------------------------------------------------------------------
DEFECTS = ("nan", "inf", "negative", "fraction", "empty_cell")
SAMPLE_COLUMNS = {"text": True, "unused_categories": True, "integer_ids": True, "mixed_types_distinct": True,
                  "mixed_types_clash": False, "missing": False, "one_level": False}
BATCH_COLUMNS = {"none": True, "text": True, "unused_categories": True, "one_level": True, "missing": False,
                 "mixed_types_clash": False}
"""Kinds of obs column, and whether MrVI must accept them (one sample is too few; a batch is fine)."""

VARIANTS = st.fixed_dictionaries({
    "n_cells": st.integers(8, 40), "n_genes": st.integers(2, 8),
    "dtype": st.sampled_from(["int32", "int64", "float32", "float64"]),
    "format": st.sampled_from(["dense", "csr", "csc"]),
    "defects": st.one_of(st.just(frozenset()), st.frozensets(st.sampled_from(DEFECTS), min_size=1, max_size=2)),
    "zero_genes": st.integers(0, 2), "sample": st.sampled_from(sorted(SAMPLE_COLUMNS)),
    "batch": st.sampled_from(sorted(BATCH_COLUMNS)), "seed": st.integers(0, 2**16),
})


def _obs_column(kind, n_cells, rng, levels):
    values = np.array([levels[i % 3] for i in range(n_cells)], dtype=object)[rng.permutation(n_cells)]
    if kind == "unused_categories":
        return pd.Categorical(values, categories=[*levels[::-1], "unused"])
    if kind == "integer_ids":
        return np.array([10 * (levels.index(v) + 1) for v in values])
    if kind == "mixed_types_distinct":  # 1 and "2": two types, but two different texts
        return np.array([1 if v == levels[0] else "2" for v in values], dtype=object)
    if kind == "mixed_types_clash":  # 1 and "1" read the same as text
        return np.array([1, "1", *values[2:]], dtype=object)
    if kind == "missing":
        values[-1] = None
    if kind == "one_level":
        values[:] = levels[0]
    return values


def _anndata_variant(spec):
    """An AnnData built from ``spec`` (a draw of ``VARIANTS``), deterministic in it."""
    import anndata

    n_cells, n_genes, rng = spec["n_cells"], spec["n_genes"], np.random.default_rng(spec["seed"])
    x = rng.poisson(2.0, size=(n_cells, n_genes)).astype(np.float64)
    x[:, 0] += 1  # no empty cell unless planted
    x[:, 1 : 1 + spec["zero_genes"]] = 0  # all-zero genes (gene 0 keeps every cell non-empty)
    for row, defect in enumerate(sorted(spec["defects"])):  # one defect per row, the last row left for empty_cell
        if defect == "empty_cell":
            x[-1] = 0
        else:
            x[row, 0] = {"nan": np.nan, "inf": np.inf, "negative": -1.0, "fraction": 2.5}[defect]
    dtype = spec["dtype"]
    if dtype.startswith("int") and spec["defects"] & {"nan", "inf", "fraction"}:
        dtype = "float64"  # these values need a float matrix
    x = x.astype(dtype)
    matrix = x if spec["format"] == "dense" else getattr(sparse, f"{spec['format']}_matrix")(x)
    obs = pd.DataFrame({"sample": _obs_column(spec["sample"], n_cells, rng, ["s1", "s2", "s3"])},
                       index=[f"c{i}" for i in range(n_cells)])
    if spec["batch"] != "none":
        obs["batch"] = _obs_column(spec["batch"], n_cells, rng, ["b1", "b2", "b3"])
    return anndata.AnnData(matrix, obs=obs)


def _examples(test):
    """Every defect and column kind once, beside the random draws."""
    base = {"n_cells": 12, "n_genes": 4, "dtype": "float32", "format": "csr", "defects": frozenset(),
            "zero_genes": 1, "sample": "text", "batch": "text", "seed": 0}
    variants = [base, {**base, "dtype": "int64", "format": "dense"}, {**base, "format": "csc", "zero_genes": 2}]
    variants += [{**base, "defects": frozenset([d])} for d in DEFECTS]
    variants += [{**base, "sample": kind} for kind in SAMPLE_COLUMNS]
    variants += [{**base, "batch": kind} for kind in BATCH_COLUMNS]
    for spec in variants:
        test = example(spec=spec)(test)
    return test


@_examples
@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(spec=VARIANTS)
def test_random_inputs_give_a_clear_error_or_a_finite_result_and_are_never_modified(spec):
    """Property: setup + one epoch of training either refuses the input with a one-line
    ValueError/TypeError naming adata (exactly when it has a defect or an unusable obs column) or
    gives finite results; the input AnnData's X and obs are never modified."""
    adata = _anndata_variant(spec)
    x_before, obs_before, var_before = adata.X.copy(), adata.obs.copy(), adata.var.copy()
    valid = not spec["defects"] and SAMPLE_COLUMNS[spec["sample"]] and BATCH_COLUMNS[spec["batch"]]
    try:
        MRVI.setup_anndata(adata, sample_key="sample", batch_key=None if spec["batch"] == "none" else "batch")
        model = MRVI(adata, n_latent=3, n_latent_u=2, encoder_n_hidden=8, seed=0)
        model.train(max_epochs=1, batch_size=8, progress_bar=False)
        assert np.isfinite(model.history.to_numpy()).all()
        assert np.isfinite(model.get_latent_representation()).all()
        refused = None
    except (ValueError, TypeError) as err:
        refused = err
        assert len(str(err).splitlines()) == 1 and "adata" in str(err), err
    assert (refused is None) == valid, (spec, refused)
    assert type(adata.X) is type(x_before) and adata.X.dtype == x_before.dtype
    dense = [m.toarray() if sparse.issparse(m) else m for m in (x_before, adata.X)]
    np.testing.assert_array_equal(dense[1], dense[0])  # NaNs compare equal here
    pd.testing.assert_frame_equal(adata.obs, obs_before)
    pd.testing.assert_frame_equal(adata.var, var_before)


def test_ctrl_c_inside_a_staged_commit_is_delivered_after_it(tmp_path, monkeypatch):
    """A SIGINT that arrives while a staged directory is moved into place is held until the
    move is complete: the target is the new version and no staging sibling is left."""
    import os
    import signal

    from mrvi_pyro import _safe_io

    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")  # a previous version, so the swap has several steps
    real_exchange = _safe_io._exchange

    def exchange_with_interrupt(new, path):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of the swap
        return real_exchange(new, path)

    monkeypatch.setattr(_safe_io, "_exchange", exchange_with_interrupt)
    # Python's Ctrl-C handler, as under a terminal (a shell running the tests in the background
    # starts them with SIGINT ignored, and then no KeyboardInterrupt is due).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with _safe_io.staged_directory(target, overwrite=True, what="out", replaceable=lambda p: None) as staging:
                (staging / "new.txt").write_text("new")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
