"""Tests of the accuracy benchmark's instruments: the independent simulator and the scorers.

The benchmark itself (training both implementations) is not run here; these tests check that
the measuring code recovers planted structure and is at chance without it.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _independent_sim  # noqa: E402
import accuracy  # noqa: E402


@pytest.fixture(scope="module")
def programs():
    return _independent_sim.simulate_programs(n_cells=3000, n_genes=300, n_samples=12, n_batches=3, seed=0)


def log_normalised(adata):
    counts = adata.X.toarray().astype(np.float64)
    return np.log1p(1e4 * counts / counts.sum(axis=1, keepdims=True))


def shift(adata, values, cell_type, covariate, level, genes):
    """Mean log-normalised expression of ``level`` minus the rest, in one cell type, per gene."""
    of_type = (adata.obs["cell_type"] == cell_type).to_numpy()
    case = (adata.obs[covariate] == level).to_numpy()
    columns = adata.var_names.get_indexer(genes)
    return values[of_type & case][:, columns].mean(0) - values[of_type & ~case][:, columns].mean(0)


def test_independent_simulator_layout_and_balance(programs):
    assert programs.shape == (3000, 300)
    assert list(programs.obs.columns) == ["sample", "batch", "cell_type", "disease", "hidden_group", "null_group"]
    truth = programs.uns["simulation"]
    assert len({truth["de_cell_type"], truth["grouping_cell_type"], truth["da_cell_type"]}) == 3
    assert not set(truth["de_genes"]) & set(truth["grouping_genes"])
    samples = programs.obs.groupby("sample", observed=True).first()
    for column in ("disease", "hidden_group", "null_group"):
        assert (samples[column].value_counts() == 6).all(), column
    for rows, column in [("batch", "disease"), ("batch", "hidden_group"), ("disease", "hidden_group"),
                         ("disease", "null_group")]:
        table = pd.crosstab(samples[rows], samples[column])
        assert (table.max(axis=1) - table.min(axis=1)).max() <= 1, (rows, column)


def test_independent_simulator_plants_its_effects(programs):
    truth, values = programs.uns["simulation"], log_normalised(programs)
    de = shift(programs, values, truth["de_cell_type"], "disease", "disease", truth["de_genes"])
    assert np.mean(np.sign(de) == np.sign(truth["de_log_fold_changes"])) > 0.9
    other_type = next(t for t in programs.obs["cell_type"].cat.categories
                      if t not in (truth["de_cell_type"], truth["grouping_cell_type"]))
    assert np.mean(np.abs(shift(programs, values, other_type, "disease", "disease", truth["de_genes"]))) < 0.3
    grouping = shift(programs, values, truth["grouping_cell_type"], "hidden_group", "B", truth["grouping_genes"])
    assert np.mean(np.sign(grouping) == np.sign(truth["grouping_log_fold_changes"])) > 0.9
    proportions = pd.crosstab(programs.obs["sample"], programs.obs["cell_type"], normalize="index")
    disease = programs.obs.groupby("sample", observed=True)["disease"].first().reindex(proportions.index)
    da = proportions[truth["da_cell_type"]].groupby(disease, observed=True).mean()
    assert da["disease"] > 1.5 * da["healthy"]


def test_independent_simulator_weak_preset_and_errors():
    weak = _independent_sim.simulate_programs(n_cells=600, n_genes=300, n_samples=6, n_batches=3, seed=1,
                                              preset="weak").uns["simulation"]
    assert len(weak["de_genes"]) == 30 and weak["da_fold_change"] == 1.8
    assert 0.1 < np.mean(np.abs(weak["de_log_fold_changes"])) < 1.0
    with pytest.raises(ValueError, match="preset must be one of"):
        _independent_sim.simulate_programs(preset="medium")
    with pytest.raises(ValueError, match="Unknown effect-size arguments \\['lfc'\\]"):
        _independent_sim.simulate_programs(lfc=1.0)


def test_pair_auroc_and_ari_recover_a_planted_split():
    rng = np.random.default_rng(0)
    groups = np.array(["A", "B"] * 6)
    points = np.where(groups == "B", 3.0, 0.0)[:, None] + rng.normal(size=(12, 4))
    distances = np.linalg.norm(points[:, None] - points[None], axis=-1)
    assert accuracy.pair_auroc(distances, groups) > 0.95
    assert accuracy.two_cluster_ari(distances, groups) == pytest.approx(1.0)
    noise = np.linalg.norm(rng.normal(size=(12, 4))[:, None] - rng.normal(size=(12, 4))[None], axis=-1)
    assert accuracy.pair_auroc(noise + noise.T, groups) < 0.8
    # The contrast keeps growing with the split after the AUROC has reached 1.
    wider = np.where(groups == "B", 6.0, 0.0)[:, None] + rng.normal(size=(12, 4))
    wider = np.linalg.norm(wider[:, None] - wider[None], axis=-1)
    assert accuracy.pair_auroc(wider, groups) == 1.0
    assert accuracy.pair_contrast(wider, groups) > accuracy.pair_contrast(distances, groups) > 0.2
    assert abs(accuracy.pair_contrast(noise + noise.T, groups)) < 0.2


def test_knn_batch_accuracy_separated_versus_mixed():
    rng = np.random.default_rng(1)
    batches = np.repeat(["b0", "b1", "b2"], 200)
    separated = rng.normal(size=(600, 5)) + 10.0 * (np.arange(600) // 200)[:, None]
    assert accuracy.knn_batch_accuracy(separated, batches) == 1.0
    mixed = rng.normal(size=(600, 5))
    assert abs(accuracy.knn_batch_accuracy(mixed, batches) - 1 / 3) < 0.08


def test_scores_of_the_pseudobulk_control_find_strong_planted_effects(programs):
    knn_cells = np.arange(0, 3000, 3)
    scores = accuracy.score(accuracy.pseudobulk_arrays(programs), programs, knn_cells)
    assert scores["cov_auroc"] > 0.9 and scores["hidden_auroc"] > 0.85
    assert scores["gene_auroc"] > 0.95 and scores["da_auroc"] > 0.75
    assert scores["batch_knn"] > 0.6 and scores["batch_chance"] == pytest.approx(1 / 3)
    assert scores["null_p05"] is None


def test_hidden_in_u_sees_a_grouping_kept_in_u_and_not_otherwise(programs):
    knn_cells = np.arange(0, 3000, 3)
    arrays = accuracy.pseudobulk_arrays(programs)
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(programs.n_obs, 5))
    in_u = noise + 4.0 * (programs.obs["hidden_group"] == programs.obs["hidden_group"].iloc[0]).to_numpy()[:, None]
    kept = accuracy.score({**arrays, "u": in_u}, programs, knn_cells)["hidden_in_u"]
    absent = accuracy.score({**arrays, "u": noise}, programs, knn_cells)["hidden_in_u"]
    assert kept > 0.95
    assert 0.35 < absent < 0.65


def test_accuracy_refuses_existing_files_before_any_work(tmp_path, capsys, monkeypatch):
    """--out/.csv and the .h5ad/.npz names a run writes in a user's --workdir are refused before
    anything is simulated or trained, unless --overwrite; nothing there is changed."""
    monkeypatch.setattr(accuracy, "simulate", lambda *a, **k: pytest.fail("simulated despite a refusal"))
    workdir = tmp_path / "mine"
    workdir.mkdir()
    base = ["--simulators", "datasets", "--presets", "weak", "--seeds", "3", "--batch-sizes", "128",
            "--sides", "ours", "pseudobulk", "--workdir", str(workdir), "--out", str(tmp_path / "r.json")]
    for name in ("datasets_weak_seed3.h5ad", "datasets_weak_seed3_ours_b128.npz"):
        precious = workdir / name
        precious.write_bytes(b"precious")
        with pytest.raises(SystemExit) as stop:
            accuracy.main(base)
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert str(precious) in err and "pass --overwrite" in err and "another --workdir" in err
        assert precious.read_bytes() == b"precious"
        precious.unlink()
    (workdir / "datasets_weak_seed3_pseudobulk_b128.npz").write_bytes(b"x")  # pseudobulk writes no file
    (workdir / "datasets_weak_seed4.h5ad").write_bytes(b"x")  # another seed's
    args = argparse.Namespace(simulators=["datasets"], presets=["weak"], seeds=[3], batch_sizes=[128],
                              sides=["ours", "pseudobulk"])
    planned = accuracy.planned_files(args, workdir)
    assert sorted(p.name for p in planned) == ["datasets_weak_seed3.h5ad", "datasets_weak_seed3_ours_b128.npz"]
    (tmp_path / "r.csv").write_text("mine")
    with pytest.raises(SystemExit):
        accuracy.main(base)
    assert "r.csv" in capsys.readouterr().err and (tmp_path / "r.csv").read_text() == "mine"


def test_label_share_is_one_for_label_effects_and_at_chance_for_unstructured_ones():
    rng = np.random.default_rng(0)
    n_cells, n_samples, n_latent = 400, 24, 10
    labels = np.repeat(np.array(["b0", "b1", "b2"]), 8)[rng.permutation(n_samples)]
    per_label = {level: rng.normal(size=(n_cells, n_latent)) for level in np.unique(labels)}
    following = np.stack([per_label[level] for level in labels], axis=1)  # (cells, S, L)
    assert accuracy.label_share(following + 5.0, labels) == pytest.approx(1.0)
    chance = (3 - 1) / (n_samples - 1)
    noise = [accuracy.label_share(rng.normal(size=(n_cells, n_samples, n_latent)), labels) for _ in range(20)]
    assert abs(np.mean(noise) - chance) < 0.01
    # About two thirds of the effect variance following the labels (label means vary by ~2/3
    # per dimension across samples, the added noise by ~0.35): the share sits between.
    mixed = following + 0.6 * rng.normal(size=following.shape)
    share = accuracy.label_share(mixed, labels)
    assert 0.55 < share < 0.8
    # Effects unrelated to the labels but large in one cell do not count as label effects.
    single = np.zeros((n_cells, n_samples, n_latent))
    single[0, 0] = 100.0
    assert accuracy.label_share(single, labels) < 0.1


def test_stratified_auroc_counts_only_pairs_within_a_stratum():
    from mrvi_pyro._metrics import auroc

    rng = np.random.default_rng(1)
    n = 1000
    strata = np.repeat(np.arange(10), 100)
    # Positives only in the top strata (as when DE genes are drawn among expressed genes), and a
    # score that is the stratum plus noise, blind to the labels: high plain AUROC, ~0.5 matched.
    labels = np.zeros(n, bool)
    labels[rng.choice(np.flatnonzero(strata >= 6), 40, replace=False)] = True
    blind = strata + rng.uniform(size=n)
    assert auroc(labels, blind) > 0.75
    assert abs(accuracy.stratified_auroc(labels, blind, strata) - 0.5) < 0.1
    # A score that ranks the positives first inside every stratum gets 1.
    assert accuracy.stratified_auroc(labels, -strata + 100.0 * labels, strata) == 1.0
    # One stratum: the plain AUROC; strata with no positives or no negatives count no pairs.
    score = rng.normal(size=n) + labels
    assert accuracy.stratified_auroc(labels, score, np.zeros(n)) == pytest.approx(auroc(labels, score))
    lonely = strata.copy()
    lonely[labels] = 99  # every positive alone in a stratum without negatives: no pairs
    assert np.isnan(accuracy.stratified_auroc(labels, score, lonely))


def test_expression_strata_are_deciles_of_normalised_expression_in_the_cell_type(programs):
    truth = programs.uns["simulation"]
    strata = accuracy.expression_strata(programs, truth["de_cell_type"])
    assert strata.shape == (programs.n_vars,)
    assert np.bincount(strata).tolist() == [programs.n_vars // 10] * 10
    cells = (programs.obs["cell_type"] == truth["de_cell_type"]).to_numpy()
    counts = programs.X[cells].toarray().astype(float)
    mean = (counts / counts.sum(1, keepdims=True)).mean(0)
    assert np.all(np.diff(strata[np.argsort(mean, kind="stable")]) >= 0)  # monotone in expression


def test_ablation_options_reach_our_child_only(tmp_path, monkeypatch):
    """--ours-zero-masked-grads and --ours-kwargs are passed to our side's child process and never
    to the reference's (whose run must stay the reference's defaults)."""
    commands = {}

    def fake_run(command, timeout, extra_env):
        commands[command[command.index("--side") + 1]] = [str(c) for c in command]
        return {"returncode": 1, "result": None, "timed_out": False, "stderr": "", "wall_seconds": 0.0,
                "peak_rss_gb": None}

    monkeypatch.setattr(accuracy._harness, "run_command", fake_run)
    args = argparse.Namespace(epochs=2, threads=1, de_cells=0, mc_samples=5, null_draws=0, local_cells=10,
                              ours_kwargs='{"architecture": 3}', ours_train_kwargs="{}",
                              ours_zero_masked_grads=True, reference_python=sys.executable,
                              timeout=10.0, keep_data=False, trace_every=5, trace_cells=40)
    for side in ("ours", "reference"):
        record, arrays = accuracy.run_side(side, tmp_path / "c.h5ad", tmp_path, 0, 128, args)
        assert arrays is None
    assert "--zero-masked-grads" in commands["ours"] and "--zero-masked-grads" not in commands["reference"]
    assert '{"architecture": 3}' in commands["ours"] and "--model-kwargs" not in commands["reference"]
    for side in ("ours", "reference"):  # tracing is a measurement: both sides get it
        assert commands[side][commands[side].index("--trace-every") + 1] == "5"


def test_our_train_arguments_take_the_seed_from_train_kwargs_when_given():
    """The child's training call uses the run's seed unless ``--train-kwargs`` names another
    (the ablation that seeds training apart from the initial weights)."""
    import _accuracy_child

    args = argparse.Namespace(epochs=3, batch_size=128, seed=4, train_kwargs="{}")
    plain = _accuracy_child.our_train_arguments(args)
    assert plain["seed"] == 4 and plain["max_epochs"] == 3 and plain["batch_size"] == 128
    assert plain["train_size"] == 0.9 and plain["early_stopping"] is False
    args.train_kwargs = '{"seed": 1004, "lr": 0.001}'
    changed = _accuracy_child.our_train_arguments(args)
    assert changed["seed"] == 1004 and changed["lr"] == 0.001 and changed["max_epochs"] == 3


def test_trace_scores_see_an_effect_appear_in_its_own_cell_type_only(programs):
    """trace_scores: contrasts at chance while the probe's z ignores the labels, and the disease
    contrast (not the hidden one) rises once the DE cell type's z splits by disease; the batch
    share is at chance for unstructured effects and near 1 for effects that follow the batch."""
    truth = programs.uns["simulation"]
    samples = programs.obs["sample"].cat.categories.astype(str)
    per_sample = programs.obs.groupby("sample", observed=True)[["disease", "batch"]].first().reindex(samples)
    sick = (per_sample["disease"].astype(str) == "disease").to_numpy()
    types = programs.obs["cell_type"].to_numpy()
    keys = ("de_cell_type", "grouping_cell_type")
    cells = np.sort(np.concatenate([np.flatnonzero(types == truth[k])[:30] for k in keys]))
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(2, len(cells), len(samples), 4))
    learned = noise[1].copy()
    in_de = types[cells] == truth["de_cell_type"]
    learned[np.ix_(in_de, sick)] += np.array([6.0, 0, 0, 0])
    batch = per_sample["batch"].astype(str).to_numpy()
    codes = np.unique(batch, return_inverse=True)[1]
    by_batch = 0.1 * noise[0] + rng.normal(size=(codes.max() + 1, 4))[codes][None]  # effects follow the batch
    arrays = {"trace_z": np.stack([noise[0], learned, by_batch]), "trace_epochs": np.array([5, 10, 15]),
              "trace_cells": cells, "trace_samples": np.asarray(samples)}
    first, second, third = accuracy.trace_scores(arrays, programs)
    assert [first["epoch"], second["epoch"], third["epoch"]] == [5, 10, 15]
    chance = (len(np.unique(batch)) - 1) / (len(samples) - 1)
    assert abs(first["batch_share"] - chance) < 0.05 and third["batch_share"] > 0.95
    assert abs(first["cov_contrast"]) < 0.1 and abs(first["hidden_contrast"]) < 0.1
    assert second["cov_contrast"] > 0.5 and second["cov_auroc"] > 0.99
    assert abs(second["hidden_contrast"]) < 0.1
    assert accuracy.format_trace([second]).startswith("10:")
    assert accuracy.format_trace([third]).split("/")[-1] == f"{third['batch_share']:.3f}"


def test_tracing_does_not_change_our_run(tmp_path):
    """The child's --trace-every trains ours in pieces through a checkpoint directory: the traced
    run ends where the untraced one does (every saved array equal), and its last trace is the
    final model's counterfactual z of the probe cells."""
    import _accuracy_child
    from mrvi_pyro import datasets

    adata = datasets.simulate(n_cells=600, n_genes=120, n_samples=6, n_batches=2, seed=0, preset="weak")
    data = tmp_path / "c.h5ad"
    adata.write_h5ad(data)
    common = ["--side", "ours", "--data", str(data), "--epochs", "4", "--batch-size", "128", "--de-cells", "60",
              "--mc-samples", "3", "--local-cells", "600"]
    assert _accuracy_child.main([*common, "--out", str(tmp_path / "plain.npz")]) == 0
    assert _accuracy_child.main([*common, "--out", str(tmp_path / "traced.npz"), "--trace-every", "3",
                                 "--trace-cells", "40"]) == 0
    plain, traced = np.load(tmp_path / "plain.npz"), np.load(tmp_path / "traced.npz")
    for key in ("local_z", "distances_de", "distances_grouping", "u", "da_log_ratio", "mean_abs_lfc"):
        np.testing.assert_array_equal(plain[key], traced[key], err_msg=key)
    assert traced["trace_epochs"].tolist() == [3, 4] and "trace_z" not in plain
    assert traced["trace_z"].shape[:3] == (2, len(traced["trace_cells"]), 6)
    local = {c: i for i, c in enumerate(traced["local_cells"].tolist())}
    shared = [i for i, c in enumerate(traced["trace_cells"].tolist()) if c in local]
    assert shared, "no probe cell among the local cells"
    np.testing.assert_allclose(traced["trace_z"][-1][shared],
                               traced["local_z"][[local[traced["trace_cells"][i]] for i in shared]], atol=1e-5)
