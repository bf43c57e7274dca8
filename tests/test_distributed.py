"""Data-parallel training and sharded analyses on torch.distributed (gloo, 2 CPU processes).

One launch of two ranks (about 20 s, most of it starting two Python processes) trains, runs the
sharded analyses and exercises the collective input checks; the single-process references are
computed in the test process with the same seeds.
"""

import contextlib
import os
import warnings

import numpy as np
import pytest
import torch

import mrvi_pyro
from mrvi_pyro import MRVI, distributed

EPOCHS = 3
GLOBAL_BATCH = 128
PARAMETER_RTOL = 1e-5
"""Relative L2 distance allowed between the parameters of 2 ranks and of 1 process (measured:
about 1e-6 after 3 epochs; float32 gradients summed over two halves instead of one batch)."""
HISTORY_RTOL = 1e-6
"""Relative difference allowed between the ELBO histories (measured: about 6e-8)."""


def _cohort():
    adata = mrvi_pyro.datasets.simulate(n_cells=600, n_genes=50, n_samples=6, seed=1, n_de_genes=10, n_group_genes=10)
    MRVI.setup_anndata(adata, sample_key="sample", batch_key="batch")
    return adata


def _train(adata, **kwargs):
    model = MRVI(adata, seed=0)
    model.train(max_epochs=EPOCHS, batch_size=GLOBAL_BATCH, seed=0, progress_bar=False, **kwargs)
    return model


ANALYSES = ["distances", "distances_zarr", "sampled_distances", "da", "da_capped", "de", "de_admissible",
            "de_lfc", "de_lfc_zarr", "outliers", "outliers_mog"]


def _analyses(model, zarr_path) -> dict:
    """The sharded analyses (None on ranks other than 0); chunks of 100 cells, so the 600 cells
    are 3 chunks on rank 0 and 3 on rank 1 (whose LFC draws continue rank 0's random streams)."""
    return {
        "distances": model.get_local_sample_distances(groupby="cell_type", keep_cell=True, batch_size=100),
        "distances_zarr": model.get_local_sample_distances(groupby="cell_type", batch_size=100, zarr_path=zarr_path),
        "sampled_distances": model.get_local_sample_distances(
            groupby="cell_type", keep_cell=False, use_mean=False, normalize_distances=True, mc_samples=3,
            batch_size=100),
        "da": model.differential_abundance(sample_cov_keys=["disease"], batch_size=100),
        "da_capped": model.differential_abundance(sample_cov_keys=["disease"], batch_size=100,
                                                  max_components_per_sample=30, compute_log_enrichment=True),
        "de": model.differential_expression(sample_cov_keys=["disease"], batch_size=100),
        "de_admissible": model.differential_expression(sample_cov_keys=["disease"], batch_size=100,
                                                       filter_inadmissible_samples=True, flavor="mog"),
        "de_lfc": model.differential_expression(sample_cov_keys=["disease"], batch_size=100, store_lfc=True,
                                                mc_samples=5, store_baseline=True, credible_interval=0.9),
        "de_lfc_zarr": model.differential_expression(
            sample_cov_keys=["disease"], batch_size=100, store_lfc=True, mc_samples=5,
            zarr_path=os.path.join(os.path.dirname(zarr_path), "de.zarr")),
        "outliers": model.get_outlier_cell_sample_pairs(batch_size=100),
        "outliers_mog": model.get_outlier_cell_sample_pairs(batch_size=100, flavor="mog", subsample_size=40),
    }


def _error(fn) -> str | None:
    """The message of the ValueError ``fn`` raises (None if it raises nothing)."""
    try:
        fn()
    except ValueError as err:
        return str(err)
    return None


def _bad_inputs(adata, model) -> dict:
    """Each launch mistake must stop every rank with a ValueError (no hang)."""
    rank = distributed.rank()
    subset = adata[: 500 if rank == 1 else 600].copy()  # rank 1 reads other data
    return {
        "indivisible": _error(lambda: MRVI(adata, seed=0).train(max_epochs=1, batch_size=127, progress_bar=False)),
        "other_data": _error(lambda: MRVI(subset, seed=0).train(max_epochs=1, batch_size=128, progress_bar=False)),
        "other_seed": _error(lambda: MRVI(adata, seed=0).train(max_epochs=1, batch_size=128, seed=rank,
                                                              progress_bar=False)),
        "analysis_other_seed": _error(lambda: model.differential_abundance(sample_cov_keys=["disease"], seed=rank,
                                                                          max_components_per_sample=20)),
        "analysis_other_data": _error(lambda: model.get_outlier_cell_sample_pairs(adata=subset)),
        "analysis_other_weights": _error(lambda: MRVI(adata, seed=rank).get_local_sample_distances(
            groupby="cell_type", keep_cell=False)),
    }


