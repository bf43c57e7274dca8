"""The analysis pipeline behind the ``mrvi-pyro`` command: fit, analyse, check against truth.

- :func:`fit_and_save` trains MrVI (in one process, with a resumable checkpoint, or
  data-parallel on local ranks) and writes the model, its history and figures.
- :func:`analyze_model` runs the analyses on a trained model, one named step each
  (:func:`distances_step`, :func:`mixing_step`, :func:`de_step`, :func:`da_step`, after
  :func:`overview_section`), and
  writes arrays (zarr), tables (CSV), figures (PNG) and ``report.html``.
- :func:`check_against_truth` compares those results with a simulation's planted truth.
- :func:`run_demo` chains them on a simulated cohort.

The functions write into the directory they are given and never choose where a run lives:
:mod:`mrvi_pyro.cli` owns the output directories (locks, staging, ``--overwrite``), argument
parsing, exit codes and Ctrl-C. Figures and tables are what the report shows; their file names
are listed in :data:`RUN_OUTPUTS` and :data:`ANALYSIS_OUTPUTS`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

# Only the standard library here: the command imports this module for its output names before it
# parses arguments (``mrvi-pyro --help`` stays fast); numpy, torch, anndata and matplotlib are
# imported inside the functions.

RUN_OUTPUTS = ("model", "fit.json", "history.csv", "training_history.png", "u_embedding.png", "simulated.h5ad")
"""What :func:`fit_and_save` (and :func:`run_demo`) write into a run directory."""
ANALYSIS_OUTPUTS = ("results", "posterior_predictive_check.csv", "posterior_predictive_check.png",
                    "sample_mixing_in_u.csv", "sample_mixing_in_u.png", "sample_distance_spread.csv",
                    "sample_distances_*.png", "de_summary.csv",
                    "de_effect_size.png", "de_top_genes.png", "de_volcano.png", "da_summary.csv", "da_log_ratio.png",
                    "report.html")
"""What :func:`analyze_model` writes (beside the model's figures, which it redraws)."""


def read_h5ad(path: str | Path):
    """Read an ``.h5ad`` file; a missing or foreign file is a one-line ``ValueError``."""
    import anndata

    file = Path(path)
    if not file.is_file():
        raise ValueError(f"data file {path} does not exist")
    try:
        return anndata.read_h5ad(file)
    except Exception as err:  # h5py and anndata raise many types for foreign files
        raise ValueError(f"{path} is not a readable .h5ad file ({type(err).__name__}: {err})") from None


# ---------------------------------------------------------------------------------------- fit


def train_rank(data_path: str, keys: dict, seed: int, options: dict):
    """One rank of ``fit --nproc``: read the data, train data-parallel (rank 0 writing the
    checkpoint when ``options`` name one), return the weights and history (rank 0's are what the
    launching process keeps)."""
    from . import MRVI, distributed

    adata = read_h5ad(data_path)
    MRVI.setup_anndata(adata, **keys)
    model = MRVI(adata, seed=seed)
    progress_bar = options.pop("progress_bar") and distributed.rank() == 0
    model.train(**options, seed=seed, progress_bar=progress_bar)
    return {k: v.cpu() for k, v in model.module.state_dict().items()}, model.history


def fit_and_save(adata, out: Path, *, sample_key: str, batch_key=None, labels_key=None, layer=None,
                 max_epochs=None, batch_size=128, seed=0, quiet=False, data_path=None, shown_dir=None,
                 checkpoint_dir=None, nproc=1):
    """Register ``adata`` (unless it already is, with these keys), train MrVI (with a checkpoint
    in ``checkpoint_dir``, resumed if it holds one), save it to ``out/model`` with history and
    figures. ``shown_dir`` names ``out`` in messages.

    ``nproc > 1`` trains data-parallel on that many local ranks (:func:`mrvi_pyro.distributed.launch`;
    each reads ``data_path``), with ``batch_size`` the global minibatch; rank 0 writes the
    checkpoint, and this process then writes the outputs."""
    from . import MRVI, distributed, pl
    from .data import REGISTRY_KEY, get_registry

    keys = (sample_key, batch_key, labels_key, layer)
    registry = get_registry(adata) if REGISTRY_KEY in adata.uns else None
    if registry is None or (registry.sample_key, registry.batch_key, registry.labels_key, registry.layer) != keys:
        MRVI.setup_anndata(adata, sample_key=sample_key, batch_key=batch_key, labels_key=labels_key, layer=layer)
    model = MRVI(adata, seed=seed)
    start = time.perf_counter()
    if nproc > 1:
        options = {"max_epochs": max_epochs, "batch_size": batch_size, "progress_bar": not quiet,
                   "checkpoint_dir": None if checkpoint_dir is None else str(checkpoint_dir)}
        state, history = distributed.launch(train_rank, nproc, str(data_path), dict(zip(
            ("sample_key", "batch_key", "labels_key", "layer"), keys)), seed, options)
        model.module.load_state_dict(state)
        model.history, model.is_trained = history, True
    else:
        model.train(max_epochs=max_epochs, batch_size=batch_size, seed=seed, progress_bar=not quiet,
                    checkpoint_dir=checkpoint_dir)
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / "model")
    (out / "fit.json").write_text(json.dumps({"data": str(Path(data_path).resolve()) if data_path else None}))
    model.history.to_csv(out / "history.csv")
    pl.training_history(model.history).savefig(out / "training_history.png", dpi=110)
    colors = [k for k in (labels_key, batch_key, sample_key) if k is not None][:2]
    pl.embedding(adata, color=colors, latent=model.get_latent_representation(), title="MrVI u (PCA)").savefig(
        out / "u_embedding.png", dpi=110)
    last = model.history.iloc[-1]
    val = f", validation {last['elbo_validation']:.1f}" if "elbo_validation" in last else ""
    ranks = f" on {nproc} ranks" if nproc > 1 else ""
    print(f"trained {len(model.history)} epochs{ranks} in {seconds:.1f} s; -ELBO/cell train {last['elbo_train']:.1f}"
          f"{val} (model: {Path(shown_dir or out) / 'model'})")
    return model


