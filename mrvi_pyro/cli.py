"""The ``mrvi-pyro`` command.

- ``mrvi-pyro fit DATA.h5ad --sample-key K [--batch-key K] [--labels-key K] [--layer L] [--nproc N] --out DIR``
  trains MrVI (data-parallel on N local processes with ``--nproc``) and saves it (``DIR/model``)
  with its training history and figures. A checkpoint written after every epoch
  (``DIR/checkpoint``; by rank 0 with ``--nproc``) lets ``--resume`` continue a fit that was
  interrupted (Ctrl-C, a kill, a crash) exactly where it stopped, with the same ``--nproc``.
- ``mrvi-pyro analyze DIR --groupby KEY [--de KEY] [--da KEY] [--nproc N]`` runs the analyses
  (local sample distances and DA sharded over N local processes with ``--nproc``) and writes
  arrays, tables, figures and a report.
- ``mrvi-pyro demo --out DIR`` simulates a cohort with planted truth, trains MrVI on it, saves the
  model and writes figures and a summary.

Errors in user input are printed as one line (``error: ...``) with exit status 2, never as a
traceback; Ctrl-C exits with status 130.

Outputs are never lost or mixed: ``fit`` and ``demo`` check ``--out`` before training, refuse a
non-empty one unless ``--overwrite`` (and then only a previous run directory), build the run in
a temporary sibling and rename it into place when complete, so an interrupted run leaves
``--out`` as it was, apart from the checkpoint of the interrupted fit in ``--out/checkpoint``
(Ctrl-C prints the command that resumes it). ``analyze`` holds a lock file in its output directory, refuses earlier
analysis outputs unless ``--overwrite`` (which removes them, so no stale DE/DA result stays
beside new ones), writes into a temporary subdirectory and moves the results in at the end.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

# numpy, pandas, torch, anndata and matplotlib are imported inside the subcommands, so that
# `mrvi-pyro --help` and `--version` answer at once.


CHECKPOINT_DIR = "checkpoint"
"""Where ``fit`` keeps its training checkpoint inside the run directory."""
RUN_OUTPUTS = ("model", CHECKPOINT_DIR, "fit.json", "history.csv", "training_history.png", "u_embedding.png", "simulated.h5ad")
"""What ``fit`` (and ``demo``) write into a run directory."""
ANALYSIS_OUTPUTS = ("results", "sample_distance_spread.csv", "sample_distances_*.png", "de_summary.csv",
                    "de_effect_size.png", "de_top_genes.png", "de_volcano.png", "da_summary.csv", "da_log_ratio.png",
                    "report.html")
"""What ``analyze`` writes (beside the model's figures, which it redraws)."""


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _run_rule(path: Path) -> str | None:
    """``replaceable`` rule of run directories: only our own outputs, and no analysis running."""
    from ._safe_io import LOCK_FILE, lock_owner

    from .checkpoint import checkpoint_rule

    if lock_owner(path / LOCK_FILE) is not None:
        return f"another mrvi-pyro process is writing to it ({path / LOCK_FILE})"
    checkpoint = path / CHECKPOINT_DIR
    if checkpoint.exists() and (not checkpoint.is_dir() or checkpoint_rule(checkpoint) is not None):
        return f"its {CHECKPOINT_DIR!r} is not a mrvi_pyro checkpoint"
    foreign = sorted(p.name for p in path.iterdir()
                     if p.name != LOCK_FILE and not _matches(p.name, RUN_OUTPUTS + ANALYSIS_OUTPUTS))
    return f"holds files mrvi-pyro does not write ({foreign[:5]})" if foreign else None


def _staged_run(out: Path, overwrite: bool):
    from ._safe_io import staged_directory

    return staged_directory(out, overwrite=overwrite, what="--out", replaceable=_run_rule, flag="--overwrite")


def _demo(args: argparse.Namespace) -> int:
    from . import __version__, datasets

    out = Path(args.out)
    with _staged_run(out, args.overwrite) as staging:
        print(f"mrvi_pyro {__version__} demo -> {out}")
        adata = datasets.simulate(n_cells=args.n_cells, n_genes=args.n_genes, n_samples=args.n_samples,
                                  seed=args.seed)
        truth = adata.uns["simulation"]
        adata.write_h5ad(staging / "simulated.h5ad")
        print(f"simulated {adata.n_obs} cells x {adata.n_vars} genes, {args.n_samples} samples, "
              f"{adata.obs['batch'].nunique()} batches (data: simulated.h5ad)")
        model = fit_and_save(adata, staging, sample_key="sample", batch_key="batch", max_epochs=args.max_epochs,
                             batch_size=args.batch_size, seed=args.seed, quiet=args.quiet,
                             data_path=out / "simulated.h5ad", shown_dir=out)
        u = model.get_latent_representation()
        score = _knn_agreement(coords=u, labels=adata.obs["cell_type"].to_numpy())
        batch_score = _knn_agreement(coords=u, labels=adata.obs["batch"].to_numpy())
        print(f"u embedding: cell-type kNN agreement {score:.2f}, batch kNN agreement {batch_score:.2f} "
              f"(lower is better mixed; chance {adata.obs['batch'].value_counts(normalize=True).max():.2f}) "
              "(figure: u_embedding.png)")
        results = analyze_model(model, adata, staging, groupby="cell_type", de=truth["de_covariate"],
                                da=truth["da_covariate"], quiet=args.quiet, mc_samples=10, seed=args.seed,
                                data_path=staging / "simulated.h5ad", command=args.command_line)
    for line in check_against_truth(model, results, truth):
        print(line)
    print(f"report: {out / 'report.html'}")
    return 0


def check_against_truth(model, results: dict, truth) -> list[str]:
    """One line per analysis comparing its result with the simulation's planted truth."""
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


def _read_h5ad(path: str):
    import anndata

    file = Path(path)
    if not file.is_file():
        raise ValueError(f"data file {path} does not exist")
    try:
        return anndata.read_h5ad(file)
    except Exception as err:  # h5py and anndata raise many types for foreign files
        raise ValueError(f"{path} is not a readable .h5ad file ({type(err).__name__}: {err})") from None


def _train_rank(data_path: str, keys: dict, seed: int, options: dict):
    """One rank of ``fit --nproc``: read the data, train data-parallel (rank 0 writing the
    checkpoint when ``options`` name one), return the weights and history (rank 0's are what the
    launching process keeps)."""
    from . import MRVI, distributed

    adata = _read_h5ad(data_path)
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
        state, history = distributed.launch(_train_rank, nproc, str(data_path), dict(zip(
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


def _fit(args: argparse.Namespace) -> int:
    from . import MRVI
    from ._safe_io import directory_lock, remove_stale_siblings, replace_directory, sibling

    adata = _read_h5ad(args.data)
    print(f"{args.data}: {adata.n_obs} cells x {adata.n_vars} genes")
    # input errors first, then the output directory, both before the (long) training
    MRVI.setup_anndata(adata, sample_key=args.sample_key, batch_key=args.batch_key, labels_key=args.labels_key,
                       layer=args.layer)
    if args.nproc < 1:
        raise ValueError(f"--nproc must be a positive integer; got {args.nproc}")
    if args.batch_size % args.nproc:
        raise ValueError(f"--batch-size {args.batch_size} is the global minibatch and must be divisible by "
                         f"--nproc {args.nproc} (each rank takes batch-size / nproc cells)")
    out = Path(args.out)
    _check_fit_target(out, overwrite=args.overwrite, resume=args.resume)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(out)
    checkpoint = out / CHECKPOINT_DIR
    try:
        with directory_lock(out, "fit"):
            if not args.resume and checkpoint.exists():
                shutil.rmtree(checkpoint)  # an earlier fit's, checked above; --overwrite starts again
            staging = sibling(out, "partial")
            staging.mkdir()
            try:
                fit_and_save(adata, staging, sample_key=args.sample_key, batch_key=args.batch_key,
                             labels_key=args.labels_key, layer=args.layer, max_epochs=args.max_epochs,
                             batch_size=args.batch_size, seed=args.seed, quiet=args.quiet, data_path=args.data,
                             shown_dir=out, checkpoint_dir=checkpoint, nproc=args.nproc)
                if checkpoint.exists():
                    shutil.copytree(checkpoint, staging / CHECKPOINT_DIR, copy_function=_link_or_copy)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            replace_directory(staging, out)  # the finished run, checkpoint included, in one rename
    except BaseException as err:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # made by this run and still empty: leave no trace
        if isinstance(err, KeyboardInterrupt):
            return _interrupted_fit(out, args.argv)
        raise
    return 0


def _check_fit_target(out: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse an ``--out`` that ``fit`` must not write to, before any training."""
    from ._safe_io import LOCK_FILE, check_target, lock_owner, remove_stale_siblings
    from .checkpoint import checkpoint_rule

    lock = out / LOCK_FILE
    if out.is_dir() and lock.is_file():
        owner = lock_owner(lock)
        if owner is not None:
            raise ValueError(f"another mrvi-pyro process (pid {owner}) is writing to {out}; wait for it to finish "
                             "or choose another --out.")
        lock.unlink()  # left by a killed mrvi-pyro process
    checkpoint = out / CHECKPOINT_DIR
    if out.is_dir():
        remove_stale_siblings(checkpoint)  # a checkpoint write that was killed half-way
    has_checkpoint = checkpoint.is_dir() and checkpoint_rule(checkpoint) is None
    outputs = sorted(p.name for p in out.iterdir() if p.name != CHECKPOINT_DIR) if out.is_dir() else []
    if resume and not has_checkpoint:
        raise ValueError(f"--resume: {out} holds no checkpoint of an earlier fit; run without --resume to start one.")
    if resume and outputs and not overwrite:
        raise ValueError(f"--resume: {out} also holds the outputs of a finished fit ({', '.join(outputs[:4])}), "
                         "which the resumed fit replaces when it completes; add --overwrite to allow that.")
    if has_checkpoint and not outputs and not resume and not overwrite:
        raise ValueError(f"{out} holds the checkpoint of an unfinished fit ({_epochs_done(checkpoint)} epochs done); "
                         "pass --resume to continue it (same data and options), or --overwrite to start again.")
    check_target(out, overwrite=overwrite or resume, what="--out", replaceable=_run_rule, flag="--overwrite")


def _epochs_done(checkpoint: Path) -> int | str:
    try:
        return int(json.loads((checkpoint / "checkpoint.json").read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return "?"


def _link_or_copy(source: str, destination: str) -> None:
    """Hard link (checkpoint files are replaced, never rewritten in place), else copy."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _interrupted_fit(out: Path, argv: list[str]) -> int:
    """Ctrl-C during ``fit``: say what was kept and the exact command that resumes it."""
    checkpoint = out / CHECKPOINT_DIR
    if not checkpoint.is_dir():
        print("error: interrupted before the first epoch completed; no checkpoint was saved and earlier outputs "
              f"in {out} are as before", file=sys.stderr)
        return 130
    command = ["mrvi-pyro", *argv, *([] if "--resume" in argv else ["--resume"])]
    print(f"error: interrupted; the checkpoint of the last complete epoch ({_epochs_done(checkpoint)}) is in "
          f"{checkpoint} (earlier outputs in {out} are as before). Continue with:\n  {shlex.join(command)}",
          file=sys.stderr)
    return 130


def _analysis_rank(data_path: str, model_dir: str, groupby: str, da: str | None) -> dict:
    """One rank of ``analyze --nproc``: the sharded analyses (rank 0's results come back)."""
    from . import MRVI

    adata = _read_h5ad(data_path)
    model = MRVI.load(model_dir, adata=adata)
    results = {"distances": model.get_local_sample_distances(adata, groupby=groupby, keep_cell=False)}
    if da is not None:
        results["da"] = model.differential_abundance(adata, sample_cov_keys=[da])
    return results


def analyze_model(model, adata, out: Path, *, groupby: str, de: str | None = None, da: str | None = None,
                  quiet: bool = False, mc_samples: int = 20, seed: int = 0, basis: str | None = None,
                  data_path: str | Path | None = None, command: list[str] | None = None,
                  precomputed: dict | None = None) -> dict:
    """Run the analyses on a trained model and write arrays (zarr), tables (CSV), figures (PNG)
    and ``report.html`` into ``out``. Returns the results by name. Cells are drawn on
    ``adata.obsm[basis]`` (e.g. ``"X_umap"``), or on the first two principal components of u
    when ``basis`` is None. ``data_path`` (named and checksummed) and ``command`` go into the
    report's run metadata. ``precomputed`` holds results computed elsewhere (``"distances"``,
    ``"da"``: e.g. by ranks of ``analyze --nproc``), used instead of computing them here."""
    import matplotlib.pyplot as plt
    import numpy as np
    import pandas as pd

    from . import pl
    from .report import Section, run_metadata, write_html_report

    _check_columns(adata, groupby, de, da, basis)
    out = Path(out)
    results_dir = out / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    results, sections = {}, []

    def save_figure(fig, name, caption):
        fig.savefig(out / name, dpi=110, bbox_inches="tight")  # nothing cut at the edges
        plt.close(fig)
        return out / name, caption

    def step(message):
        if not quiet:
            print(f"[analyze] {message}", flush=True)

    coords, axes_name = pl.basis_coords(adata, basis, latent=model.get_latent_representation(adata))
    overview = Section("Model", preformatted=[repr(model)])
    if model.history is not None:
        overview.figures.append(save_figure(pl.training_history(model.history), "training_history.png",
                                            "Training curves: -ELBO per cell of the training and validation cells, "
                                            "per epoch."))
    where = f"{basis}" if basis else "the first two principal components of u"
    overview.figures.append(save_figure(
        pl.embedding(coords, obs=adata.obs, color=[groupby, model.registry.sample_key], basis_name=axes_name),
        "u_embedding.png", f"Cells on {where}, coloured by {groupby} and by sample."))
    sections.append(overview)

    step(f"local sample distances by {groupby}")
    precomputed = precomputed or {}
    distances = precomputed.get("distances")
    if distances is None:
        distances = model.get_local_sample_distances(adata, groupby=groupby, keep_cell=False)
    _write_zarr(distances, results_dir / "local_sample_distances.zarr")
    results["distances"] = distances
    group_means = distances[groupby]
    names = [str(v) for v in group_means[f"{groupby}_name"].values]
    off_diagonal = ~np.eye(group_means.sizes["sample_x"], dtype=bool)
    spread = pd.DataFrame({groupby: names,
                           "mean_between_sample_distance": [float(group_means.values[i][off_diagonal].mean())
                                                            for i in range(len(names))]})
    spread = spread.sort_values("mean_between_sample_distance", ascending=False)
    spread.to_csv(out / "sample_distance_spread.csv", index=False)
    colour_by = list(dict.fromkeys(c for c in (de, da) if c is not None and c in model.sample_info)) or None
    figures = [save_figure(pl.sample_distance_heatmap(group_means, group=name, sample_info=model.sample_info,
                                                      color_by=colour_by, title=f"{groupby} = {name}"),
                           f"sample_distances_{_safe(name)}.png",
                           f"Distances between samples in the cells of {groupby} {name}, samples ordered by "
                           "hierarchical clustering; one colour scale for all groups.")
               for name in spread[groupby].head(6)]
    sections.append(Section(f"Local sample distances by {groupby}",
                            ["Average distance between the counterfactual states of each pair of samples, over the "
                             f"cells of each {groupby} (largest spread first; up to 6 groups shown)."],
                            figures, [(f"Mean distance between two samples, per {groupby}",
                                       spread.rename(columns={"mean_between_sample_distance": "mean distance"}))]))
    results["distance_spread"] = spread

    if de is not None:
        step(f"differential expression for {de}")
        de_result = model.differential_expression(adata, sample_cov_keys=[de], store_lfc=True, mc_samples=mc_samples,
                                                  seed=seed)
        _write_zarr(de_result, results_dir / "differential_expression.zarr")
        table = model.differential_expression_summary(de_result, groupby=groupby, adata=adata, n_top_genes=None)
        table.to_csv(out / "de_summary.csv", index=False)
        column = str(de_result["covariate"].values[0])
        figures = [
            save_figure(pl.effect_size_embedding(de_result, coords, covariate=column, obs=adata.obs,
                                                 color=groupby, basis_name=axes_name), "de_effect_size.png",
                        f"Per-cell effect size of {column} and its adjusted p-value, on the cells' embedding."),
            save_figure(pl.top_genes_heatmap(table, covariate=column, n_genes=5), "de_top_genes.png",
                        f"Mean log2 fold-change of the 5 top genes of each {groupby}."),
            save_figure(pl.volcano(table, covariate=column), "de_volcano.png",
                        f"Volcano plot per {groupby}: mean log2 fold-change against the posterior probability "
                        "that the change is smaller than delta (shared axes)."),
        ]
        sections.append(Section(f"Differential expression: {column}",
                                ["Per-cell regression of counterfactual states on the sample covariate; effect size = "
                                 "chi-squared statistic; log fold-changes decoded with paired posterior draws. The "
                                 "full table of every gene is de_summary.csv."],
                                figures, [(f"Top genes of every {groupby}", _de_top_genes(table, groupby))]))
        results["de"], results["de_table"] = de_result, table

    if da is not None:
        step(f"differential abundance for {da}")
        da_result = precomputed.get("da")
        if da_result is None:
            da_result = model.differential_abundance(adata, sample_cov_keys=[da])
        _write_zarr(da_result, results_dir / "differential_abundance.zarr")
        summary = model.differential_abundance_summary(da, adata=adata, groupby=groupby, seed=seed)
        per_group = summary[[v for v in summary.data_vars if v.startswith(f"{groupby}_")]].to_dataframe()
        per_group.to_csv(out / "da_summary.csv")
        g1, g2 = summary.attrs.get("group1"), summary.attrs.get("group2")
        figure = save_figure(pl.log_ratio_summary(summary, coords, adata.obs, groupby=groupby, basis_name=axes_name),
                             "da_log_ratio.png",
                             f"Log-ratio of the {g1} and {g2} samples' densities at each cell (left) and its "
                             f"distribution per {groupby} with the group mean and highest-density interval (right).")
        shown = per_group.reset_index().rename(columns=lambda c: c.removeprefix(f"{groupby}_"))
        interval = f"{100 * summary.attrs.get('hdi_prob', 0.95):.0f}% HDI"
        shown = shown.rename(columns={"name": groupby, "log_ratio": "mean log-ratio", "log_ratio_sd": "sd",
                                      "log_ratio_lower": f"{interval} lower", "log_ratio_upper": f"{interval} upper",
                                      "prob_positive": "P(log-ratio > 0)", "n_cells": "cells"})
        sections.append(Section(f"Differential abundance: {g1} vs {g2}",
                                ["Log-ratio of the aggregated posteriors of the two sample groups at each cell, with "
                                 "uncertainty from posterior draws and Bayesian-bootstrap weights over samples."],
                                [figure], [(f"Mean log-ratio per {groupby}", shown)]))
        results["da"], results["da_summary"], results["da_table"] = da_result, summary, per_group

    write_html_report(out / "report.html", "mrvi_pyro analysis report", sections,
                      metadata=run_metadata(data_path=data_path, seed=seed, command=command))
    return results


def _de_top_genes(table, groupby: str, n_genes: int = 5):
    """One row per group of a DE summary: cells, mean effect size, share of significant cells
    and the ``n_genes`` top genes with their mean log2 fold-changes (largest effect first)."""
    import pandas as pd

    rows = []
    for group in pd.unique(table["group"]):
        part = table[table["group"] == group]
        first = part.iloc[0]
        row = {groupby: str(group), "cells": int(first["n_cells"]), "mean effect size": float(first["effect_size_mean"]),
               "share of cells with padj < 0.05": float(first["frac_significant"])}
        if "gene" in part:
            top = part.sort_values("rank").head(n_genes)
            row[f"top {n_genes} genes (mean log2 FC)"] = ", ".join(
                f"{gene} ({lfc:+.2f})" for gene, lfc in zip(top["gene"], top["lfc_mean"]))
        rows.append(row)
    return pd.DataFrame(rows).sort_values("mean effect size", ascending=False)


def _check_columns(adata, groupby: str, de: str | None, da: str | None, basis: str | None = None) -> None:
    if groupby not in adata.obs:
        raise ValueError(f"--groupby {groupby!r} is not a column of obs (columns: {list(adata.obs.columns)})")
    for flag, key in (("--de", de), ("--da", da)):
        if key is not None and key not in adata.obs:
            raise ValueError(f"{flag} {key!r} is not a column of obs (columns: {list(adata.obs.columns)})")
    if basis is not None and basis not in adata.obsm:
        raise ValueError(f"--basis {basis!r} is not a key of obsm (keys: {list(adata.obsm.keys())})")


def _write_zarr(dataset, path: Path) -> None:
    """Write a Dataset as zarr format 2 (portable: its string coordinates have a stable spec)."""
    dataset.to_zarr(path, mode="w", zarr_format=2, consolidated=True)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))


def _recorded_data(run_dir: Path) -> str:
    """The data file ``fit`` recorded in ``run_dir/fit.json`` (one-line errors if unusable)."""
    fit_info = run_dir / "fit.json"
    if not fit_info.is_file():
        raise ValueError(f"no data file recorded in {run_dir}; pass --data DATA.h5ad")
    try:
        record = json.loads(fit_info.read_text())
    except (ValueError, OSError) as err:
        raise ValueError(f"{fit_info} is not readable JSON ({err}); pass --data DATA.h5ad") from None
    data_path = record.get("data") if isinstance(record, dict) else None
    if data_path is None:
        raise ValueError(f"no data file recorded in {run_dir}; pass --data DATA.h5ad")
    if not isinstance(data_path, str):
        raise ValueError(f"{fit_info}: 'data' must be a file path, got {data_path!r}; pass --data DATA.h5ad")
    return data_path


def _analyze(args: argparse.Namespace) -> int:
    from . import MRVI
    from ._safe_io import directory_lock, move_into, sibling

    run_dir = Path(args.dir)
    if not (run_dir / "model").exists() and (run_dir / CHECKPOINT_DIR).is_dir():
        raise ValueError(f"{run_dir} holds an unfinished fit (a checkpoint, no model yet); finish it first with "
                         "`mrvi-pyro fit ... --resume` (same arguments as the fit, plus --resume)")
    data_path = args.data if args.data is not None else _recorded_data(run_dir)
    out = Path(args.out or run_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file, not a directory; choose another path.")
    out.mkdir(parents=True, exist_ok=True)
    with directory_lock(out, "analyze"):
        adata = _read_h5ad(data_path)
        model = MRVI.load(run_dir / "model", adata=adata)
        _check_columns(adata, args.groupby, args.de, args.da, args.basis)
        previous = sorted(p for p in out.iterdir() if _matches(p.name, ANALYSIS_OUTPUTS))
        if previous and not args.overwrite:
            raise ValueError(f"{out} already holds analysis outputs ({', '.join(p.name for p in previous[:4])}); "
                             "pass --overwrite to replace them, or choose another --out.")
        if args.nproc < 1:
            raise ValueError(f"--nproc must be a positive integer; got {args.nproc}")
        precomputed = None
        if args.nproc > 1:  # distances and DA sharded over local ranks; the rest here
            from . import distributed

            precomputed = distributed.launch(_analysis_rank, args.nproc, str(data_path), str(run_dir / "model"),
                                             args.groupby, args.da)
        staging = sibling(out / "analysis", "partial")
        staging.mkdir()
        try:
            analyze_model(model, adata, staging, groupby=args.groupby, de=args.de, da=args.da,
                          quiet=args.quiet, mc_samples=args.mc_samples, seed=args.seed, basis=args.basis,
                          data_path=data_path, command=args.command_line, precomputed=precomputed)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        for path in previous:  # outputs of an earlier analysis, replaced as a whole
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        move_into(staging, out)
    if not args.quiet:
        print(f"[analyze] report: {out / 'report.html'}")
    return 0


def _knn_agreement(coords, labels, k: int = 15) -> float:
    """Share of each cell's k nearest neighbours (in ``coords``) that share its label."""
    import numpy as np
    from scipy.spatial import cKDTree

    _, neighbours = cKDTree(coords).query(coords, k=k + 1)
    return float(np.mean(labels[neighbours[:, 1:]] == labels[:, None]))


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (None, off switches)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="mrvi-pyro", description="MrVI in Pyro: multi-sample single-cell analysis.",
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str):
        return sub.add_parser(name, help=text, description=text, formatter_class=_HelpFormatter)

    demo = command("demo", "simulate a cohort, train MrVI and write figures, a summary and a report")
    demo.add_argument("--out", default="mrvi_demo", help="output directory")
    demo.add_argument("--n-cells", type=int, default=3000, help="simulated cells")
    demo.add_argument("--n-genes", type=int, default=200, help="simulated genes")
    demo.add_argument("--n-samples", type=int, default=12, help="simulated samples")
    demo.add_argument("--max-epochs", type=int, default=100, help="training epochs")
    demo.add_argument("--batch-size", type=int, default=128,
                      help="cells per step (as MRVI.train; with 256 the hidden grouping was recovered for 2 of 5 "
                           "simulation seeds in 100 epochs, with 128 for all 5)")
    demo.add_argument("--seed", type=int, default=3, help="seeds the simulation, initialisation and training")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    demo.set_defaults(func=_demo)

    fit = command("fit", "train MrVI on an .h5ad of raw counts and save it")
    fit.add_argument("data", help="AnnData file (.h5ad) with raw counts")
    fit.add_argument("--sample-key", required=True, help="obs column of the sample (e.g. donor)")
    fit.add_argument("--batch-key", default=None, help="obs column of a nuisance covariate (batch, site)")
    fit.add_argument("--labels-key", default=None, help="obs column of cell-type labels")
    fit.add_argument("--layer", default=None, help="layer holding the raw counts (default: X)")
    fit.add_argument("--out", required=True, help="output directory")
    fit.add_argument("--max-epochs", type=int, default=None,
                     help="training epochs (default: min(round(20000 / n_cells * 400), 400))")
    fit.add_argument("--batch-size", type=int, default=128, help="cells per step (as MRVI.train)")
    fit.add_argument("--seed", type=int, default=0, help="seeds the initialisation and training")
    fit.add_argument("--nproc", type=int, default=1,
                     help="train data-parallel on this many local processes (torch.distributed: gloo on CPU, "
                          "NCCL with one GPU each); --batch-size is the global minibatch and must be divisible "
                          "by it; rank 0 writes the checkpoint, and --resume needs the same --nproc")
    fit.add_argument("--quiet", action="store_true", help="no progress bar")
    fit.add_argument("--overwrite", action="store_true",
                     help="replace an earlier run in --out (its model, checkpoint and analysis outputs)")
    fit.add_argument("--resume", action="store_true",
                     help="continue the interrupted fit whose checkpoint is in --out/checkpoint (same data and "
                          "options; --max-epochs may be raised); with --overwrite also when --out holds a finished "
                          "run, whose outputs are replaced when the resumed fit completes")
    fit.set_defaults(func=_fit)

    analyze = command("analyze", "run distances, DE and DA on a fitted model; write results and a report")
    analyze.add_argument("dir", help="directory written by `mrvi-pyro fit`")
    analyze.add_argument("--data", default=None, help="AnnData file (default: the one used by fit)")
    analyze.add_argument("--groupby", required=True, help="obs column to group cells by (e.g. cell type)")
    analyze.add_argument("--de", default=None, help="sample covariate for differential expression")
    analyze.add_argument("--da", default=None, help="sample covariate for differential abundance")
    analyze.add_argument("--basis", default=None,
                         help="obsm key of the 2-d embedding to draw cells on, e.g. X_umap (default: PCA of u)")
    analyze.add_argument("--out", default=None, help="output directory (default: DIR)")
    analyze.add_argument("--mc-samples", type=int, default=20, help="posterior draws for DE log fold-changes")
    analyze.add_argument("--seed", type=int, default=0, help="seeds the posterior draws")
    analyze.add_argument("--nproc", type=int, default=1,
                         help="compute the local sample distances and DA on this many local processes "
                              "(torch.distributed); DE and the summaries run in this process")
    analyze.add_argument("--quiet", action="store_true", help="no progress messages")
    analyze.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier analysis")
    analyze.set_defaults(func=_analyze)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ._malloc import tune_malloc

    tune_malloc()  # the command's process is its own: reuse freed minibatch memory (opt-in for library calls)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = ["mrvi-pyro", *(sys.argv[1:] if argv is None else argv)]
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing partial was saved (the output directory is as before)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
