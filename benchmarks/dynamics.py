"""When in training each side learns the weak sample effects: distances scored along the way.

``accuracy.py`` scores one point (the end of training). On the weak preset both implementations
find the hidden grouping on some seeds and miss it on others at 100 epochs; this script shows
*when* an effect is learned. For each seed one cohort is simulated (``--simulator``,
``--preset``) and:

- ours is trained once, with a checkpoint directory, and stopped at every epoch of ``--epochs``
  (``train(max_epochs=e, checkpoint_dir=...)`` resumes exactly where the previous call stopped,
  so the trajectory is the one of a single run to the last epoch); after each stop the grouped
  counterfactual sample distances are scored;
- the reference (``--reference-epochs``, default: the last of ``--epochs``) is trained in a
  fresh process per listed epoch count (scvi-tools cannot resume a run) and scored the same way.

Scores per row: ``cov_auroc``/``cov_ari`` (disease pairs in the DE cell type), ``hidden_auroc``/
``hidden_ari`` (hidden groups in the grouping cell type), the mean distance between samples in
each of those types, and at the last epoch the batch kNN accuracy in u (chance 1/n_batches). The
summary gives, per seed and side, the first listed epoch with ARI >= 0.8. ``--plan`` passes
training-plan keywords to ours (``{"n_epochs_kl_warmup": 50}``, ``{"lr": 4e-3}``) for lever
studies; the reference always runs its defaults.

    python benchmarks/dynamics.py --seeds 0 1 --epochs 25 50 75 100 150 200 --sides ours \\
        --out /tmp/dynamics.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
import _harness  # noqa: E402
from accuracy import (  # noqa: E402
    DEFAULT_REFERENCE,
    cohort_file,
    knn_batch_accuracy,
    pair_auroc,
    simulate,
    two_cluster_ari,
)

RECOVERED_ARI = 0.8


def score_distances(model, adata) -> dict:
    """The distance scores of a trained model (either side) on its simulated cohort."""
    truth = adata.uns["simulation"]
    grouped = model.get_local_sample_distances(groupby="cell_type", keep_cell=False)["cell_type"]
    samples = np.asarray(grouped["sample_x"].values).astype(str)
    per_sample = adata.obs.groupby("sample", observed=True)[["disease", "hidden_group"]].first().reindex(samples)
    upper = np.triu_indices(len(samples), k=1)
    row = {}
    for name, type_key, label in (("cov", "de_cell_type", "disease"), ("hidden", "grouping_cell_type", "hidden_group")):
        distances = grouped.sel(cell_type_name=truth[type_key]).transpose("sample_x", "sample_y").values
        labels = per_sample[label].astype(str).to_numpy()
        row[f"{name}_auroc"] = pair_auroc(distances, labels)
        row[f"{name}_ari"] = two_cluster_ari(distances, labels)
        row[f"{name}_mean_distance"] = float(distances[upper].mean())
    return row


def batch_score(model, adata, n_cells: int = 3_000) -> float:
    u = np.asarray(model.get_latent_representation(), dtype=np.float64)
    cells = np.sort(np.random.default_rng(0).choice(adata.n_obs, min(n_cells, adata.n_obs), replace=False))
    return knn_batch_accuracy(u[cells], adata.obs["batch"].astype(str).to_numpy()[cells])


def child(args) -> int:
    """One side on one cohort; prints one JSON line per scored epoch."""
    import warnings

    import anndata
    import torch

    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    adata = anndata.read_h5ad(args.data)
    epochs = sorted(args.epochs)
    if args.child == "ours":
        from mrvi_pyro import MRVI

        MRVI.setup_anndata(adata, sample_key="sample", batch_key="batch")
        model = MRVI(adata, seed=args.seed)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="dynamics_") as scratch:
            for epoch in epochs:
                model.train(max_epochs=epoch, batch_size=args.batch_size, train_size=0.9, early_stopping=False,
                            seed=args.seed, progress_bar=False, checkpoint_dir=os.path.join(scratch, "checkpoint"),
                            plan_kwargs=json.loads(args.plan) or None)
                row = {"side": "ours", "seed": args.seed, "epoch": epoch, **score_distances(model, adata),
                       "seconds": time.perf_counter() - start}
                if epoch == epochs[-1]:
                    row["batch_knn"] = batch_score(model, adata)
                print("ROW " + json.dumps(row), flush=True)
        return 0
    import logging

    import scvi
    from scvi.external import MRVI

    logging.getLogger("scvi").setLevel(logging.WARNING)
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    (epoch,) = epochs
    scvi.settings.seed = args.seed
    MRVI.setup_anndata(adata, sample_key="sample", batch_key="batch", backend="torch")
    model = MRVI(adata)
    start = time.perf_counter()
    model.train(max_epochs=epoch, batch_size=args.batch_size, train_size=0.9, early_stopping=False,
                accelerator="cpu", devices=1, enable_progress_bar=False)
    row = {"side": "reference", "seed": args.seed, "epoch": epoch, **score_distances(model, adata),
           "batch_knn": batch_score(model, adata), "seconds": time.perf_counter() - start}
    print("ROW " + json.dumps(row), flush=True)
    return 0


def run_child(python: str, side: str, data: Path, seed: int, epochs: list[int], args) -> list[dict]:
    import subprocess

    command = [python, __file__, "--child", side, "--data", str(data), "--seed", str(seed),
               "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--plan", args.plan,
               "--epochs", *map(str, epochs)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    rows = [json.loads(line[4:]) for line in done.stdout.splitlines() if line.startswith("ROW ")]
    if done.returncode != 0:
        print(f"{side} seed {seed} failed (exit {done.returncode}):\n{done.stderr[-2000:]}", file=sys.stderr)
    return rows


def _first_found(rows: list[dict], metric: str) -> str:
    found = [r["epoch"] for r in rows if r[metric] >= RECOVERED_ARI]
    return str(found[0]) if found else f"- (scored at {', '.join(str(r['epoch']) for r in rows)})"


def summary(rows: list[dict]) -> list[str]:
    """First listed epoch with ARI >= 0.8 per seed, side and effect (``-``: not within the run)."""
    lines = ["| seed | side | disease pairs found at epoch | hidden grouping found at epoch |", "|---|---|---|---|"]
    keys = sorted({(r["seed"], r["side"]) for r in rows})
    for seed, side in keys:
        mine = sorted((r for r in rows if r["seed"] == seed and r["side"] == side), key=lambda r: r["epoch"])

        lines.append(f"| {seed} | {side} | {_first_found(mine, 'cov_ari')} | {_first_found(mine, 'hidden_ari')} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _harness.add_cohort_arguments(parser, n_cells=12_000)
    parser.add_argument("--simulator", default="datasets", choices=["datasets", "programs"])
    parser.add_argument("--preset", default="weak", choices=["weak", "strong"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", nargs="+", type=int, default=[25, 50, 75, 100, 150, 200, 300, 400])
    parser.add_argument("--reference-epochs", nargs="+", type=int, default=None,
                        help="one reference run per value (default: the last of --epochs)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--plan", default="{}", help="JSON of training-plan keywords for ours (lever studies)")
    parser.add_argument("--sides", nargs="+", default=["ours", "reference"], choices=["ours", "reference"])
    parser.add_argument("--reference-python", default=DEFAULT_REFERENCE)
    parser.add_argument("--timeout", type=float, default=6 * 3600.0)
    parser.add_argument("--workdir", default=None,
                        help="where the cohorts' .h5ad files go (default: a temp dir); one already there under "
                             "the same name is reused as that cohort, never rewritten")
    _harness.add_output_arguments(parser, what=".json of the arguments and every row")
    parser.add_argument("--child", choices=["ours", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if any(e <= 0 for e in args.epochs):
        parser.error("--epochs must be positive")
    if args.child:
        return child(args)
    _harness.refuse_existing(parser, [args.out], args.overwrite)  # before hours of training
    if "reference" in args.sides and not os.path.exists(args.reference_python):
        parser.error(f"--reference-python {args.reference_python} does not exist; install scvi-tools in a separate "
                     "virtual environment (benchmarks/README.md) or pass --sides ours")
    rows = []
    with tempfile.TemporaryDirectory(prefix="dynamics_") as scratch:
        workdir = Path(args.workdir or scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        for seed in args.seeds:
            data = cohort_file(workdir, args.simulator, args.preset, seed)
            if not data.exists():
                simulate(args.simulator, args.preset, seed, args).write_h5ad(data)
            if "ours" in args.sides:
                rows += run_child(sys.executable, "ours", data, seed, args.epochs, args)
            if "reference" in args.sides:
                for epoch in args.reference_epochs or [max(args.epochs)]:
                    rows += run_child(args.reference_python, "reference", data, seed, [epoch], args)
            for row in rows:
                if row["seed"] == seed:
                    print(json.dumps(row), flush=True)
    print("\n".join(summary(rows)))
    _harness.write_text_atomic(args.out, json.dumps({"arguments": vars(args), "rows": rows}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