# ------------------------------------------------------------------------------------ analyse


def check_columns(adata, groupby: str, de: str | None, da: str | None, basis: str | None = None) -> None:
    """One-line errors (naming the command's flags) for keys that ``adata`` does not hold."""
    if groupby not in adata.obs:
        raise ValueError(f"--groupby {groupby!r} is not a column of obs (columns: {list(adata.obs.columns)})")
    for flag, key in (("--de", de), ("--da", da)):
        if key is not None and key not in adata.obs:
            raise ValueError(f"{flag} {key!r} is not a column of obs (columns: {list(adata.obs.columns)})")
    if basis is not None and basis not in adata.obsm:
        raise ValueError(f"--basis {basis!r} is not a key of obsm (keys: {list(adata.obsm.keys())})")


def analysis_rank(data_path: str, model_dir: str, groupby: str, da: str | None, de: str | None = None,
                  mc_samples: int = 20, seed: int = 0) -> dict:
    """One rank of ``analyze --nproc``: the sharded analyses, distances, DE (with its decoded
    LFCs, as :func:`de_step` asks them) and DA (rank 0's results come back)."""
    from . import MRVI

    adata = read_h5ad(data_path)
    model = MRVI.load(model_dir, adata=adata)
    results = {"distances": model.get_local_sample_distances(adata, groupby=groupby, keep_cell=False)}
    if de is not None:
        results["de"] = model.differential_expression(adata, **de_arguments(de, mc_samples, seed))
    if da is not None:
        results["da"] = model.differential_abundance(adata, sample_cov_keys=[da])
    return results


