"""The ``mrvi-pyro`` command.

``mrvi-pyro demo --out DIR`` simulates a cohort with planted truth, trains MrVI on it, saves the
model and writes figures and a summary. Errors in user input are printed as one line
(``error: ...``) with exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    from . import MRVI, __version__, datasets, plotting

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"mrvi_pyro {__version__} demo -> {out}")
    adata = datasets.simulate(n_cells=args.n_cells, n_genes=args.n_genes, n_samples=args.n_samples, seed=args.seed)
    truth = adata.uns["simulation"]
    adata.write_h5ad(out / "simulated.h5ad")
    print(f"simulated {adata.n_obs} cells x {adata.n_vars} genes, {args.n_samples} samples, "
          f"{adata.obs['batch'].nunique()} batches (data: simulated.h5ad)")
    MRVI.setup_anndata(adata, sample_key="sample", batch_key="batch")
    model = MRVI(adata)
    start = time.perf_counter()
    model.train(max_epochs=args.max_epochs, batch_size=args.batch_size, seed=args.seed, progress_bar=not args.quiet)
    seconds = time.perf_counter() - start
    model.save(out / "model", overwrite=True)
    last = model.history.iloc[-1]
    print(f"trained {len(model.history)} epochs in {seconds:.1f} s; -ELBO/cell train {last['elbo_train']:.1f}, "
          f"validation {last['elbo_validation']:.1f} (model: model/)")

    u = model.get_latent_representation()
    coords = plotting.pca_2d(u)
    fig = plotting.embedding(coords, adata.obs, ["cell_type", "batch"], title="MrVI u (PCA)")
    fig.savefig(out / "u_embedding.png", dpi=110)
    plotting.training_history(model.history).savefig(out / "training_history.png", dpi=110)
    score = _knn_agreement(coords=u, labels=adata.obs["cell_type"].to_numpy())
    batch_score = _knn_agreement(coords=u, labels=adata.obs["batch"].to_numpy())
    print(f"u embedding: cell-type kNN agreement {score:.2f}, batch kNN agreement {batch_score:.2f} "
          f"(lower is better mixed; chance {adata.obs['batch'].value_counts(normalize=True).max():.2f}) "
          "(figure: u_embedding.png)")
    print(f"planted truth: DE in {truth['de_cell_type']} by {truth['de_covariate']}, hidden sample grouping "
          f"in {truth['grouping_cell_type']}, DA of {truth['da_cell_type']} by {truth['da_covariate']}")
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