def _rank_work(single_process_state, zarr_path):
    adata = _cohort()
    model = _train(adata)
    state = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
    model.module.load_state_dict(single_process_state)  # analyses of the very same weights
    results = _analyses(model, zarr_path)
    os.environ["MRVI_PYRO_SAME_DRAWS"] = "0"  # each rank draws for its own cells only
    own_draws = _train(adata).history
    del os.environ["MRVI_PYRO_SAME_DRAWS"]
    errors, returned_none = [None] * 2, [None] * 2
    torch.distributed.all_gather_object(errors, _bad_inputs(adata, model))
    torch.distributed.all_gather_object(returned_none, [r is None for r in results.values()])
    return {"state": state, "history": model.history, "own_draws": own_draws, "analyses": results, "errors": errors,
            "returned_none": returned_none}


@pytest.fixture(scope="module")
def two_ranks(one_process, tmp_path_factory):
    zarr_path = str(tmp_path_factory.mktemp("two_ranks") / "distances.zarr")
    return distributed.launch(_rank_work, 2, one_process["state"], zarr_path, threads=1)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    with _threads(1), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata = _cohort()
        model = _train(adata)
        zarr_path = tmp_path_factory.mktemp("one_process") / "distances.zarr"
        return {"state": {k: v.detach().clone() for k, v in model.module.state_dict().items()},
                "history": model.history, "analyses": _analyses(model, zarr_path)}


@contextlib.contextmanager
def _threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_two_ranks_of_64_match_one_process_of_128(two_ranks, one_process):
    single, multi = one_process["state"], two_ranks["state"]
    assert single.keys() == multi.keys()
    diff = sum(float(((single[k].double() - multi[k].double()) ** 2).sum()) for k in single) ** 0.5
    norm = sum(float((single[k].double() ** 2).sum()) for k in single) ** 0.5
    assert diff / norm < PARAMETER_RTOL
    moved = sum(float(((single[k].double() - MRVI(_cohort(), seed=0).module.state_dict()[k].double()) ** 2).sum())
                for k in single) ** 0.5
    assert moved / norm > 1e3 * PARAMETER_RTOL  # training moved the weights far more than the tolerance
    h1, h2 = one_process["history"], two_ranks["history"]
    assert list(h1.index) == list(h2.index) == list(range(EPOCHS))
    for column in ("elbo_train", "elbo_validation", "clipped_share"):
        np.testing.assert_allclose(h2[column], h1[column], rtol=HISTORY_RTOL)


def test_ranks_drawing_their_own_numbers_train_alike_but_not_bit_equal(two_ranks, one_process):
    """MRVI_PYRO_SAME_DRAWS=0: other random numbers, the same model in distribution."""
    own, single = two_ranks["own_draws"]["elbo_train"], one_process["history"]["elbo_train"]
    assert not np.allclose(own, single, rtol=HISTORY_RTOL)
    np.testing.assert_allclose(own, single, rtol=0.02)


def test_ranks_draw_the_single_process_random_numbers():
    """Per-cell draws inside SameDraws are rows of the draws for the whole minibatch."""
    torch.manual_seed(3)
    full_noise = torch.empty(10, 4).normal_()
    full_mask = torch.nn.functional.dropout(torch.ones(10, 2, 3), 0.3, True)
    torch.manual_seed(3)
    with distributed.SameDraws(10, 6, 4):
        noise = torch.distributions.Normal(torch.zeros(4, 4), torch.ones(4, 4)).rsample()
        dropped = torch.nn.Dropout(0.3)(torch.full((4, 2, 3), 2.0))
        other = torch.randn(3)  # not per cell: drawn as usual
    torch.testing.assert_close(noise, full_noise[6:], rtol=0, atol=0)
    torch.testing.assert_close(dropped, 2.0 * full_mask[6:], rtol=0, atol=0)
    assert other.shape == (3,)


@pytest.mark.parametrize("name", ANALYSES)
def test_sharded_analyses_equal_one_process(two_ranks, one_process, name):
    """Each rank computes exactly the chunks one process computes: the results are identical."""
    sharded, single = two_ranks["analyses"][name], one_process["analyses"][name]
    assert sorted(sharded.data_vars) == sorted(single.data_vars)
    for var in single.data_vars:
        np.testing.assert_array_equal(sharded[var].values, single[var].values, err_msg=var)
    for coord in single.coords:
        assert list(sharded[coord].values) == list(single[coord].values), coord
    assert np.isfinite(single[list(single.data_vars)[0]].values).any()