@dataclass(frozen=True)
class AnalysisCanvas:
    """Where the analysis steps write (``out``, its ``results/`` for arrays) and what they draw
    cells on (``coords``, 2-d, with their axes' name), for cells grouped by ``groupby``."""

    out: Path
    groupby: str
    coords: object
    axes_name: str
    quiet: bool = False

    def figure(self, fig, name: str, caption: str) -> tuple[Path, str]:
        """Save ``fig`` as ``out/name`` and close it; return the report's (path, caption)."""
        import matplotlib.pyplot as plt

        fig.savefig(self.out / name, dpi=110, bbox_inches="tight")  # nothing cut at the edges
        plt.close(fig)
        return self.out / name, caption

    def array(self, dataset, name: str) -> None:
        """Write a Dataset as ``results/name`` in zarr format 2 (portable: its string
        coordinates have a stable spec)."""
        dataset.to_zarr(self.out / "results" / name, mode="w", zarr_format=2, consolidated=True)

    def say(self, message: str) -> None:
        """Announce a step (unless ``quiet``)."""
        if not self.quiet:
            print(f"[analyze] {message}", flush=True)


def overview_section(model, adata, canvas: AnalysisCanvas, basis: str | None):
    """The report's first section: the model, its training curves and the cells' embedding."""
    from . import pl
    from .report import Section

    overview = Section("Model", preformatted=[repr(model)])
    if model.history is not None:
        overview.figures.append(canvas.figure(pl.training_history(model.history), "training_history.png",
                                              "Training curves: -ELBO per cell of the training and validation "
                                              "cells, per epoch."))
    where = f"{basis}" if basis else "the first two principal components of u"
    overview.figures.append(canvas.figure(
        pl.embedding(canvas.coords, obs=adata.obs, color=[canvas.groupby, model.registry.sample_key],
                     basis_name=canvas.axes_name),
        "u_embedding.png", f"Cells on {where}, coloured by {canvas.groupby} and by sample."))
    return overview


def mixing_step(model, adata, canvas: AnalysisCanvas, covariates: list[str] | None = None):
    """How the samples, the batch and ``covariates`` mix in u per group
    (:meth:`mrvi_pyro.MRVI.get_sample_mixing_in_u`), announced when one is kept apart.

    Returns ``({"sample_mixing"}, section)``."""
    from . import pl
    from .report import Section

    groupby = canvas.groupby
    table = model.get_sample_mixing_in_u(covariates, adata, groupby=groupby, warn=False)
    table.to_csv(canvas.out / "sample_mixing_in_u.csv", index=False)
    kept = table[table["kept"]]
    paragraphs = ["u is meant to hold the cell state without the sample: every cell's 15 nearest neighbours in u "
                  "should come from samples, batches and covariate levels as by chance (excess 0); 1 means "
                  "u separates them completely."]
    if len(kept):
        listed = ", ".join(f"{row.covariate} in {row.group} (excess {row.excess:.2f})" for row in kept.itertuples())
        canvas.say(f"WARNING: u keeps sample structure apart: {listed}; retrain from another seed and compare")
        paragraphs.append(f"Kept in u: {listed}. An effect kept in u is invisible to the sample distances, DE and "
                          "DA of those cells; retrain from another initialisation (or longer) and compare.")
    figure = canvas.figure(pl.sample_mixing_heatmap(table), "sample_mixing_in_u.png",
                           f"Excess nearest-neighbour agreement in u per {groupby} and covariate (framed: kept "
                           "in u).")
    return {"sample_mixing": table}, Section(
        "Sample mixing in u", paragraphs, [figure],
        [(f"Nearest-neighbour agreement in u against chance, per {groupby}", table.round(3))])


FIT_CHECK_CELLS = 2000
"""At most this many cells (a seeded subset) enter the report's posterior predictive check."""
FIT_CHECK_DRAWS = 20
"""Replicated data sets drawn for the report's posterior predictive check."""


