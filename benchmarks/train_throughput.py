"""Training throughput (cells per second) of mrvi_pyro, side by side with scvi-tools' MRVI.

Simulates a cohort (default 20,000 cells x 1,000 genes x 24 samples, 3 batches), then for each
batch size trains both implementations for a few epochs with the same architecture (defaults),
no validation set and the same number of torch threads, each in a fresh process (peak RSS is
measured by ``_harness``). Throughput = cells x epochs / training seconds; ``steady`` leaves out
the first epoch (warm-up). The reference runs when ``/work/bench-venv/bin/python`` (or
``--reference-python``) has scvi-tools.

    python benchmarks/train_throughput.py                       # full size
    python benchmarks/train_throughput.py --n-cells 4000 --epochs 2   # quick
    python benchmarks/train_throughput.py --nproc 2 --threads 1 --no-reference   # ours on 2 ranks
    python benchmarks/train_throughput.py --backed                  # ours reads the counts from disk
    python benchmarks/train_throughput.py --batch-sizes 128 256 --threads 2 --repeats 3   # paired runs

``--repeats N`` runs each side N times per batch size, alternating which side goes first, and
reports the speed-up of every pair (ours over the reference run beside it) with their median and
range: on a shared VM two sittings of the same code differ by more than 20%, and pairs taken
back to back share most of that drift.

``--sparse`` writes the counts as CSR (both sides then read the same CSR file into memory);
``--backed`` implies it and has ours train from the file opened ``backed="r"`` (only the
minibatches are read into memory), a mode the reference lacks, so its side still reads the
whole file: the comparison is then of what each side needs for the same file on disk. The
read-ahead worker is off there (``MRVI_PYRO_READ_AHEAD=0``), so that ours is one process and its
peak RSS is all the memory it uses.

With ``--nproc N`` ours trains data-parallel on N local ranks (``mrvi_pyro.distributed.launch``,
gloo, ``--threads`` threads per rank; the global batch is ``--batch-sizes``, each rank takes
1/N of every minibatch) and the seconds are rank 0's ``train()`` call. ``--same-draws 0`` sets
``MRVI_PYRO_SAME_DRAWS=0`` (each rank draws only for its own cells). The reference runs in one
process either way.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _harness  # noqa: E402
import _ours  # noqa: E402

DEFAULT_REFERENCE = "/work/bench-venv/bin/python"
REFERENCE_NAME = "scvi-tools MRVI"


def _train_once(data: str, threads: int, epochs: int, batch_size: int, device: str,
                backed: bool = False) -> tuple[int, float, list]:
    """Train ours on ``data`` (opened backed when asked); returns (cells, training seconds,
    seconds per epoch). Module level, so that ``distributed.launch`` can run it on every rank."""
    adata = _ours.read_counts(data, threads=threads, backed=backed)
    model, seconds = _ours.train_model(adata, epochs=epochs, batch_size=batch_size, device=device)
    return adata.n_obs, seconds, model.history["seconds"].tolist()


def child(args: argparse.Namespace) -> None:
    """Train ours on ``args.data`` (on ``args.nproc`` ranks when above 1) and emit a RESULT line."""
    if args.nproc > 1:
        from mrvi_pyro import distributed

        n_obs, seconds, per_epoch = distributed.launch(
            _train_once, args.nproc, args.data, args.threads, args.epochs, args.batch_size, args.device,
            args.backed, threads=args.threads)
    else:
        n_obs, seconds, per_epoch = _train_once(args.data, args.threads, args.epochs, args.batch_size, args.device,
                                                args.backed)
    steady = per_epoch[1:] or per_epoch
    _harness.emit_result({
        "task": "train", "implementation": "mrvi_pyro", "batch_size": args.batch_size, "seconds": seconds,
        "cells_per_s": n_obs * args.epochs / seconds,
        "steady_cells_per_s": n_obs * len(steady) / sum(steady), "epoch_seconds": per_epoch,
        "threads": args.threads, "device": args.device, "nproc": args.nproc,
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _harness.add_cohort_arguments(parser, n_cells=20_000)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on both sides (default 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--nproc", type=int, default=1, help="ranks for ours (data-parallel, gloo; default 1)")
    parser.add_argument("--same-draws", type=int, choices=(0, 1), default=1,
                        help="with --nproc > 1: 0 sets MRVI_PYRO_SAME_DRAWS=0 (per-rank random streams)")
    parser.add_argument("--sparse", action="store_true", help="write the counts as CSR (default dense)")
    parser.add_argument("--backed", action="store_true",
                        help="ours reads the counts backed from disk, without the read-ahead worker "
                             "(implies --sparse; the reference reads them whole)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each side per batch size, alternating which runs first; the "
                             "speed-up is the median of the paired runs (default 1)")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--reference-python", default=DEFAULT_REFERENCE)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.nproc < 1:
        parser.error(f"--nproc must be at least 1, got {args.nproc}")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    args.sparse = args.sparse or args.backed
    if args.child:
        child(args)
        return

    tmp = _harness.scratch_dir("mrvi_bench_")
    data = os.path.join(tmp, "train.h5ad")
    _ours.simulate_h5ad(data, n_cells=args.n_cells, n_genes=args.n_genes, n_samples=args.n_samples,
                        n_batches=args.n_batches, sparse=args.sparse)
    print(f"data: {args.n_cells} cells x {args.n_genes} genes ({'CSR' if args.sparse else 'dense'}"
          f"{', ours reads it backed' if args.backed else ''}), {args.n_samples} samples, {args.n_batches} batches; "
          f"{args.epochs} epochs; {args.threads} torch thread(s)")
    run_reference = not args.no_reference and os.path.exists(args.reference_python)
    ours_name = "mrvi_pyro" if args.nproc == 1 else f"mrvi_pyro x{args.nproc} ranks"
    ours_name += " (backed)" if args.backed else ""
    rows = []
    for batch_size in args.batch_sizes:
        for repeat in range(args.repeats):
            # Alternate which side runs first, so that a drift of the machine's speed within a
            # sitting weighs on both sides alike.
            order = ("ours", "reference") if repeat % 2 == 0 else ("reference", "ours")
            for side in order:
                if side == "ours":
                    rows.append(_run_ours(args, data, batch_size, ours_name, repeat))
                elif run_reference:
                    rows.append(_run_reference(args, data, batch_size, repeat))
    _harness.print_table(rows, baseline=REFERENCE_NAME if run_reference else None,
                         title="Training throughput (ratio = reference seconds / ours where shown)")
    print()
    for line in summary_lines(rows, args.batch_sizes, ours_name):
        print(line)


def _step(batch_size: int, repeat: int) -> str:
    return f"train bs={batch_size}" + (f" #{repeat + 1}" if repeat else "")


def _run_ours(args, data: str, batch_size: int, ours_name: str, repeat: int) -> dict:
    ours = _harness.run_script(sys.executable, __file__, [
        "--child", "--data", data, "--batch-size", batch_size, "--epochs", args.epochs,
        "--threads", args.threads, "--device", args.device, "--nproc", args.nproc,
        *(["--backed"] if args.backed else [])],
        extra_env={"MRVI_PYRO_SAME_DRAWS": str(args.same_draws),
                   **({"MRVI_PYRO_READ_AHEAD": "0"} if args.backed else {})}, check=True)
    r = ours["result"]
    return {"step": _step(batch_size, repeat), "batch_size": batch_size, "implementation": ours_name,
            "seconds": r["seconds"], "peak_rss_gb": ours["peak_rss_gb"], "cells_per_s": r["cells_per_s"],
            "steady_cells_per_s": r["steady_cells_per_s"]}


def _run_reference(args, data: str, batch_size: int, repeat: int) -> dict:
    ref = _harness.run_script(args.reference_python, str(HERE / "reference_mrvi.py"), [
        "--data", data, "--task", "train", "--max-epochs", args.epochs, "--batch-size", batch_size,
        "--threads", args.threads], check=True)
    rr = ref["result"]
    return {"step": _step(batch_size, repeat), "batch_size": batch_size, "implementation": REFERENCE_NAME,
            "seconds": rr["seconds"], "peak_rss_gb": ref["peak_rss_gb"], "cells_per_s": rr["cells_per_s"],
            "steady_cells_per_s": rr.get("steady_cells_per_s")}


def summary_lines(rows: list[dict], batch_sizes, ours_name: str) -> list[str]:
    """One line per batch size: each side's cells/s (the median over repeats), and the speed-up
    of every repeat (ours over the reference run beside it) with its median and range."""
    lines = []
    for batch_size in batch_sizes:
        mine = [r for r in rows if r["batch_size"] == batch_size and r["implementation"] == ours_name]
        theirs = [r for r in rows if r["batch_size"] == batch_size and r["implementation"] == REFERENCE_NAME]
        rate = float(np.median([r["cells_per_s"] for r in mine]))
        steady = float(np.median([r["steady_cells_per_s"] for r in mine]))
        line = f"bs={batch_size}: {ours_name} {rate:.0f} cells/s (steady {steady:.0f})"
        if theirs:
            ref_rate = float(np.median([r["cells_per_s"] for r in theirs]))
            line += f"; scvi-tools {ref_rate:.0f} cells/s"
            ref_steady = [r["steady_cells_per_s"] for r in theirs]
            # None when the reference trained one epoch only
            ref_steady = float(np.median(ref_steady)) if None not in ref_steady else None
            line += f" (steady {ref_steady:.0f})" if ref_steady else ""
            ratios = [a["cells_per_s"] / b["cells_per_s"] for a, b in zip(mine, theirs)]
            line += f"; speed-up {np.median(ratios):.2f}x"
            if len(ratios) > 1:
                line += (f" (median of {len(ratios)} paired runs, range {min(ratios):.2f}-{max(ratios):.2f}x: "
                         + ", ".join(f"{x:.2f}" for x in ratios) + ")")
            elif ref_steady:
                line += f" (steady {steady / ref_steady:.2f}x)"
        if len(mine) > 1:
            line += f"; ours over its {len(mine)} runs " + ", ".join(f"{r['cells_per_s']:.0f}" for r in mine)
        lines.append(line)
    return lines

if __name__ == "__main__":
    main()
