"""The ``mrvi-pyro`` command.

- ``mrvi-pyro fit DATA.h5ad --sample-key K [--batch-key K] [--labels-key K] [--layer L] --out DIR``
  trains MrVI and saves it (``DIR/model``) with its training history and figures.
- ``mrvi-pyro demo --out DIR`` simulates a cohort with planted truth, trains MrVI on it, saves the
  model and writes figures and a summary.

Errors in user input are printed as one line (``error: ...``) with exit status 2, never as a
traceback; Ctrl-C exits with status 130.

Outputs are never lost or mixed: ``fit`` and ``demo`` check ``--out`` before training, refuse a
non-empty one unless ``--overwrite`` (and then only a previous run directory), build the run in
a temporary sibling and rename it into place when complete, so an interrupted run leaves
``--out`` as it was. ``analyze`` holds a lock file in its output directory, refuses earlier
analysis outputs unless ``--overwrite`` (which removes them, so no stale DE/DA result stays
beside new ones), writes into a temporary subdirectory and moves the results in at the end.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd


RUN_OUTPUTS = ("model", "fit.json", "history.csv", "training_history.png", "u_embedding.png", "simulated.h5ad")
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

    if lock_owner(path / LOCK_FILE) is not None:
        return f"an analysis is writing to it ({path / LOCK_FILE})"
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
                                da=truth["da_covariate"], quiet=args.quiet, mc_samples=10, seed=args.seed)
    for line in check_against_truth(model, results, truth):
        print(line)
    print(f"report: {out / 'report.html'}")
    return 0


def check_against_truth(model, results: dict, truth) -> list[str]:
    """One line per analysis comparing its result with the simulation's planted truth."""
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


def fit_and_save(adata, out: Path, *, sample_key: str, batch_key=None, labels_key=None, layer=None,
                 max_epochs=None, batch_size=128, seed=0, quiet=False, data_path=None, shown_dir=None):
    """Register ``adata`` (unless it already is, with these keys), train MrVI, save it to
    ``out/model`` with history and figures. ``shown_dir`` names ``out`` in messages."""
    from . import MRVI, plotting
    from .data import REGISTRY_KEY, get_registry

    keys = (sample_key, batch_key, labels_key, layer)
    registry = get_registry(adata) if REGISTRY_KEY in adata.uns else None
    if registry is None or (registry.sample_key, registry.batch_key, registry.labels_key, registry.layer) != keys:
        MRVI.setup_anndata(adata, sample_key=sample_key, batch_key=batch_key, labels_key=labels_key, layer=layer)
    model = MRVI(adata, seed=seed)
    start = time.perf_counter()
    model.train(max_epochs=max_epochs, batch_size=batch_size, seed=seed, progress_bar=not quiet)
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / "model")
    (out / "fit.json").write_text(json.dumps({"data": str(Path(data_path).resolve()) if data_path else None}))
    model.history.to_csv(out / "history.csv")
    plotting.training_history(model.history).savefig(out / "training_history.png", dpi=110)
    colors = [k for k in (labels_key, batch_key, sample_key) if k is not None][:2]
    coords = plotting.pca_2d(model.get_latent_representation())
    plotting.embedding(coords, adata.obs, colors, title="MrVI u (PCA)").savefig(out / "u_embedding.png", dpi=110)
    last = model.history.iloc[-1]
    val = f", validation {last['elbo_validation']:.1f}" if "elbo_validation" in last else ""
    print(f"trained {len(model.history)} epochs in {seconds:.1f} s; -ELBO/cell train {last['elbo_train']:.1f}{val} "
          f"(model: {Path(shown_dir or out) / 'model'})")
    return model


def _fit(args: argparse.Namespace) -> int:
    from . import MRVI

    adata = _read_h5ad(args.data)
    print(f"{args.data}: {adata.n_obs} cells x {adata.n_vars} genes")
    # input errors first, then the output directory, both before the (long) training
    MRVI.setup_anndata(adata, sample_key=args.sample_key, batch_key=args.batch_key, labels_key=args.labels_key,
                       layer=args.layer)
    out = Path(args.out)
    with _staged_run(out, args.overwrite) as staging:
        fit_and_save(adata, staging, sample_key=args.sample_key, batch_key=args.batch_key,
                     labels_key=args.labels_key, layer=args.layer, max_epochs=args.max_epochs,
                     batch_size=args.batch_size, seed=args.seed, quiet=args.quiet, data_path=args.data,
                     shown_dir=out)
    return 0