def fit_step(model, adata, canvas: AnalysisCanvas, *, seed: int = 0):
    """How well the model reproduces the counts (:meth:`mrvi_pyro.MRVI.posterior_predictive_check`
    on at most :data:`FIT_CHECK_CELLS` cells, :data:`FIT_CHECK_DRAWS` draws).

    Returns ``({"posterior_predictive_check"}, section)``."""
    import numpy as np

    from . import pl
    from .report import Section

    cells = np.arange(adata.n_obs)
    if adata.n_obs > FIT_CHECK_CELLS:
        cells = np.sort(np.random.default_rng(seed).choice(adata.n_obs, FIT_CHECK_CELLS, replace=False))
    table = model.posterior_predictive_check(adata, indices=cells, n_samples=FIT_CHECK_DRAWS, seed=seed)
    table.to_csv(canvas.out / "posterior_predictive_check.csv", index=False)
    coverage = table.groupby("statistic", observed=True)["inside"].mean().rename("share of genes inside").to_frame()
    shares = ", ".join(f"{name.replace('_', ' ')} {share:.0%}" for name, share in coverage.iloc[:, 0].items())
    paragraphs = [
        f"{FIT_CHECK_DRAWS} replicated data sets of {len(cells)} cells"
        + (" (a random subset)" if len(cells) < adata.n_obs else "")
        + " were drawn from the fitted model (posterior draws of u and z, then counts from the likelihood), "
        "and each gene's mean, variance, share of zeros and coefficient of variation over the cells compared "
        f"with the observed ones. Share of genes whose observed value lies in the central 90% of the draws: "
        f"{shares}; near 90% for a model that fits. Far lower shares, or points off the diagonal, show what "
        "the fit misses (often an over- or under-dispersed likelihood); these cells include training cells.",
    ]
    figure = canvas.figure(pl.posterior_predictive_check(table), "posterior_predictive_check.png",
                           "Observed against replicated per-gene statistics (bars: central 90% of the draws).")
    return {"posterior_predictive_check": table}, Section(
        "Model fit: posterior predictive check", paragraphs, [figure],
        [("Coverage of the 90% band per statistic", coverage.round(3))])


def _file_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))


def distances_step(model, adata, canvas: AnalysisCanvas, *, color_by: list[str] | None = None, distances=None):
    """Local sample distances averaged per group (computed unless given), the mean
    between-sample distance of each group, and heatmaps of the 6 most spread groups.

    Returns ``({"distances", "distance_spread"}, section)``."""
    import numpy as np
    import pandas as pd

    from . import pl
    from .report import Section

    groupby = canvas.groupby
    canvas.say(f"local sample distances by {groupby}")
    if distances is None:
        distances = model.get_local_sample_distances(adata, groupby=groupby, keep_cell=False)
    canvas.array(distances, "local_sample_distances.zarr")
    group_means = distances[groupby]
    names = [str(v) for v in group_means[f"{groupby}_name"].values]
    off_diagonal = ~np.eye(group_means.sizes["sample_x"], dtype=bool)
    spread = pd.DataFrame({groupby: names,
                           "mean_between_sample_distance": [float(group_means.values[i][off_diagonal].mean())
                                                            for i in range(len(names))]})
    spread = spread.sort_values("mean_between_sample_distance", ascending=False)
    spread.to_csv(canvas.out / "sample_distance_spread.csv", index=False)
    figures = [canvas.figure(pl.sample_distance_heatmap(group_means, group=name, sample_info=model.sample_info,
                                                        color_by=color_by, title=f"{groupby} = {name}"),
                             f"sample_distances_{_file_name(name)}.png",
                             f"Distances between samples in the cells of {groupby} {name}, samples ordered by "
                             "hierarchical clustering; one colour scale for all groups.")
               for name in spread[groupby].head(6)]
    section = Section(f"Local sample distances by {groupby}",
                      ["Average distance between the counterfactual states of each pair of samples, over the "
                       f"cells of each {groupby} (largest spread first; up to 6 groups shown)."],
                      figures, [(f"Mean distance between two samples, per {groupby}",
                                 spread.rename(columns={"mean_between_sample_distance": "mean distance"}))])
    return {"distances": distances, "distance_spread": spread}, section


