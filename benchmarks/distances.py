"""Benchmark: grouped local sample distances, mrvi_pyro vs scvi-tools' MRVI, time and peak RSS.

Simulates a cohort (:func:`mrvi_pyro.datasets.simulate`, sparse counts) to an .h5ad in a temp
directory, then times ``model.get_local_sample_distances(groupby="cell_type", keep_cell=False)``
in fresh subprocesses (``benchmarks/_harness.py``: wall time of the call measured inside the
child, peak RSS of the whole child measured from outside), for mrvi_pyro and, when
``/work/bench-venv/bin/python`` exists, for scvi-tools' MRVI (``reference_mrvi.py --task
distances``). Both sides use one torch thread and train ``--epochs`` epochs untimed first
(the timing of the distances does not depend on training).

Protocol: by default each side trains and saves its model in an unmeasured process
(``--save-model``), and the measured process loads it and computes the distances, as an
analysis session does; peak RSS then belongs to the distances step, not to training (both
libraries import their optimiser machinery only to train). ``--train-in-process`` measures
the older protocol instead: train untimed and compute the distances in the same process.

Usage::

    python benchmarks/distances.py                      # 20,000 cells x 24 samples x 1,000 genes
    python benchmarks/distances.py --n-cells 2000 --n-samples 12 --n-genes 200   # quick check
    python benchmarks/distances.py --scale              # 200,000 cells x 200 samples, ours only

``--scale`` runs 200,000 cells x 200 samples (a per-cell float32 tensor would be 32 GB) without
training (``--epochs 0``), reading the counts backed from disk, and skips the reference unless
``--with-reference`` is given.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REFERENCE_PYTHON = Path("/work/bench-venv/bin/python")
STEP = "grouped distances"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-cells", type=int, default=None, help="default 20,000 (200,000 with --scale)")
    parser.add_argument("--n-samples", type=int, default=None, help="default 24 (200 with --scale)")
    parser.add_argument("--n-genes", type=int, default=1000)
    parser.add_argument("--n-batches", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="untimed training epochs (default 1; 0 with --scale)")
    parser.add_argument("--batch-size", type=int, default=256, help="cells per chunk of the distances (both sides)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on both sides (default 1)")
    parser.add_argument("--scale", action="store_true", help="200,000 cells x 200 samples, ours only")
    parser.add_argument("--with-reference", action="store_true", help="also run the reference with --scale")
    parser.add_argument("--no-reference", action="store_true", help="skip scvi-tools' MRVI")
    parser.add_argument("--reference-python", default=str(REFERENCE_PYTHON),
                        help="python of the venv with scvi-tools (default /work/bench-venv/bin/python)")
    parser.add_argument("--backed", action="store_true", help="read counts backed from disk (default with --scale)")
    parser.add_argument("--train-in-process", action="store_true",
                        help="train in the measured process instead of loading a saved model")
    parser.add_argument("--save-model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--load-model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per child")
    parser.add_argument("--workdir", default=None, help="keep the data here (default: a temp dir, removed)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.n_cells is None:
        args.n_cells = 200_000 if args.scale else 20_000
    if args.n_samples is None:
        args.n_samples = 200 if args.scale else 24
    if args.epochs is None:
        args.epochs = 0 if args.scale else 1
    args.backed = args.backed or args.scale
    return args


def child(args) -> int:
    """Measured side: load, set up, train untimed, time the grouped distances."""
    sys.path.insert(0, str(HERE))
    import warnings

    import torch

    import _ours
    from _harness import emit_result

    warnings.filterwarnings("ignore")
    from mrvi_pyro import MRVI

    adata = _ours.read_counts(args.data, threads=args.threads, backed=args.backed)
    if args.load_model:
        model, train_seconds = MRVI.load(args.load_model, adata=adata), 0.0
    else:
        model, train_seconds = _ours.train_model(adata, epochs=args.epochs, batch_size=128)
    if args.save_model:
        model.save(args.save_model, overwrite=True)
        emit_result({"implementation": "mrvi_pyro", "seconds": None, "train_seconds": train_seconds})
        return 0
    start = time.perf_counter()
    out = model.get_local_sample_distances(groupby="cell_type", keep_cell=False, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    emit_result({
        "implementation": "mrvi_pyro", "seconds": seconds, "train_seconds": train_seconds,
        "n_cells": adata.n_obs, "n_samples": model.registry.n_samples, "torch_threads": torch.get_num_threads(),
        "output_shapes": {k: list(v.shape) for k, v in out.data_vars.items()},
    })
    return 0


def simulate_to(path: Path, args) -> None:
    from _ours import simulate_h5ad

    start = time.perf_counter()
    adata = simulate_h5ad(path, n_cells=args.n_cells, n_genes=args.n_genes, n_samples=args.n_samples,
                          n_batches=args.n_batches)
    print(f"simulated {adata.n_obs:,} cells x {adata.n_vars:,} genes, {args.n_samples} samples, "
          f"{args.n_batches} batches in {time.perf_counter() - start:.1f} s -> {path}", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args)
    sys.path.insert(0, str(HERE))
    from _harness import print_table, run_command

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_distances_"))
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / f"sim_{args.n_cells}x{args.n_samples}x{args.n_genes}.h5ad"
    if not data.exists():
        simulate_to(data, args)
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1"}
    ours_cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--data", str(data),
                "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--threads", str(args.threads),
                "--n-cells", str(args.n_cells), "--n-samples", str(args.n_samples)]
    if args.backed:
        ours_cmd.append("--backed")
    runs = [("mrvi_pyro", ours_cmd, sys.executable)]
    run_reference = not args.no_reference and (not args.scale or args.with_reference)
    reference_python = Path(args.reference_python)
    if run_reference and reference_python.exists():
        ref_cmd = [str(reference_python), str(HERE / "reference_mrvi.py"), "--data", str(data), "--task", "distances",
                   "--threads", str(args.threads), "--max-epochs", str(max(args.epochs, 1)),
                   "--eval-batch-size", str(args.batch_size)]
        runs.insert(0, ("scvi-tools MRVI", ref_cmd, str(reference_python)))
    elif run_reference:
        print(f"reference skipped: {reference_python} not found", flush=True)

    if not args.train_in_process:
        # Train and save in unmeasured processes; the measured ones load the saved models.
        for i, (name, cmd, python) in enumerate(runs):
            model_dir = workdir / f"model_{name.split()[0]}"
            print(f"training {name} (not measured) ...", flush=True)
            rec = run_command(cmd + ["--save-model", str(model_dir)], extra_env=env, timeout=args.timeout,
                              launcher_python=python, log_path=str(workdir / f"{name.split()[0]}_train.log"))
            if rec["returncode"] != 0:
                print((rec["stderr"] or "")[-2000:], file=sys.stderr)
            runs[i] = (name, cmd + ["--load-model", str(model_dir)], python)

    rows = []
    for name, cmd, python in runs:
        print(f"running {name} ...", flush=True)
        rec = run_command(cmd, extra_env=env, timeout=args.timeout, launcher_python=python,
                          log_path=str(workdir / f"{name.split()[0]}.log"))
        result = rec["result"] or {}
        note = ""
        if rec["returncode"] != 0 or rec["timed_out"] or not result:
            note = f"failed (rc={rec['returncode']}, timed_out={rec['timed_out']}); log in {workdir}"
            print((rec["stderr"] or "")[-2000:], file=sys.stderr)
        rows.append({"step": f"{STEP} {args.n_cells:,} x {args.n_samples}", "implementation": name,
                     "seconds": result.get("seconds"), "peak_rss_gb": rec["peak_rss_gb"], "note": note})
    baseline = "scvi-tools MRVI" if any(r["implementation"] == "scvi-tools MRVI" for r in rows) else None
    print()
    print_table(rows, baseline=baseline, title=(
        f"get_local_sample_distances(groupby='cell_type', keep_cell=False): {args.n_cells:,} cells x "
        f"{args.n_samples} samples x {args.n_genes:,} genes, {args.threads} torch thread(s), batch {args.batch_size}, "
        f"{args.epochs} epoch(s) trained "
        f"{'untimed in the same process' if args.train_in_process else 'and saved beforehand'}"
        f"{' (counts read backed)' if args.backed else ''}"))
    if not args.workdir:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