def test_rank_0_returns_the_results_and_the_others_none(two_ranks):
    assert two_ranks["returned_none"] == [[False] * len(ANALYSES), [True] * len(ANALYSES)]


@pytest.mark.parametrize("case, words", [
    ("indivisible", "divisible by the world size"),
    ("other_data", "disagree"),
    ("other_seed", "disagree"),
    ("analysis_other_seed", "disagree on the analysis data, model weights or arguments"),
    ("analysis_other_data", "disagree on the analysis data"),
    ("analysis_other_weights", "weights"),
])
def test_bad_launch_stops_every_rank_with_a_clear_error(two_ranks, case, words):
    messages = [errors[case] for errors in two_ranks["errors"]]
    assert all(m is not None and words in m for m in messages), messages
    if case == "other_seed":
        assert "seed" in messages[0]
    if case == "other_data":
        assert "n_obs" in messages[0]
    if case == "analysis_other_seed":
        assert "seed" in messages[0]


def test_launch_rejects_a_bad_nproc():
    with pytest.raises(ValueError, match="nproc"):
        distributed.launch(print, 0)


def _fails_on_rank_1():
    if distributed.rank() == 1:
        raise ValueError("rank 1 was given a bad input")
    torch.distributed.barrier()  # rank 0 waits here until the launch stops it


def test_launch_raises_the_failing_rank_s_exception():
    with pytest.raises(ValueError, match="rank 1 was given a bad input"):
        distributed.launch(_fails_on_rank_1, 2, threads=1, timeout_s=120)


def test_fit_and_analyze_commands_on_two_ranks_match_one_process(tmp_path, small_adata, capsys):
    from mrvi_pyro.cli import main

    path = tmp_path / "data.h5ad"
    raw = small_adata.copy()
    del raw.uns["_mrvi_pyro"]
    raw.write_h5ad(path)
    arguments = ["fit", str(path), "--sample-key", "sample", "--batch-key", "batch", "--max-epochs", "2", "--quiet"]
    assert main([*arguments, "--nproc", "2", "--out", str(tmp_path / "two")]) == 0
    assert "on 2 ranks" in capsys.readouterr().out
    one = MRVI(small_adata, seed=0)  # what `fit` trains in one process
    with _threads(1):
        one.train(max_epochs=2, batch_size=128, seed=0, progress_bar=False)
    two = MRVI.load(tmp_path / "two" / "model", adata=raw.copy())
    a, b = one.module.state_dict(), two.module.state_dict()
    diff = sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in a) ** 0.5
    assert diff / sum(float((a[k].double() ** 2).sum()) for k in a) ** 0.5 < PARAMETER_RTOL
    np.testing.assert_allclose(two.history["elbo_train"], one.history["elbo_train"], rtol=HISTORY_RTOL)
    assert two.is_trained and (tmp_path / "two" / "training_history.png").is_file()
    assert main([*arguments, "--nproc", "3", "--out", str(tmp_path / "three")]) == 2
    assert "must be divisible by --nproc 3" in capsys.readouterr().err
    assert not (tmp_path / "three").exists()

    analyze = ["analyze", str(tmp_path / "two"), "--groupby", "cell_type", "--da", "disease", "--de", "disease",
               "--mc-samples", "3", "--quiet"]
    assert main([*analyze, "--out", str(tmp_path / "one_process")]) == 0
    assert main([*analyze, "--nproc", "2", "--out", str(tmp_path / "two_ranks")]) == 0
    for name in ("sample_distance_spread.csv", "da_summary.csv", "de_summary.csv"):
        assert (tmp_path / "one_process" / name).read_text() == (tmp_path / "two_ranks" / name).read_text(), name
    import xarray as xr

    da_one, da_two = (xr.open_zarr(tmp_path / run / "results" / "differential_abundance.zarr")
                      for run in ("one_process", "two_ranks"))
    np.testing.assert_array_equal(da_two["log_probs"].values, da_one["log_probs"].values)
    de_one, de_two = (xr.open_zarr(tmp_path / run / "results" / "differential_expression.zarr")
                      for run in ("one_process", "two_ranks"))
    for name in ("effect_size", "pvalue", "lfc"):
        np.testing.assert_array_equal(de_two[name].values, de_one[name].values)
