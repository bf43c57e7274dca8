"""Accuracy of mrvi_pyro side by side with scvi-tools' MRVI, across simulators, effect sizes and seeds.

For every simulator (``datasets``: :func:`mrvi_pyro.datasets.simulate`; ``programs``: the
independent gene-program simulator in ``_independent_sim.py``), preset (``weak``, ``strong``)
and seed, one .h5ad is simulated and BOTH implementations are trained on that same file, each
in a fresh process (``_accuracy_child.py``: ours with this Python, the reference with
``--reference-python``, torch backend), with the same epochs, batch size, 90/10 split, no early
stopping, ``--threads`` torch threads and the seed. The children save raw arrays; this process
scores both sides with the same code (:mod:`mrvi_pyro._metrics`, scipy):

``cov_auroc``
    Covariate-driven pair AUROC: in the DE cell type, the sample x sample distance matrix of
    ``get_local_sample_distances(groupby="cell_type", keep_cell=False)``; every unordered pair of
    samples is labelled 1 when their disease status differs; AUROC of the distance. 0.5 = chance.
``cov_contrast``
    On the same matrix, ``log`` of the mean distance of the pairs whose disease status differs over
    that of the pairs whose status agrees (:func:`pair_contrast`); 0 = no separation. Smooth where
    ``cov_auroc`` saturates at 1: the size of the learned disease effect.
``hidden_auroc``, ``hidden_ari``
    The same in the hidden-grouping cell type with label "different hidden group" (a grouping no
    model is told about); and the adjusted Rand index of a 2-cluster cut of the samples
    (scipy average-linkage hierarchical clustering of that distance matrix) against the groups.
``hidden_contrast``
    :func:`pair_contrast` of that matrix for the hidden groups.
``gene_auroc``
    Planted-gene AUROC: ``differential_expression(sample_cov_keys=["disease"],
    store_lfc=True)``; mean |LFC| over the DE cell type's cells per gene; AUROC of the planted DE
    genes against all other genes.
``gene_auroc_matched``
    The same AUROC counted only over (planted, other) gene pairs of the same expression decile
    (:func:`stratified_auroc`; deciles of the mean library-normalised count in the DE cell type,
    from the counts). The ``programs`` simulator draws its DE genes among expressed genes, so
    there a score that merely grows with expression already reaches ~0.75 on ``gene_auroc``;
    this figure is ~0.5 for such a score and measures what the LFCs know beyond expression.
``da_auroc``
    Cell-level AUROC of the disease log-ratio of ``differential_abundance(sample_cov_keys=
    ["disease"])`` (``log p(disease) - log p(healthy)`` of the ``disease_log_probs``) separating
    the DA cell type's cells from the others.
``batch_knn``
    Batch accuracy of a leave-one-out 15-nearest-neighbour majority vote in u
    (``get_latent_representation()``, Euclidean) on a random subset of at most ``--knn-cells``
    cells (the same subset for both sides); chance is 1 / n_batches (``batch_chance``); lower is
    better mixed.
``hidden_in_u``
    A diagnostic of where the hidden grouping went: leave-one-out 15-nearest-neighbour accuracy
    of the hidden group in u among the hidden-grouping cell type's cells (at most
    ``--knn-cells`` of them); chance 0.5. Well above chance means the encoder kept the grouping
    in u, where counterfactual distances cannot see it (it belongs in ``f(u, s)``).
``batch_in_z``
    Where the batch effect went: the share of the sample effects explained by the samples'
    batch. For each of ``--local-cells`` random cells, its counterfactual ``z`` under every
    sample (``get_local_sample_representation()``) is centred over samples; the between-batch
    sum of squares over the total, pooled over the cells (:func:`label_share`). Batch belongs
    in the decoder's nuisance path, not in the sample effects, so a calibrated model sits near
    the share of unstructured effects, ``(n_batches - 1) / (n_samples - 1)``
    (``batch_in_z_chance``); well above it means batch effects leak into the sample distances.
``null_p05``
    Calibration: share of cells with p < 0.05 from ``differential_expression`` on the null
    covariate (``age`` / ``null_group``, no effect); 0.05 is calibrated, more is anticonservative.
    Every cell shares the one sample-level design, so this single draw is 0 or large by chance.
``null_perm_p05``
    The same averaged over ``--null-draws`` (default 20) permutations of the null covariate's
    values over samples: an estimate of the expected false-positive rate at 5%. Each draw is one
    more ``differential_expression`` call on every cell; on the reference's side the 20 of them
    take most of a run (unfinished after 70 CPU-minutes in stop 34), so pass ``--null-draws 0`` when only
    the other figures are wanted.
``elbo_val``
    Not an accuracy: the validation negative ELBO per cell after the last epoch (``history
    ["elbo_validation"]`` of either side: one posterior draw per cell, the full KL weight; lower
    is a better fit), to compare how far the two fits got in the same epochs. Each side holds out
    its own random 10% of the cells, which alone moves it by several nats.
``elbo_all``
    ``get_elbo()`` after training on all cells, the same cells for both sides (higher is better).
``trace`` (with ``--trace-every N``)
    ``epoch:cov_contrast/hidden_contrast/batch_share`` after every N-th epoch, from a probe of 400
    cells (:func:`trace_scores`): when each effect was learned, and how much of the sample effects
    the batch still explained (it leaves them early in training; ``batch_in_z_chance`` is the level
    of unstructured effects). Before the effects are learned the disease contrast sits below 0 while
    the batch is in the sample effects: disease is balanced within batches, so pairs of different
    disease status share a batch more often (with 24 samples in 3 batches, 48 of 144 such pairs share a
    batch, against 36 of the 132 others).

The ``pseudobulk`` side trains nothing: it computes the same arrays from the counts with the truth's
labels (pseudobulk distances and fold changes, PCA for u, kNN disease share for DA; see
:func:`pseudobulk_arrays`), a positive control that shows how visible each planted effect is.

Prints one row per run and side, then the medians over seeds side by side, and writes every
row to ``--out`` (.json with the arguments; a .csv next to it).

    python benchmarks/accuracy.py --out results/accuracy.json                  # the full sweep
    python benchmarks/accuracy.py --n-cells 3000 --n-genes 300 --n-samples 12 --epochs 20 \\
        --seeds 0 --out /tmp/accuracy_small.json                               # a quick check
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPOSITORY = HERE.parent
# This checkout's mrvi_pyro, not whichever copy the interpreter has installed.
sys.path[:0] = [str(HERE), str(REPOSITORY)]
import _harness  # noqa: E402

DEFAULT_REFERENCE = "/work/refenv/bin/python"
METRICS = ("cov_auroc", "cov_contrast", "hidden_auroc", "hidden_ari", "hidden_contrast", "gene_auroc",
           "gene_auroc_matched", "da_auroc", "batch_knn", "hidden_in_u", "batch_in_z", "null_p05", "null_perm_p05")
KNN_NEIGHBOURS = 15


def simulate(simulator: str, preset: str, seed: int, args: argparse.Namespace):
    """Simulate one cohort (sparse counts) with either simulator."""
    if simulator == "datasets":
        from mrvi_pyro import datasets

        return datasets.simulate(n_cells=args.n_cells, n_genes=args.n_genes, n_samples=args.n_samples,
                                 n_batches=args.n_batches, seed=seed, preset=preset, sparse=True)
    import _independent_sim

    return _independent_sim.simulate_programs(n_cells=args.n_cells, n_genes=args.n_genes, n_samples=args.n_samples,
                                              n_batches=args.n_batches, seed=seed, preset=preset, sparse=True)


def sample_pairs(distances: np.ndarray, sample_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distance of every unordered sample pair, and whether the pair's labels differ."""
    upper = np.triu_indices(len(sample_labels), k=1)
    return distances[upper], sample_labels[upper[0]] != sample_labels[upper[1]]