def de_top_genes(table, groupby: str, n_genes: int = 5):
    """One row per group of a DE summary: cells, mean effect size, share of significant cells
    and the ``n_genes`` top genes with their mean log2 fold-changes (largest effect first)."""
    import pandas as pd

    rows = []
    for group in pd.unique(table["group"]):
        part = table[table["group"] == group]
        first = part.iloc[0]
        row = {groupby: str(group), "cells": int(first["n_cells"]),
               "mean effect size": float(first["effect_size_mean"]),
               "share of cells with padj < 0.05": float(first["frac_significant"])}
        if "gene" in part:
            top = part.sort_values("rank").head(n_genes)
            row[f"top {n_genes} genes (mean log2 FC)"] = ", ".join(
                f"{gene} ({lfc:+.2f})" for gene, lfc in zip(top["gene"], top["lfc_mean"]))
        rows.append(row)
    return pd.DataFrame(rows).sort_values("mean effect size", ascending=False)


def de_arguments(covariate: str, mc_samples: int, seed: int) -> dict:
    """The ``differential_expression`` arguments of the pipeline's DE step (one place, so the
    ranks of ``analyze --nproc`` compute what one process computes)."""
    return {"sample_cov_keys": [covariate], "store_lfc": True, "mc_samples": mc_samples, "seed": seed}


def de_step(model, adata, canvas: AnalysisCanvas, covariate: str, *, mc_samples: int = 20, seed: int = 0,
            de_result=None):
    """Differential expression for the sample covariate ``covariate`` (computed unless given)
    with stored log fold-changes, its per-group summary of every gene, and its figures.

    Returns ``({"de", "de_table"}, section)``."""
    from . import pl
    from .report import Section

    groupby = canvas.groupby
    canvas.say(f"differential expression for {covariate}")
    if de_result is None:
        de_result = model.differential_expression(adata, **de_arguments(covariate, mc_samples, seed))
    canvas.array(de_result, "differential_expression.zarr")
    table = model.differential_expression_summary(de_result, groupby=groupby, adata=adata, n_top_genes=None)
    table.to_csv(canvas.out / "de_summary.csv", index=False)
    column = str(de_result["covariate"].values[0])
    figures = [
        canvas.figure(pl.effect_size_embedding(de_result, canvas.coords, covariate=column, obs=adata.obs,
                                               color=groupby, basis_name=canvas.axes_name), "de_effect_size.png",
                      f"Per-cell effect size of {column} and its adjusted p-value, on the cells' embedding."),
        canvas.figure(pl.top_genes_heatmap(table, covariate=column, n_genes=5), "de_top_genes.png",
                      f"Mean log2 fold-change of the 5 top genes of each {groupby}."),
        canvas.figure(pl.volcano(table, covariate=column), "de_volcano.png",
                      f"Volcano plot per {groupby}: mean log2 fold-change against the posterior probability "
                      "that the change is smaller than delta (shared axes)."),
    ]
    section = Section(f"Differential expression: {column}",
                      ["Per-cell regression of counterfactual states on the sample covariate; effect size = "
                       "chi-squared statistic; log fold-changes decoded with paired posterior draws. The "
                       "full table of every gene is de_summary.csv."],
                      figures, [(f"Top genes of every {groupby}", de_top_genes(table, groupby))])
    return {"de": de_result, "de_table": table}, section


def da_step(model, adata, canvas: AnalysisCanvas, covariate: str, *, seed: int = 0, da_result=None):
    """Differential abundance for the sample covariate ``covariate`` (computed unless given),
    its log-ratio summary per group with uncertainty, and its figure.

    Returns ``({"da", "da_summary", "da_table"}, section)``."""
    from . import pl
    from .report import Section

    groupby = canvas.groupby
    canvas.say(f"differential abundance for {covariate}")
    if da_result is None:
        da_result = model.differential_abundance(adata, sample_cov_keys=[covariate])
    canvas.array(da_result, "differential_abundance.zarr")
    summary = model.differential_abundance_summary(covariate, adata=adata, groupby=groupby, seed=seed)
    per_group = summary[[v for v in summary.data_vars if v.startswith(f"{groupby}_")]].to_dataframe()
    per_group.to_csv(canvas.out / "da_summary.csv")
    g1, g2 = summary.attrs.get("group1"), summary.attrs.get("group2")
    figure = canvas.figure(pl.log_ratio_summary(summary, canvas.coords, adata.obs, groupby=groupby,
                                                basis_name=canvas.axes_name),
                           "da_log_ratio.png",
                           f"Log-ratio of the {g1} and {g2} samples' densities at each cell (left) and its "
                           f"distribution per {groupby} with the group mean and highest-density interval (right).")
    shown = per_group.reset_index().rename(columns=lambda c: c.removeprefix(f"{groupby}_"))
    interval = f"{100 * summary.attrs.get('hdi_prob', 0.95):.0f}% HDI"
    shown = shown.rename(columns={"name": groupby, "log_ratio": "mean log-ratio", "log_ratio_sd": "sd",
                                  "log_ratio_lower": f"{interval} lower", "log_ratio_upper": f"{interval} upper",
                                  "prob_positive": "P(log-ratio > 0)", "n_cells": "cells"})
    section = Section(f"Differential abundance: {g1} vs {g2}",
                      ["Log-ratio of the aggregated posteriors of the two sample groups at each cell (each cell's "
                       "posterior widened by a Gaussian kernel of Scott's width), with uncertainty from posterior "
                       "draws and Bayesian-bootstrap weights over samples."],
                      [figure], [(f"Mean log-ratio per {groupby}", shown)])
    return {"da": da_result, "da_summary": summary, "da_table": per_group}, section


