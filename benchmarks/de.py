"""Differential expression (DE) of mrvi_pyro, side by side with scvi-tools' MRVI.

Simulates a cohort (default 20,000 cells x 1,000 genes x 24 samples, 3 batches, sparse counts),
trains each implementation for ``--epochs`` epochs (untimed; the cost of DE does not depend on
training), then times ``differential_expression(sample_cov_keys=["disease"], store_lfc=True,
mc_samples=50)`` in a fresh process per implementation (``_harness``: the call's wall time
measured inside the child, the peak RSS of the whole child, training and data included,
measured from outside). Both sides use ``--threads`` torch threads (default 1) and the same DE
cell batch size (``--batch-size``, default 128 = the reference's default).

The reference is slow (several seconds per 128 cells on 2 cores), so by default it runs on the
first ``--reference-cells`` cells only (a random subset: the simulator shuffles the cells) and
its time is **extrapolated linearly** to all cells (its DE processes independent cell batches,
so time is proportional to the number of cells); the table says so. Its peak RSS is the one of
that subset run: its working set is one cell batch (batch x samples x draws), and the outputs
that grow with the cells (3 float32 arrays of cells x genes) are reported in a note. Pass
``--reference-cells 0`` to run it on all cells. The reference runs when
``/work/bench-venv/bin/python`` (or ``--reference-python``) exists; ``--no-reference`` skips it.

    python benchmarks/de.py                                        # 20k x 1k x 24, reference on 2,000 cells
    python benchmarks/de.py --n-cells 2000 --n-genes 200 --n-samples 12 --reference-cells 500   # quick
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
    """Train ours on ``args.data`` (untimed), then time DE with LFCs."""
    import time

    adata = _ours.read_counts(args.data, threads=args.threads)
    model, train_seconds = _ours.train_model(adata, epochs=args.epochs, batch_size=args.train_batch_size)
    start = time.perf_counter()
    result = model.differential_expression(sample_cov_keys=["disease"], store_lfc=True, mc_samples=args.mc_samples,
                                           batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    _harness.emit_result({
        "task": "de", "implementation": "mrvi_pyro", "seconds": seconds, "train_seconds": train_seconds,
        "n_cells": int(adata.n_obs), "mc_samples": args.mc_samples, "threads": args.threads,
        "output_shapes": {k: list(v.shape) for k, v in result.data_vars.items()},
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _harness.add_cohort_arguments(parser, n_cells=20_000)
    parser.add_argument("--mc-samples", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=128, help="DE cell batch size on both sides")
    parser.add_argument("--epochs", type=int, default=1, help="untimed training epochs on each side")
    parser.add_argument("--train-batch-size", type=int, default=256)
    parser.add_argument("--reference-cells", type=int, default=2_000,
                        help="run the reference on this many cells and extrapolate its time linearly "
                             "(0: all cells)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on both sides (default 1)")
    parser.add_argument("--timeout", type=float, default=7200.0, help="seconds per child process")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--reference-python", default=DEFAULT_REFERENCE)
    parser.add_argument("--keep-data", action="store_true", help="keep the simulated .h5ad files")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    tmp = _harness.scratch_dir("mrvi_bench_de_")
    data = os.path.join(tmp, "de.h5ad")
    adata = _ours.simulate_h5ad(data, n_cells=args.n_cells, n_genes=args.n_genes, n_samples=args.n_samples,
                                n_batches=args.n_batches)
    ref_cells = args.n_cells if args.reference_cells <= 0 else min(args.reference_cells, args.n_cells)
    ref_data = data
    if ref_cells < args.n_cells:
        ref_data = os.path.join(tmp, "de_reference_subset.h5ad")
        adata[:ref_cells].copy().write_h5ad(ref_data)
    del adata
    print(f"data: {args.n_cells} cells x {args.n_genes} genes, {args.n_samples} samples, {args.n_batches} batches; "
          f"DE on 'disease' with store_lfc=True, mc_samples={args.mc_samples}, batch_size={args.batch_size}; "
          f"{args.epochs} untimed training epoch(s); {args.threads} torch thread(s)")
    rows = []
    ours = _harness.run_script(sys.executable, __file__, [
        "--child", "--data", data, "--epochs", args.epochs, "--train-batch-size", args.train_batch_size,
        "--mc-samples", args.mc_samples, "--batch-size", args.batch_size, "--threads", args.threads,
    ], check=True, timeout=args.timeout)
    rows.append({"step": "differential_expression", "implementation": "mrvi_pyro", "seconds": ours["result"]["seconds"],
                 "peak_rss_gb": ours["peak_rss_gb"], "note": f"all {args.n_cells} cells"})
    run_reference = not args.no_reference and os.path.exists(args.reference_python)
    if run_reference:
        ref = _harness.run_script(args.reference_python, str(HERE / "reference_mrvi.py"), [
            "--data", ref_data, "--task", "de", "--mc-samples", args.mc_samples, "--max-epochs", args.epochs,
            "--batch-size", args.train_batch_size, "--eval-batch-size", args.batch_size, "--threads", args.threads,
        ], check=True, timeout=args.timeout)
        measured = ref["result"]["seconds"]
        factor = args.n_cells / ref_cells
        output_gb = 3 * 4 * (args.n_cells - ref_cells) * args.n_genes / 1e9
        note = (f"all {args.n_cells} cells" if factor == 1 else
                f"EXTRAPOLATED: measured {measured:.1f} s on {ref_cells} cells x {factor:.2f}; "
                f"peak RSS of the {ref_cells}-cell run (outputs of the other cells would add ~{output_gb:.2f} GB)")
        rows.append({"step": "differential_expression", "implementation": "scvi-tools MRVI",
                     "seconds": measured * factor, "peak_rss_gb": ref["peak_rss_gb"], "note": note})
    _harness.print_table(rows, baseline="scvi-tools MRVI" if run_reference else None,
                         title="DE, store_lfc=True (seconds: the call; peak RSS: whole process incl. training)")
    if run_reference:
        print(f"speed-up: {rows[1]['seconds'] / rows[0]['seconds']:.1f}x (target >= 10x); "
              f"peak memory: {rows[0]['peak_rss_gb'] / rows[1]['peak_rss_gb']:.2f} of the reference's "
              "(target <= 0.5)")
    if args.keep_data:
        print(f"data kept in {tmp}")
    else:
        for path in {data, ref_data}:
            os.remove(path)
        os.rmdir(tmp)


if __name__ == "__main__":
    main()