def pair_auroc(distances: np.ndarray, sample_labels: np.ndarray) -> float:
    """AUROC of the distance of every unordered sample pair for "labels differ"."""
    from mrvi_pyro._metrics import auroc

    pairs, differ = sample_pairs(distances, sample_labels)
    return auroc(differ, pairs)


def pair_contrast(distances: np.ndarray, sample_labels: np.ndarray) -> float:
    """``log`` of the mean distance of the sample pairs whose labels differ over that of the pairs
    whose labels agree: 0 when the distances ignore the labels, growing with the separation.

    Unlike :func:`pair_auroc`, which reaches 1 as soon as every differing pair is farther apart
    than every agreeing one, it keeps measuring the size of the effect, so runs that all separate
    the groups can still be compared."""
    pairs, differ = sample_pairs(distances, sample_labels)
    return float(np.log(pairs[differ].mean() / pairs[~differ].mean()))


def two_cluster_ari(distances: np.ndarray, sample_labels: np.ndarray) -> float:
    """ARI of an average-linkage 2-cluster cut of the samples against ``sample_labels``."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    from mrvi_pyro._metrics import adjusted_rand_index

    symmetric = (distances + distances.T) / 2
    np.fill_diagonal(symmetric, 0.0)
    clusters = fcluster(linkage(squareform(symmetric, checks=False), method="average"), 2, criterion="maxclust")
    return adjusted_rand_index(clusters, sample_labels)


def knn_batch_accuracy(u: np.ndarray, batches: np.ndarray, k: int = KNN_NEIGHBOURS) -> float:
    """Leave-one-out accuracy of a k-nearest-neighbour majority vote of ``batches`` (any labels;
    ties: lowest code)."""
    squared = (u**2).sum(axis=1)
    distances = squared[:, None] + squared[None, :] - 2 * u @ u.T
    np.fill_diagonal(distances, np.inf)
    neighbours = np.argpartition(distances, k, axis=1)[:, :k]
    codes, batch_codes = np.unique(batches, return_inverse=True)
    votes = np.zeros((len(u), len(codes)))
    np.add.at(votes, (np.repeat(np.arange(len(u)), k), batch_codes[neighbours].ravel()), 1.0)
    return float(np.mean(votes.argmax(axis=1) == batch_codes))


EXPRESSION_STRATA = 10


def stratified_auroc(labels, scores, strata) -> float:
    """AUROC over the (positive, negative) pairs that share a stratum (pooled Mann-Whitney U).

    With genes stratified by expression, a score that only follows expression is near 0.5 however
    the positives were chosen, so the figure measures what the score knows beyond expression.
    """
    from scipy import stats

    labels, scores, strata = np.asarray(labels, bool), np.asarray(scores, float), np.asarray(strata)
    u = pairs = 0.0
    for level in np.unique(strata):
        inside = strata == level
        n_pos, n_neg = int((labels & inside).sum()), int((~labels & inside).sum())
        if n_pos and n_neg:
            ranks = stats.rankdata(scores[inside])
            u += ranks[labels[inside]].sum() - n_pos * (n_pos + 1) / 2
            pairs += n_pos * n_neg
    return float(u / pairs) if pairs else float("nan")


def expression_strata(adata, cell_type: str, n_strata: int = EXPRESSION_STRATA) -> np.ndarray:
    """Per gene, its expression quantile bin (0 .. n_strata - 1): mean library-normalised count
    over the cells of ``cell_type``, from the counts alone (no model, no truth but the type)."""
    from scipy import sparse

    cells = np.flatnonzero((adata.obs["cell_type"] == cell_type).to_numpy())
    counts = adata.X[cells]
    counts = counts.tocsr() if sparse.issparse(counts) else np.asarray(counts)
    totals = np.asarray(counts.sum(axis=1)).ravel()
    scaled = (sparse.diags(1.0 / np.maximum(totals, 1.0)) @ counts) if sparse.issparse(counts) \
        else counts / np.maximum(totals, 1.0)[:, None]
    mean = np.asarray(scaled.mean(axis=0)).ravel()
    order = np.argsort(np.argsort(mean, kind="stable"), kind="stable")
    return order * n_strata // len(mean)


def label_share(local_z: np.ndarray, labels: np.ndarray) -> float:
    """Share of the sample effects in ``local_z`` (cells, S, L) explained by per-sample ``labels`` (S,).

    Each cell's ``z`` is centred over the samples; the between-label sum of squares (each label's
    mean effect, weighted by its number of samples) over the total sum of squares, both pooled
    over cells and latent dimensions. Effects unrelated to the labels give
    ``(n_labels - 1) / (S - 1)`` in expectation; effects that follow the labels give 1.
    """
    import torch

    from mrvi_pyro import explore

    labels = np.asarray(labels)
    indicators = (labels[:, None] == np.unique(labels)[None, :]).astype(np.float64)
    projection = torch.as_tensor(explore.centred_projection(indicators))[None]
    total, between = explore.effect_sums(torch.as_tensor(np.asarray(local_z, dtype=np.float64)), projection)
    total, between = float(total.sum()), float(between.sum())
    return between / total if total > 0 else float("nan")


def trace_scores(arrays, adata) -> list[dict]:
    """Per traced epoch (``--trace-every``): the disease and hidden-group pair contrasts and AUROCs
    of the probe cells' sample distances (each cell type's per-cell distance matrices averaged, as
    ``get_local_sample_distances(groupby=..., keep_cell=False)`` averages all of its cells), and
    ``batch_share``: the share of all probe cells' sample effects that the samples' batch explains
    (:func:`label_share`)."""
    truth, obs = adata.uns["simulation"], adata.obs
    per_sample = obs.groupby("sample", observed=True)[["disease", "hidden_group", "batch"]].first()
    per_sample = per_sample.reindex(arrays["trace_samples"])
    cell_types = obs["cell_type"].to_numpy()[np.asarray(arrays["trace_cells"])]
    effects = (("cov", "de_cell_type", "disease"), ("hidden", "grouping_cell_type", "hidden_group"))
    rows = []
    for epoch, z in zip(np.asarray(arrays["trace_epochs"]).tolist(), np.asarray(arrays["trace_z"], dtype=np.float64)):
        row = {"epoch": int(epoch)}
        for name, type_key, label in effects:
            cells = z[cell_types == truth[type_key]]  # (c, S, L)
            distances = np.sqrt(((cells[:, :, None, :] - cells[:, None, :, :]) ** 2).sum(-1)).mean(0)
            labels = per_sample[label].astype(str).to_numpy()
            row[f"{name}_contrast"] = pair_contrast(distances, labels)
            row[f"{name}_auroc"] = pair_auroc(distances, labels)
        row["batch_share"] = label_share(z, per_sample["batch"].astype(str).to_numpy())
        rows.append(row)
    return rows


def format_trace(rows: list[dict]) -> str:
    """``epoch:cov_contrast/hidden_contrast/batch_share`` of each traced epoch, space-separated."""
    return " ".join(f"{r['epoch']}:{r['cov_contrast']:.2f}/{r['hidden_contrast']:.2f}/{r['batch_share']:.3f}"
                    for r in rows)


def score(arrays, adata, knn_cells: np.ndarray) -> dict:
    """All metrics of one side from its saved arrays and the simulated truth."""
    from mrvi_pyro._metrics import auroc

    truth, obs = adata.uns["simulation"], adata.obs
    per_sample = obs.groupby("sample", observed=True)[["disease", "hidden_group"]].first()
    per_sample = per_sample.reindex(arrays["samples"])
    disease = per_sample["disease"].astype(str).to_numpy()
    hidden = per_sample["hidden_group"].astype(str).to_numpy()
    planted = np.isin(arrays["genes"], truth["de_genes"])
    in_da_type = (obs["cell_type"] == truth["da_cell_type"]).to_numpy()
    batches = obs["batch"].astype(str).to_numpy()
    u = np.asarray(arrays["u"], dtype=np.float64)
    grouping = np.flatnonzero((obs["cell_type"] == truth["grouping_cell_type"]).to_numpy())
    grouping = np.sort(np.random.default_rng(0).choice(grouping, min(len(knn_cells), len(grouping)), replace=False))
    gene_strata = expression_strata(adata, truth["de_cell_type"])
    gene_strata = gene_strata[adata.var_names.get_indexer(np.asarray(arrays["genes"]).astype(str))]
    batch_in_z = None
    if "local_z" in arrays:
        sample_batch = obs.groupby("sample", observed=True)["batch"].agg(lambda b: b.astype(str).mode().iloc[0])
        batch_in_z = label_share(arrays["local_z"], sample_batch.reindex(arrays["local_samples"]).to_numpy())
    return {
        "cov_auroc": pair_auroc(arrays["distances_de"], disease),
        "cov_contrast": pair_contrast(arrays["distances_de"], disease),
        "hidden_auroc": pair_auroc(arrays["distances_grouping"], hidden),
        "hidden_ari": two_cluster_ari(arrays["distances_grouping"], hidden),
        "hidden_contrast": pair_contrast(arrays["distances_grouping"], hidden),
        "gene_auroc": auroc(planted, arrays["mean_abs_lfc"]),
        "gene_auroc_matched": stratified_auroc(planted, arrays["mean_abs_lfc"], gene_strata),
        "da_auroc": auroc(in_da_type, arrays["da_log_ratio"]),
        "batch_knn": knn_batch_accuracy(u[knn_cells], batches[knn_cells]),
        "hidden_in_u": knn_batch_accuracy(u[grouping], obs["hidden_group"].astype(str).to_numpy()[grouping]),
        "batch_chance": 1.0 / obs["batch"].nunique(),
        "batch_in_z": batch_in_z,
        "batch_in_z_chance": (obs["batch"].nunique() - 1) / (len(arrays["samples"]) - 1),
        "null_p05": float(np.mean(np.asarray(arrays["null_pvalue"]) < 0.05)) if "null_pvalue" in arrays else None,
        "null_perm_p05": (float(np.mean(np.asarray(arrays["null_perm_pvalue"]) < 0.05))
                          if np.size(arrays.get("null_perm_pvalue", [])) else None),
        "trace": format_trace(trace_scores(arrays, adata)) if "trace_z" in arrays else None,
        "elbo_val": (float(np.asarray(arrays["elbo_validation"])[-1])
                     if np.size(arrays.get("elbo_validation", [])) else None),
        "elbo_all": float(arrays["elbo_all"]) if "elbo_all" in arrays else None,
    }


def pseudobulk_arrays(adata, n_components: int = 10, n_neighbours: int = 30, chunk: int = 1024) -> dict:
    """The arrays a child saves, computed from the counts with the truth's labels (no model).

    A positive control of the instrument: it shows how much of each planted effect is visible
    in the simulated counts at this size, so a model's figure can be read against it. Distances
    are between per-sample pseudobulk means of log-normalised expression in the cell type;
    |LFC| is the difference of the disease and healthy means of the per-sample pseudobulks
    (natural log); u is the first ``n_components`` principal components (no batch correction);
    the DA log-ratio is ``log`` of the disease share among a cell's ``n_neighbours`` nearest
    cells in u over the healthy share (each relative to its total, +0.5 pseudo-counts). No null
    p-values (``null_p05`` is left empty).
    """
    import scipy.sparse as sp

    counts = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    counts = counts.astype(np.float32)
    values = np.log1p(1e4 * counts / counts.sum(axis=1, keepdims=True))
    truth, obs = adata.uns["simulation"], adata.obs
    samples = np.asarray(obs["sample"].cat.categories).astype(str)
    sample_codes = obs["sample"].cat.codes.to_numpy()
    disease = obs.groupby("sample", observed=False)["disease"].first().reindex(samples).astype(str).to_numpy()

    def pseudobulk(cell_type):
        of_type = (obs["cell_type"] == cell_type).to_numpy()
        sums = np.zeros((len(samples), values.shape[1]))
        np.add.at(sums, sample_codes[of_type], values[of_type])
        present = np.bincount(sample_codes[of_type], minlength=len(samples))
        return sums / np.maximum(present, 1)[:, None], present > 0

    arrays = {"samples": samples, "genes": np.asarray(adata.var_names).astype(str)}
    for name, key in (("distances_de", "de_cell_type"), ("distances_grouping", "grouping_cell_type")):
        means, _ = pseudobulk(truth[key])
        arrays[name] = np.linalg.norm(means[:, None] - means[None], axis=-1)
    means, present = pseudobulk(truth["de_cell_type"])
    is_disease = disease == "disease"
    arrays["mean_abs_lfc"] = np.abs(means[present & is_disease].mean(0) - means[present & ~is_disease].mean(0))

    centred = values - values.mean(axis=0)
    _, eigenvectors = np.linalg.eigh(centred.T @ centred)
    u = centred @ eigenvectors[:, ::-1][:, :n_components]
    arrays["u"] = u
    cell_disease = (obs["disease"] == "disease").to_numpy()
    squared = (u**2).sum(axis=1)
    log_ratio = np.empty(len(u))
    for start in range(0, len(u), chunk):
        rows = slice(start, start + chunk)
        distances = squared[rows, None] + squared[None, :] - 2 * u[rows] @ u.T
        neighbours = np.argpartition(distances, n_neighbours, axis=1)[:, :n_neighbours]
        n_disease = cell_disease[neighbours].sum(axis=1)
        log_ratio[rows] = (np.log((n_disease + 0.5) / cell_disease.sum())
                           - np.log((n_neighbours - n_disease + 0.5) / (~cell_disease).sum()))
    arrays["da_log_ratio"] = log_ratio
    return arrays


def cohort_file(workdir: Path, simulator: str, preset: str, seed: int) -> Path:
    """Where a cohort's counts go in ``workdir``."""
    return workdir / f"{simulator}_{preset}_seed{seed}.h5ad"