def analyze_model(model, adata, out: Path, *, groupby: str, de: str | None = None, da: str | None = None,
                  quiet: bool = False, mc_samples: int = 20, seed: int = 0, basis: str | None = None,
                  data_path: str | Path | None = None, command: list[str] | None = None,
                  precomputed: dict | None = None) -> dict:
    """Run the analyses on a trained model and write arrays (zarr), tables (CSV), figures (PNG)
    and ``report.html`` into ``out``. Returns the results by name. Cells are drawn on
    ``adata.obsm[basis]`` (e.g. ``"X_umap"``), or on the first two principal components of u
    when ``basis`` is None. ``data_path`` (named and checksummed) and ``command`` go into the
    report's run metadata. ``precomputed`` holds results computed elsewhere (``"distances"``,
    ``"de"``, ``"da"``: e.g. by ranks of ``analyze --nproc``), used instead of computing them here."""
    from . import pl
    from .report import run_metadata, write_html_report

    check_columns(adata, groupby, de, da, basis)
    out = Path(out)
    (out / "results").mkdir(parents=True, exist_ok=True)
    precomputed = precomputed or {}
    coords, axes_name = pl.basis_coords(adata, basis, latent=model.get_latent_representation(adata))
    canvas = AnalysisCanvas(out, groupby, coords, axes_name, quiet)
    sections = [overview_section(model, adata, canvas, basis)]
    color_by = list(dict.fromkeys(c for c in (de, da) if c is not None and c in model.sample_info)) or None
    results, section = distances_step(model, adata, canvas, color_by=color_by,
                                      distances=precomputed.get("distances"))
    sections.append(section)
    step_results, section = mixing_step(model, adata, canvas, color_by)
    results.update(step_results)
    sections.insert(1, section)
    if de is not None:
        step_results, section = de_step(model, adata, canvas, de, mc_samples=mc_samples, seed=seed,
                                        de_result=precomputed.get("de"))
        results.update(step_results)
        sections.append(section)
    if da is not None:
        step_results, section = da_step(model, adata, canvas, da, seed=seed, da_result=precomputed.get("da"))
        results.update(step_results)
        sections.append(section)
    step_results, section = fit_step(model, adata, canvas, seed=seed)
    results.update(step_results)
    sections.insert(1, section)
    write_html_report(out / "report.html", "mrvi_pyro analysis report", sections,
                      metadata=run_metadata(data_path=data_path, seed=seed, command=command))
    return results


# ------------------------------------------------------------------- checks against the truth


def knn_agreement(coords, labels, k: int = 15) -> float:
    """Share of each cell's k nearest neighbours (in ``coords``) that share its label."""
    from . import explore

    return explore.label_agreement(explore.nearest_neighbours(coords, k), labels)


