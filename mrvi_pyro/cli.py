"""The ``mrvi-pyro`` command.

- ``mrvi-pyro fit DATA.h5ad --sample-key K [--batch-key K] [--labels-key K] [--layer L] --out DIR``
  trains MrVI and saves it (``DIR/model``) with its training history and figures.
- ``mrvi-pyro demo --out DIR`` simulates a cohort with planted truth, trains MrVI on it, saves the
  model and writes figures and a summary.

Errors in user input are printed as one line (``error: ...``) with exit status 2, never as a
traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    from . import __version__, datasets

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"mrvi_pyro {__version__} demo -> {out}")
    adata = datasets.simulate(n_cells=args.n_cells, n_genes=args.n_genes, n_samples=args.n_samples, seed=args.seed)
    truth = adata.uns["simulation"]
    adata.write_h5ad(out / "simulated.h5ad")
    print(f"simulated {adata.n_obs} cells x {adata.n_vars} genes, {args.n_samples} samples, "
          f"{adata.obs['batch'].nunique()} batches (data: simulated.h5ad)")
    model = fit_and_save(adata, out, sample_key="sample", batch_key="batch", max_epochs=args.max_epochs,
                         batch_size=args.batch_size, seed=args.seed, quiet=args.quiet,
                         data_path=out / "simulated.h5ad")
    u = model.get_latent_representation()
    score = _knn_agreement(coords=u, labels=adata.obs["cell_type"].to_numpy())
    batch_score = _knn_agreement(coords=u, labels=adata.obs["batch"].to_numpy())
    print(f"u embedding: cell-type kNN agreement {score:.2f}, batch kNN agreement {batch_score:.2f} "
          f"(lower is better mixed; chance {adata.obs['batch'].value_counts(normalize=True).max():.2f}) "
          "(figure: u_embedding.png)")
    print(f"planted truth: DE in {truth['de_cell_type']} by {truth['de_covariate']}, hidden sample grouping "
          f"in {truth['grouping_cell_type']}, DA of {truth['da_cell_type']} by {truth['da_covariate']}")
    return 0


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
                 max_epochs=None, batch_size=256, seed=0, quiet=False, data_path=None):
    """Register ``adata``, train MrVI, save it to ``out/model`` with history and figures."""
    import json

    from . import MRVI, plotting

    MRVI.setup_anndata(adata, sample_key=sample_key, batch_key=batch_key, labels_key=labels_key, layer=layer)
    model = MRVI(adata)
    start = time.perf_counter()
    model.train(max_epochs=max_epochs, batch_size=batch_size, seed=seed, progress_bar=not quiet)
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / "model", overwrite=True)
    (out / "fit.json").write_text(json.dumps({"data": str(Path(data_path).resolve()) if data_path else None}))
    model.history.to_csv(out / "history.csv")
    plotting.training_history(model.history).savefig(out / "training_history.png", dpi=110)
    colors = [k for k in (labels_key, batch_key, sample_key) if k is not None][:2]
    coords = plotting.pca_2d(model.get_latent_representation())
    plotting.embedding(coords, adata.obs, colors, title="MrVI u (PCA)").savefig(out / "u_embedding.png", dpi=110)
    last = model.history.iloc[-1]
    val = f", validation {last['elbo_validation']:.1f}" if "elbo_validation" in last else ""
    print(f"trained {len(model.history)} epochs in {seconds:.1f} s; -ELBO/cell train {last['elbo_train']:.1f}{val} "
          f"(model: {out / 'model'})")
    return model


def _fit(args: argparse.Namespace) -> int:
    adata = _read_h5ad(args.data)
    print(f"{args.data}: {adata.n_obs} cells x {adata.n_vars} genes")
    fit_and_save(adata, Path(args.out), sample_key=args.sample_key, batch_key=args.batch_key,
                 labels_key=args.labels_key, layer=args.layer, max_epochs=args.max_epochs,
                 batch_size=args.batch_size, seed=args.seed, quiet=args.quiet, data_path=args.data)
    return 0


def _knn_agreement(coords, labels, k: int = 15) -> float:
    """Share of each cell's k nearest neighbours (in ``coords``) that share its label."""
    import numpy as np
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
    demo.add_argument("--max-epochs", type=int, default=60)
    demo.add_argument("--batch-size", type=int, default=256)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=_demo)

    fit = sub.add_parser("fit", help="train MrVI on an .h5ad of raw counts and save it")
    fit.add_argument("data", help="AnnData file (.h5ad) with raw counts")
    fit.add_argument("--sample-key", required=True, help="obs column of the sample (e.g. donor)")
    fit.add_argument("--batch-key", default=None, help="obs column of a nuisance covariate (batch, site)")
    fit.add_argument("--labels-key", default=None, help="obs column of cell-type labels")
    fit.add_argument("--layer", default=None, help="layer holding the raw counts (default X)")
    fit.add_argument("--out", required=True, help="output directory")
    fit.add_argument("--max-epochs", type=int, default=None, help="default: min(round(20000 / n_cells * 400), 400)")
    fit.add_argument("--batch-size", type=int, default=256)
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--quiet", action="store_true", help="no progress bar")
    fit.set_defaults(func=_fit)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