def analyze_model(model, adata, out: Path, *, groupby: str, de: str | None = None, da: str | None = None,
                  quiet: bool = False, mc_samples: int = 20, seed: int = 0, basis: str | None = None) -> dict:
    """Run the analyses on a trained model and write arrays (zarr), tables (CSV), figures (PNG)
    and ``report.html`` into ``out``. Returns the results by name. Cells are drawn on
    ``adata.obsm[basis]`` (e.g. ``"X_umap"``), or on the first two principal components of u
    when ``basis`` is None."""
    import matplotlib.pyplot as plt

    from . import plotting
    from .report import Section, write_html_report

    _check_columns(adata, groupby, de, da, basis)
    out = Path(out)
    results_dir = out / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    results, sections = {}, []

    def save_figure(fig, name):
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        return out / name

    def step(message):
        if not quiet:
            print(f"[analyze] {message}", flush=True)

    coords, axes_name = plotting.basis_coords(adata, basis, latent=model.get_latent_representation(adata))
    overview = Section("Model", [repr(model)], [save_figure(plotting.training_history(model.history), "training_history.png")]
                       if model.history is not None else [])
    overview.figures.append(save_figure(plotting.embedding(coords, adata.obs, [groupby, model.registry.sample_key],
                                                           basis_name=axes_name), "u_embedding.png"))
    sections.append(overview)

    step(f"local sample distances by {groupby}")
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
    figures = [save_figure(plotting.sample_distance_heatmap(group_means, group=name, sample_info=model.sample_info,
                                                            color_by=colour_by, title=f"{groupby} = {name}"),
                           f"sample_distances_{_safe(name)}.png")
               for name in spread[groupby].head(6)]
    sections.append(Section(f"Local sample distances by {groupby}",
                            ["Average distance between the counterfactual states of each pair of samples, over the "
                             f"cells of each {groupby} (largest spread first; up to 6 groups shown)."],
                            figures, [("Mean between-sample distance per group", spread)]))
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
            save_figure(plotting.effect_size_embedding(de_result, coords, covariate=column, obs=adata.obs,
                                                       color=groupby, basis_name=axes_name), "de_effect_size.png"),
            save_figure(plotting.top_genes_heatmap(table, covariate=column, n_genes=5), "de_top_genes.png"),
            save_figure(plotting.volcano(table, covariate=column), "de_volcano.png"),
        ]
        top = table[table["rank"] <= 10] if "rank" in table else table
        sections.append(Section(f"Differential expression: {column}",
                                ["Per-cell regression of counterfactual states on the sample covariate; effect size = "
                                 "chi-squared statistic; log fold-changes decoded with paired posterior draws."],
                                figures, [(f"Top genes per {groupby}", top)]))
        results["de"], results["de_table"] = de_result, table

    if da is not None:
        step(f"differential abundance for {da}")
        da_result = model.differential_abundance(adata, sample_cov_keys=[da])
        _write_zarr(da_result, results_dir / "differential_abundance.zarr")
        summary = model.differential_abundance_summary(da, adata=adata, groupby=groupby, seed=seed)
        per_group = summary[[v for v in summary.data_vars if v.startswith(f"{groupby}_")]].to_dataframe()
        per_group.to_csv(out / "da_summary.csv")
        figure = save_figure(plotting.log_ratio_summary(summary, coords, adata.obs, groupby=groupby,
                                                                basis_name=axes_name), "da_log_ratio.png")
        sections.append(Section(f"Differential abundance: {summary.attrs.get('group1')} vs {summary.attrs.get('group2')}",
                                ["Log-ratio of the aggregated posteriors of the two sample groups at each cell, with "
                                 "uncertainty from posterior draws and Bayesian-bootstrap weights over samples."],
                                [figure], [(f"Per-{groupby} log-ratio", per_group.reset_index())]))
        results["da"], results["da_summary"], results["da_table"] = da_result, summary, per_group

    write_html_report(out / "report.html", "mrvi_pyro analysis report", sections)
    return results


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
        staging = sibling(out / "analysis", "partial")
        staging.mkdir()
        try:
            analyze_model(model, adata, staging, groupby=args.groupby, de=args.de, da=args.da,
                          quiet=args.quiet, mc_samples=args.mc_samples, seed=args.seed, basis=args.basis)
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
    from scipy.spatial import cKDTree

    _, neighbours = cKDTree(coords).query(coords, k=k + 1)
    return float(np.mean(labels[neighbours[:, 1:]] == labels[:, None]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mrvi-pyro", description="MrVI in Pyro: multi-sample single-cell analysis.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="simulate a cohort, train MrVI and write figures and a summary")
    demo.add_argument("--out", default="mrvi_demo", help="output directory (default: mrvi_demo)")
    demo.add_argument("--n-cells", type=int, default=3000)
    demo.add_argument("--n-genes", type=int, default=200)
    demo.add_argument("--n-samples", type=int, default=12)
    demo.add_argument("--max-epochs", type=int, default=100)
    demo.add_argument("--batch-size", type=int, default=128,
                      help="cells per step (default 128, as MRVI.train; with 256 the hidden grouping was "
                           "recovered for 2 of 5 simulation seeds in 100 epochs, with 128 for all 5)")
    demo.add_argument("--seed", type=int, default=3, help="seeds the simulation, initialisation and training")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    demo.set_defaults(func=_demo)

    fit = sub.add_parser("fit", help="train MrVI on an .h5ad of raw counts and save it")
    fit.add_argument("data", help="AnnData file (.h5ad) with raw counts")
    fit.add_argument("--sample-key", required=True, help="obs column of the sample (e.g. donor)")
    fit.add_argument("--batch-key", default=None, help="obs column of a nuisance covariate (batch, site)")
    fit.add_argument("--labels-key", default=None, help="obs column of cell-type labels")
    fit.add_argument("--layer", default=None, help="layer holding the raw counts (default X)")
    fit.add_argument("--out", required=True, help="output directory")
    fit.add_argument("--max-epochs", type=int, default=None, help="default: min(round(20000 / n_cells * 400), 400)")
    fit.add_argument("--batch-size", type=int, default=128, help="cells per step (default 128, as MRVI.train)")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--quiet", action="store_true", help="no progress bar")
    fit.add_argument("--overwrite", action="store_true",
                     help="replace an earlier run in --out (its model and analysis outputs)")
    fit.set_defaults(func=_fit)

    analyze = sub.add_parser("analyze", help="run distances, DE and DA on a fitted model; write results and a report")
    analyze.add_argument("dir", help="directory written by `mrvi-pyro fit`")
    analyze.add_argument("--data", default=None, help="AnnData file (default: the one used by fit)")
    analyze.add_argument("--groupby", required=True, help="obs column to group cells by (e.g. cell type)")
    analyze.add_argument("--de", default=None, help="sample covariate for differential expression")
    analyze.add_argument("--da", default=None, help="sample covariate for differential abundance")
    analyze.add_argument("--basis", default=None,
                         help="obsm key of the 2-d embedding to draw cells on, e.g. X_umap (default: PCA of u)")
    analyze.add_argument("--out", default=None, help="output directory (default: DIR)")
    analyze.add_argument("--mc-samples", type=int, default=20, help="posterior draws for DE log fold-changes")
    analyze.add_argument("--seed", type=int, default=0)
    analyze.add_argument("--quiet", action="store_true")
    analyze.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier analysis")
    analyze.set_defaults(func=_analyze)
    return parser


def main(argv: list[str] | None = None) -> int:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    from ._malloc import tune_malloc

    tune_malloc()  # the command's process is its own: reuse freed minibatch memory (opt-in for library calls)
    parser = build_parser()
    args = parser.parse_args(argv)
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