def arrays_file(workdir: Path, data: Path, side: str, batch_size: int) -> Path:
    """Where one model side's arrays for the cohort ``data`` at ``batch_size`` go in ``workdir``."""
    return workdir / f"{data.stem}_{side}_b{batch_size}.npz"


def run_side(side: str, data: Path, workdir: Path, seed: int, batch_size: int, args) -> tuple[dict, dict | None]:
    """Train and analyse one side in a fresh process; return its harness record and arrays."""
    if side == "pseudobulk":
        import time

        import anndata

        start = time.perf_counter()
        arrays = pseudobulk_arrays(anndata.read_h5ad(data))
        return {"wall_seconds": time.perf_counter() - start, "peak_rss_gb": None, "result": None}, arrays
    out = arrays_file(workdir, data, side, batch_size)
    python = sys.executable if side == "ours" else args.reference_python
    command = [python, str(HERE / "_accuracy_child.py"), "--side", side, "--data", str(data), "--out", str(out),
               "--seed", seed, "--epochs", args.epochs, "--batch-size", batch_size, "--threads", args.threads,
               "--de-cells", args.de_cells, "--mc-samples", args.mc_samples, "--null-draws", args.null_draws,
               "--local-cells", args.local_cells]
    if args.trace_every > 0:
        command += ["--trace-every", args.trace_every, "--trace-cells", args.trace_cells]
    if side == "ours" and args.ours_kwargs != "{}":
        command += ["--model-kwargs", args.ours_kwargs]
    if side == "ours" and args.ours_zero_masked_grads:
        command += ["--zero-masked-grads"]
    if side == "ours" and args.ours_train_kwargs != "{}":
        command += ["--train-kwargs", args.ours_train_kwargs]
    env = {"OMP_NUM_THREADS": args.threads, "MKL_NUM_THREADS": args.threads}
    if side == "ours":
        env["PYTHONPATH"] = os.pathsep.join([str(REPOSITORY), os.environ.get("PYTHONPATH", "")])
    record = _harness.run_command(command, timeout=args.timeout, extra_env=env)
    if record["returncode"] != 0 or record["result"] is None or not out.exists():
        print(f"  {side} failed (rc={record['returncode']}, timed_out={record['timed_out']}):\n"
              f"{record['stderr'][-2000:]}", file=sys.stderr)
        return record, None
    arrays = dict(np.load(out))
    if not args.keep_data:
        out.unlink()
    return record, arrays


