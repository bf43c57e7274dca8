"""The analysis pipeline called from Python, as the command and notebooks call it (the command's
end-to-end runs are in test_cli.py)."""

import re

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from mrvi_pyro import MRVI, datasets  # noqa: E402
from mrvi_pyro.pipeline import analyze_model, check_against_truth, check_columns  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run():
    """A tiny cohort and MrVI trained on it for 2 epochs (shared by this module's tests)."""
    adata = datasets.simulate(n_cells=300, n_genes=60, n_samples=6, seed=1, n_de_genes=10, n_group_genes=10)
    MRVI.setup_anndata(adata, sample_key="sample", batch_key="batch")
    model = MRVI(adata, seed=0)
    model.train(max_epochs=2, batch_size=128, seed=0, progress_bar=False)
    return model, adata


def test_analyze_model_without_de_or_da_writes_only_the_distance_step(tiny_run, tmp_path, capsys):
    tiny_model, small_adata = tiny_run
    results = analyze_model(tiny_model, small_adata, tmp_path / "out", groupby="cell_type", seed=1)
    out = tmp_path / "out"
    assert list(results) == ["distances", "distance_spread", "sample_mixing", "posterior_predictive_check"]
    said = capsys.readouterr().out.splitlines()
    assert said[0] == "[analyze] local sample distances by cell_type"
    mixing = pd.read_csv(out / "sample_mixing_in_u.csv")
    pd.testing.assert_frame_equal(mixing, results["sample_mixing"], check_dtype=False)
    assert set(mixing["covariate"]) == {"sample", "batch"}  # no DE or DA covariate given
    # A kept row is announced in one warning line naming it (a 2-epoch model may keep batch apart in u).
    kept = mixing[mixing["kept"]]
    assert len(said) == (1 if kept.empty else 2)
    for row in kept.itertuples():
        assert said[1].startswith("[analyze] WARNING: u keeps") and f"{row.covariate} in {row.group}" in said[1]
    spread = pd.read_csv(out / "sample_distance_spread.csv")
    assert spread["cell_type"].tolist() == results["distance_spread"]["cell_type"].tolist()
    assert spread["mean_between_sample_distance"].is_monotonic_decreasing
    assert sorted(p.name for p in out.glob("sample_distances_*.png")) == [
        f"sample_distances_{t}.png" for t in sorted(small_adata.obs["cell_type"].unique())]
    assert (out / "results" / "local_sample_distances.zarr").is_dir()
    assert not (out / "de_summary.csv").exists() and not (out / "da_summary.csv").exists()
    sections = re.findall(r"<h2>([^<]*)</h2>", (out / "report.html").read_text())
    assert sections == ["Model", "Model fit: posterior predictive check", "Sample mixing in u",
                        "Local sample distances by cell_type", "Run"]
    check = pd.read_csv(out / "posterior_predictive_check.csv")
    assert len(check) == 4 * small_adata.n_vars and (out / "posterior_predictive_check.png").is_file()
    pd.testing.assert_frame_equal(check, results["posterior_predictive_check"].astype({"statistic": str}),
                                  check_dtype=False)
    lines = check_against_truth(tiny_model, results, small_adata.uns["simulation"])
    assert len(lines) == 1 and lines[0].startswith("distances: largest between-sample spread in ")


def test_precomputed_distances_are_used_not_recomputed(tiny_run, tmp_path, monkeypatch):
    tiny_model, small_adata = tiny_run
    distances = tiny_model.get_local_sample_distances(small_adata, groupby="cell_type", keep_cell=False)

    def refuse(*args, **kwargs):
        raise AssertionError("recomputed although given")

    monkeypatch.setattr(tiny_model, "get_local_sample_distances", refuse)
    results = analyze_model(tiny_model, small_adata, tmp_path, groupby="cell_type", quiet=True,
                            precomputed={"distances": distances})
    assert results["distances"] is distances
    with pytest.raises(AssertionError, match="recomputed"):  # nothing given: it computes (here: refuses)
        analyze_model(tiny_model, small_adata, tmp_path / "again", groupby="cell_type", quiet=True)


def test_missing_keys_are_one_line_errors_naming_the_flag(small_adata):
    with pytest.raises(ValueError, match=r"^--groupby 'tissue' is not a column of obs"):
        check_columns(small_adata, "tissue", None, None)
    with pytest.raises(ValueError, match=r"^--da 'age_group' is not a column of obs"):
        check_columns(small_adata, "cell_type", "disease", "age_group")
    with pytest.raises(ValueError, match=r"^--basis 'X_umap' is not a key of obsm"):
        check_columns(small_adata, "cell_type", None, None, basis="X_umap")
    check_columns(small_adata, "cell_type", "disease", "disease")  # all present: no error