def check_against_truth(model, results: dict, truth) -> list[str]:
    """One line per analysis comparing its result (from :func:`analyze_model`) with the
    simulation's planted truth (``adata.uns["simulation"]`` of :func:`mrvi_pyro.datasets.simulate`)."""
    import numpy as np

    from . import explore
    from ._metrics import adjusted_rand_index, auroc

    lines = []
    group_type, group_key = truth["grouping_cell_type"], truth["grouping_covariate"]
    matrix = results["distances"]["cell_type"].sel(cell_type_name=group_type).values
    clusters = explore.sample_groups(explore.sample_linkage(matrix), 2)
    ari = adjusted_rand_index(model.sample_info[group_key].astype(str), clusters)
    top_two = ", ".join(results["distance_spread"]["cell_type"].head(2))
    lines.append(f"distances: largest between-sample spread in {top_two} (planted sample effects: "
                 f"{truth['de_cell_type']} by {truth['de_covariate']}, {group_type} by {group_key}); "
                 f"{group_type}'s 2 sample clusters vs the planted {group_key}: ARI {ari:.2f}")
    if "de_table" in results:
        table = results["de_table"]
        effect = table.drop_duplicates("group").set_index("group")["effect_size_mean"].sort_values(ascending=False)
        genes = table[table["group"] == truth["de_cell_type"]].set_index("gene")
        planted = dict(zip(truth["de_genes"], truth["de_log_fold_changes"]))
        score = auroc([g in planted for g in genes.index], genes["lfc_mean"].abs())
        signs = np.mean([np.sign(genes.loc[g, "lfc_mean"]) == np.sign(v) for g, v in planted.items()])
        lines.append(f"DE: highest effect size in {effect.index[0]} (planted: {truth['de_cell_type']}); planted genes "
                     f"by |lfc|: AUROC {score:.2f}, signs agree {signs:.0%}")
    if "da_table" in results:
        table = results["da_table"]
        top = table["cell_type_log_ratio"].idxmax()
        lines.append(f"DA: highest log-ratio in {top} ({table.loc[top, 'cell_type_log_ratio']:.2f}, "
                     f"P(>0) {table.loc[top, 'cell_type_prob_positive']:.2f}) (planted: {truth['da_cell_type']})")
    return lines


def run_demo(out: Path, *, shown_dir: Path, n_cells: int = 3000, n_genes: int = 200, n_samples: int = 12,
             max_epochs: int = 100, batch_size: int = 128, seed: int = 3, quiet: bool = False,
             command: list[str] | None = None) -> list[str]:
    """Simulate a cohort with planted truth, fit MrVI and analyse it into ``out`` (``shown_dir``
    names it in messages and in ``fit.json``); return :func:`check_against_truth`'s lines."""
    from . import datasets

    adata = datasets.simulate(n_cells=n_cells, n_genes=n_genes, n_samples=n_samples, seed=seed)
    truth = adata.uns["simulation"]
    adata.write_h5ad(out / "simulated.h5ad")
    print(f"simulated {adata.n_obs} cells x {adata.n_vars} genes, {n_samples} samples, "
          f"{adata.obs['batch'].nunique()} batches (data: simulated.h5ad)")
    model = fit_and_save(adata, out, sample_key="sample", batch_key="batch", max_epochs=max_epochs,
                         batch_size=batch_size, seed=seed, quiet=quiet, data_path=shown_dir / "simulated.h5ad",
                         shown_dir=shown_dir)
    u = model.get_latent_representation()
    score = knn_agreement(coords=u, labels=adata.obs["cell_type"].to_numpy())
    batch_score = knn_agreement(coords=u, labels=adata.obs["batch"].to_numpy())
    print(f"u embedding: cell-type kNN agreement {score:.2f}, batch kNN agreement {batch_score:.2f} "
          f"(lower is better mixed; chance {adata.obs['batch'].value_counts(normalize=True).max():.2f}) "
          "(figure: u_embedding.png)")
    results = analyze_model(model, adata, out, groupby="cell_type", de=truth["de_covariate"],
                            da=truth["da_covariate"], quiet=quiet, mc_samples=10, seed=seed,
                            data_path=out / "simulated.h5ad", command=command)
    return check_against_truth(model, results, truth)