def print_row(row: dict) -> None:
    """One run's row as it finishes, and its trace when it has one."""
    print(format_rows([row], ROW_KEYS), flush=True)
    if row.get("trace"):
        print(f"  trace (epoch:cov_contrast/hidden_contrast/batch_share): {row['trace']}", flush=True)


def format_rows(rows: list[dict], keys: list[str]) -> str:
    """A fixed-width text table of ``rows`` over ``keys``."""
    def cell(value):
        if isinstance(value, float):
            return "-" if value != value else f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
        return "-" if value is None else str(value)

    body = [[cell(row.get(key)) for key in keys] for row in rows]
    widths = [max([len(key)] + [len(line[i]) for line in body]) for i, key in enumerate(keys)]
    lines = ["  ".join(key.rjust(w) for key, w in zip(keys, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(value.rjust(w) for value, w in zip(line, widths)) for line in body]
    return "\n".join(lines)


def medians(rows: list[dict]) -> list[dict]:
    """Median of every metric over seeds, per (simulator, preset, batch size, side)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["simulator"], row["preset"], row["batch_size"], row["side"]), []).append(row)
    out = []
    for (simulator, preset, batch_size, side), group in groups.items():
        summary = {"simulator": simulator, "preset": preset, "batch_size": batch_size, "side": side,
                   "n_seeds": len(group)}
        for key in (*METRICS, "train_s", "total_s"):
            values = [row[key] for row in group if row.get(key) is not None]
            summary[key] = statistics.median(values) if values else None
        out.append(summary)
    return out


ROW_KEYS = ["simulator", "preset", "seed", "batch_size", "side", *METRICS, "batch_chance", "batch_in_z_chance",
            "elbo_val", "elbo_all", "train_s", "total_s"]
MEDIAN_KEYS = ["simulator", "preset", "batch_size", "side", "n_seeds", *METRICS, "train_s", "total_s"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--simulators", nargs="+", default=["datasets", "programs"], choices=["datasets", "programs"])
    parser.add_argument("--presets", nargs="+", default=["weak", "strong"], choices=["weak", "strong"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[256], help="training batch sizes (e.g. 128 256)")
    parser.add_argument("--epochs", type=int, default=100)
    _harness.add_cohort_arguments(parser, n_cells=12_000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every child (default 1)")
    parser.add_argument("--sides", nargs="+", default=["ours", "reference", "pseudobulk"],
                        choices=["ours", "reference", "pseudobulk"],
                        help="pseudobulk: no model, the same metrics from pseudobulks/PCA of the counts "
                             "(a positive control; see pseudobulk_arrays)")
    parser.add_argument("--reference-python", default=DEFAULT_REFERENCE)
    parser.add_argument("--de-cells", type=int, default=0,
                        help="run both DE calls on this many random cells, the same on both sides (0: all)")
    parser.add_argument("--mc-samples", type=int, default=50, help="DE mc_samples on both sides")
    parser.add_argument("--null-draws", type=int, default=20,
                        help="DE on this many permutations of the null covariate over samples (null_perm_p05)")
    parser.add_argument("--ours-zero-masked-grads", action="store_true",
                        help="our side: parameters without a gradient in a step (the prior's while the KL weight "
                             "is 0) get a zero gradient, so that Adam's weight decay moves them as the reference's "
                             "does (an ablation; see parity.py). The package's train(warmup_zero_grads=True) "
                             "does the same up to float rounding (it fills them before the gradient clip, this "
                             "switch after it)")
    parser.add_argument("--ours-kwargs", default="{}",
                        help="JSON of extra MRVI(...) arguments for our side (ablations), e.g. '{\"architecture\": 2}'")
    parser.add_argument("--ours-train-kwargs", default="{}",
                        help="JSON of extra train(...) arguments for our side, e.g. '{\"lr\": 0.002}'")
    parser.add_argument("--knn-cells", type=int, default=3_000, help="cells of the batch kNN subsample")
    parser.add_argument("--local-cells", type=int, default=2_000,
                        help="cells whose counterfactual z under every sample is saved for batch_in_z")
    parser.add_argument("--trace-every", type=int, default=0,
                        help="also score the sample distances of a probe of cells after every this many epochs "
                             "(both sides, without changing the runs): the row's 'trace' gives "
                             "epoch:cov_contrast/hidden_contrast, to see when each effect is learned")
    parser.add_argument("--trace-cells", type=int, default=400, help="probe cells of --trace-every")
    parser.add_argument("--timeout", type=float, default=4 * 3600.0, help="seconds per child")
    parser.add_argument("--workdir", default=None,
                        help="where the .h5ad/.npz files go (default: a temp dir); files of the same names "
                             "already there are refused before any work unless --overwrite")
    parser.add_argument("--keep-data", action="store_true")
    _harness.add_output_arguments(parser, what="results .json (a .csv is written next to it)")
    parser.add_argument("--rescore", action="store_true",
                        help="train nothing: score the .npz files a --keep-data run left in --workdir")
    args = parser.parse_args(argv)
    _harness.refuse_existing(parser, [args.out, Path(args.out).with_suffix(".csv")], args.overwrite)
    if args.rescore:
        return rescore(args)
    if "reference" in args.sides and not os.path.exists(args.reference_python):
        parser.error(f"--reference-python {args.reference_python} does not exist; pass it or --sides ours")

    if args.workdir is not None:  # a folder of the user's: replace none of its files unless told to
        _harness.refuse_existing(parser, planned_files(args, Path(args.workdir)), args.overwrite, "--workdir")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="mrvi_accuracy_"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for simulator in args.simulators:
        for preset in args.presets:
            for seed in args.seeds:
                adata = simulate(simulator, preset, seed, args)
                data = cohort_file(workdir, simulator, preset, seed)
                adata.write_h5ad(data)
                knn_cells = np.sort(np.random.default_rng(seed).choice(
                    adata.n_obs, min(args.knn_cells, adata.n_obs), replace=False))
                for batch_size in args.batch_sizes:
                    for side in args.sides:
                        record, arrays = run_side(side, data, workdir, seed, batch_size, args)
                        row = {"simulator": simulator, "preset": preset, "seed": seed, "batch_size": batch_size,
                               "side": side, "total_s": record["wall_seconds"],
                               "peak_rss_gb": record["peak_rss_gb"], "failed": arrays is None}
                        if arrays is not None:
                            row.update(score(arrays, adata, knn_cells))
                        if record["result"] is not None:
                            row["seconds"] = record["result"]["seconds"]
                            row["train_s"] = row["seconds"]["train"]
                        rows.append(row)
                        print_row(row)
                if not args.keep_data:
                    data.unlink()

    return report(rows, args)


def planned_files(args, workdir: Path) -> list[Path]:
    """The files a run writes in ``workdir``: one .h5ad per cohort, one .npz per model side and batch size."""
    files = []
    for simulator in args.simulators:
        for preset in args.presets:
            for seed in args.seeds:
                data = cohort_file(workdir, simulator, preset, seed)
                files.append(data)
                files += [arrays_file(workdir, data, side, batch_size)
                          for batch_size in args.batch_sizes for side in args.sides if side != "pseudobulk"]
    return files


def rescore(args) -> int:
    """Score the arrays a ``--keep-data`` run left in ``--workdir`` (e.g. after adding a metric)."""
    import re

    import anndata

    if args.workdir is None:
        raise SystemExit("--rescore needs --workdir (the folder of a --keep-data run)")
    rows = []
    for data in sorted(Path(args.workdir).glob("*_seed*.h5ad")):
        simulator, preset, seed = re.fullmatch(r"(\w+?)_(\w+)_seed(\d+)", data.stem).groups()
        adata = anndata.read_h5ad(data)
        knn_cells = np.sort(np.random.default_rng(int(seed)).choice(
            adata.n_obs, min(args.knn_cells, adata.n_obs), replace=False))
        for out in sorted(Path(args.workdir).glob(f"{data.stem}_*_b*.npz")):
            side, batch_size = re.fullmatch(rf"{data.stem}_(\w+)_b(\d+)", out.stem).groups()
            row = {"simulator": simulator, "preset": preset, "seed": int(seed), "batch_size": int(batch_size),
                   "side": side, "failed": False, **score(dict(np.load(out)), adata, knn_cells)}
            rows.append(row)
            print_row(row)
    return report(rows, args)


def report(rows: list[dict], args) -> int:
    """Print every run and the medians; write ``--out`` (.json and .csv)."""
    print("\nAll runs")
    print(format_rows(rows, ROW_KEYS))
    summary = medians([row for row in rows if not row["failed"]])
    seeds = sorted({row["seed"] for row in rows})
    print(f"\nMedians over seeds {seeds} (chance: AUROC 0.5, ARI 0, batch_knn 1/{args.n_batches}; "
          f"null_p05 target 0.05)")
    print(format_rows(summary, MEDIAN_KEYS))

    out = Path(args.out)
    _harness.write_text_atomic(out, json.dumps({"arguments": vars(args), "runs": rows, "medians": summary},
                                               indent=1, default=str))
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=[*ROW_KEYS, "peak_rss_gb", "failed"], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    _harness.write_text_atomic(out.with_suffix(".csv"), table.getvalue())
    print(f"\nwrote {out} and {out.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
