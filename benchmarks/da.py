"""Differential abundance (DA) of mrvi_pyro, side by side with scvi-tools' MRVI.

Simulates a cohort (default 20,000 cells x 1,000 genes x 24 samples, 3 batches, sparse counts),
trains each implementation for ``--epochs`` epochs (untimed), then times
``differential_abundance(sample_cov_keys=["disease"])`` in a fresh process per implementation
(peak RSS of the whole process, training included, measured by ``_harness``; both sides use
``--threads`` torch threads). The reference runs when ``/work/bench-venv/bin/python`` (or
``--reference-python``) has scvi-tools (``--no-reference`` skips it).

``--scale`` runs the large case instead: 200,000 cells x 200 samples with the component cap
(``--cap``, default 500 per sample), ours only, trained without KL warm-up (``--kl-warmup 0``)
so that the short training gives realistic posterior scales. With a cap, the child also computes the exact
answer for ``--exact-subset`` random query cells (all components) and reports the cap's error
on ``log_probs`` and on the disease-vs-healthy log-ratio of those cells.

    python benchmarks/da.py                                   # 20k x 24, with the reference
    python benchmarks/da.py --n-cells 4000 --n-samples 12     # quick
    python benchmarks/da.py --scale                           # 200k x 200, cap 500
    python benchmarks/da.py --scale --n-cells 20000 --n-samples 40 --cap 100   # quick scale check
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _harness  # noqa: E402
import _ours  # noqa: E402

DEFAULT_REFERENCE = "/work/bench-venv/bin/python"


def child(args: argparse.Namespace) -> None:
    """Train ours on ``args.data`` (untimed), time DA, optionally measure the cap's error."""
    import time

    import numpy as np
    import torch

    from mrvi_pyro import da

    adata = _ours.read_counts(args.data, threads=args.threads)
    warmup = {} if args.kl_warmup is None else {"n_epochs_kl_warmup": args.kl_warmup}
    model, train_seconds = _ours.train_model(adata, epochs=args.epochs, batch_size=args.train_batch_size, **warmup)
    cap = args.cap if args.cap and args.cap > 0 else None
    start = time.perf_counter()
    result = model.differential_abundance(sample_cov_keys=["disease"], max_components_per_sample=cap, seed=0)
    seconds = time.perf_counter() - start
    out = {
        "task": "da", "implementation": "mrvi_pyro", "seconds": seconds, "train_seconds": train_seconds,
        "n_cells": int(adata.n_obs), "n_samples": int(result.sizes["sample"]), "cap": cap,
        "threads": args.threads, "output_shapes": {k: list(v.shape) for k, v in result.data_vars.items()},
    }
    if cap is not None and args.exact_subset > 0:
        start = time.perf_counter()
        data = model._cell_data()
        rng = np.random.default_rng(0)
        subset = np.sort(rng.choice(adata.n_obs, size=min(args.exact_subset, adata.n_obs), replace=False))
        loc, scale, samples = da.posterior_parameters(model.module, data, batch_size=1024)
        table = da.pack_components(loc, scale, samples, model.module.n_samples)
        exact = da.aggregated_log_density(loc[torch.as_tensor(subset)], table).numpy()
        capped = result["log_probs"].values[subset]
        lp_err = np.abs(capped - exact)
        info = model.sample_info["disease"].astype(str).to_numpy()
        membership = np.stack([info == "disease", info == "healthy"], axis=1)
        groups = da.group_log_probs(exact, data.sample_index[subset], membership, warn=False)
        exact_ratio = groups[:, 0] - groups[:, 1]
        lp_groups = result["disease_log_probs"]
        capped_ratio = (lp_groups.sel(disease="disease") - lp_groups.sel(disease="healthy")).values[subset]
        ratio_err = np.abs(capped_ratio - exact_ratio)
        out.update({
            "exact_subset": int(len(subset)), "exact_seconds": time.perf_counter() - start,
            "log_probs_abs_err_median": float(np.median(lp_err)),
            "log_probs_abs_err_q95": float(np.quantile(lp_err, 0.95)),
            "log_ratio_abs_err_mean": float(ratio_err.mean()),
            "log_ratio_abs_err_q95": float(np.quantile(ratio_err, 0.95)),
            "log_ratio_corr": float(np.corrcoef(capped_ratio, exact_ratio)[0, 1]),
            "log_ratio_sd": float(exact_ratio.std()),
        })
    _harness.emit_result(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-cells", type=int, default=None, help="default 20,000 (200,000 with --scale)")
    parser.add_argument("--n-genes", type=int, default=1_000)
    parser.add_argument("--n-samples", type=int, default=None, help="default 24 (200 with --scale)")
    parser.add_argument("--n-batches", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1, help="untimed training epochs on each side")
    parser.add_argument("--train-batch-size", type=int, default=256)
    parser.add_argument("--kl-warmup", type=int, default=None,
                        help="ours: KL warm-up epochs (default: MRVI's 20, as the reference; 0 with --scale). "
                             "With warm-up, a 1-epoch model has collapsed posteriors (scales ~0.01), where "
                             "DA is meaningless and the cap's error is not representative")
    parser.add_argument("--cap", type=int, default=None,
                        help="max_components_per_sample for ours (default: exact; 500 with --scale)")
    parser.add_argument("--exact-subset", type=int, default=2_000,
                        help="query cells on which the capped answer is compared with the exact one")
    parser.add_argument("--scale", action="store_true", help="200,000 cells x 200 samples with the cap, ours only")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on both sides (default 1)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per child process")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--reference-python", default=DEFAULT_REFERENCE)
    parser.add_argument("--keep-data", action="store_true", help="keep the simulated .h5ad")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    n_cells = args.n_cells or (200_000 if args.scale else 20_000)
    n_samples = args.n_samples or (200 if args.scale else 24)
    cap = args.cap if args.cap is not None else (500 if args.scale else 0)
    kl_warmup = args.kl_warmup if args.kl_warmup is not None else (0 if args.scale else None)

    tmp = _harness.scratch_dir("mrvi_bench_da_")
    data = os.path.join(tmp, "da.h5ad")
    _ours.simulate_h5ad(data, n_cells=n_cells, n_genes=args.n_genes, n_samples=n_samples, n_batches=args.n_batches)
    print(f"data: {n_cells} cells x {args.n_genes} genes, {n_samples} samples, {args.n_batches} batches; "
          f"{args.epochs} untimed training epoch(s); {args.threads} torch thread(s); "
          f"ours: {'cap ' + str(cap) + ' components per sample' if cap else 'exact'}"
          f"{'' if kl_warmup is None else f', KL warm-up {kl_warmup} epochs'}")
    rows = []
    ours = _harness.run_script(sys.executable, __file__, [
        "--child", "--data", data, "--epochs", args.epochs, "--train-batch-size", args.train_batch_size,
        "--cap", cap, "--exact-subset", args.exact_subset, "--threads", args.threads,
        *([] if kl_warmup is None else ["--kl-warmup", kl_warmup]),
    ], check=True, timeout=args.timeout)
    r = ours["result"]
    rows.append({"step": "differential_abundance", "implementation": "mrvi_pyro", "seconds": r["seconds"],
                 "peak_rss_gb": ours["peak_rss_gb"], "note": "exact" if not cap else f"cap {cap}"})
    run_reference = not args.scale and not args.no_reference and os.path.exists(args.reference_python)
    if run_reference:
        ref = _harness.run_script(args.reference_python, str(HERE / "reference_mrvi.py"), [
            "--data", data, "--task", "da", "--max-epochs", args.epochs, "--batch-size", args.train_batch_size,
            "--threads", args.threads,
        ], check=True, timeout=args.timeout)
        rows.append({"step": "differential_abundance", "implementation": "scvi-tools MRVI",
                     "seconds": ref["result"]["seconds"], "peak_rss_gb": ref["peak_rss_gb"], "note": "exact"})
    _harness.print_table(rows, baseline="scvi-tools MRVI" if run_reference else None,
                         title="Differential abundance, one binary key (peak RSS: whole process incl. training)")
    if run_reference:
        print(f"speed-up: {rows[1]['seconds'] / rows[0]['seconds']:.1f}x (target >= 5x)")
    if "log_ratio_abs_err_mean" in r:
        print(f"cap {cap}: error against the exact answer on {r['exact_subset']} random query cells "
              f"(exact part took {r['exact_seconds']:.1f} s):\n"
              f"  log_probs |err| median {r['log_probs_abs_err_median']:.3f}, 95% {r['log_probs_abs_err_q95']:.3f}\n"
              f"  disease-vs-healthy log-ratio |err| mean {r['log_ratio_abs_err_mean']:.3f}, "
              f"95% {r['log_ratio_abs_err_q95']:.3f} (sd of the exact log-ratio {r['log_ratio_sd']:.3f}); "
              f"correlation {r['log_ratio_corr']:.3f}")
    if args.keep_data:
        print(f"data kept at {data}")
    else:
        os.remove(data)
        os.rmdir(tmp)


if __name__ == "__main__":
    main()
