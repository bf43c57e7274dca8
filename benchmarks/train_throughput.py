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
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _harness  # noqa: E402
import _ours  # noqa: E402

DEFAULT_REFERENCE = "/work/bench-venv/bin/python"


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
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--reference-python", default=DEFAULT_REFERENCE)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.nproc < 1:
        parser.error(f"--nproc must be at least 1, got {args.nproc}")
    args.sparse = args.sparse or args.backed
    if args.child:
        child(args)
        return

    tmp = tempfile.mkdtemp(prefix="mrvi_bench_")
    data = os.path.join(tmp, "train.h5ad")
    _ours.simulate_h5ad(data, n_cells=args.n_cells, n_genes=args.n_genes, n_samples=args.n_samples,
                        n_batches=args.n_batches, sparse=args.sparse)
    print(f"data: {args.n_cells} cells x {args.n_genes} genes ({'CSR' if args.sparse else 'dense'}"
          f"{', ours reads it backed' if args.backed else ''}), {args.n_samples} samples, {args.n_batches} batches; "
          f"{args.epochs} epochs; {args.threads} torch thread(s)")
    run_reference = not args.no_reference and os.path.exists(args.reference_python)
    rows = []
    ours_name = "mrvi_pyro" if args.nproc == 1 else f"mrvi_pyro x{args.nproc} ranks"
    ours_name += " (backed)" if args.backed else ""
    for batch_size in args.batch_sizes:
        ours = _harness.run_script(sys.executable, __file__, [
            "--child", "--data", data, "--batch-size", batch_size, "--epochs", args.epochs,
            "--threads", args.threads, "--device", args.device, "--nproc", args.nproc,
            *(["--backed"] if args.backed else [])],
            extra_env={"MRVI_PYRO_SAME_DRAWS": str(args.same_draws),
                       **({"MRVI_PYRO_READ_AHEAD": "0"} if args.backed else {})}, check=True)
        r = ours["result"]
        step = f"train bs={batch_size}"
        rows.append({"step": step, "implementation": ours_name, "seconds": r["seconds"],
                     "peak_rss_gb": ours["peak_rss_gb"], "cells_per_s": r["cells_per_s"],
                     "steady_cells_per_s": r["steady_cells_per_s"]})
        if run_reference:
            ref = _harness.run_script(args.reference_python, str(HERE / "reference_mrvi.py"), [
                "--data", data, "--task", "train", "--max-epochs", args.epochs, "--batch-size", batch_size,
                "--threads", args.threads], check=True)
            rr = ref["result"]
            rows.append({"step": step, "implementation": "scvi-tools MRVI", "seconds": rr["seconds"],
                         "peak_rss_gb": ref["peak_rss_gb"], "cells_per_s": rr["cells_per_s"],
                         "steady_cells_per_s": rr.get("steady_cells_per_s")})
    _harness.print_table(rows, baseline="scvi-tools MRVI" if run_reference else None,
                         title="Training throughput (ratio = reference seconds / ours where shown)")
    print()
    for batch_size in args.batch_sizes:
        step = f"train bs={batch_size}"
        mine = [r for r in rows if r["step"] == step and r["implementation"] == ours_name][0]
        line = (f"bs={batch_size}: {ours_name} {mine['cells_per_s']:.0f} cells/s "
                f"(steady {mine['steady_cells_per_s']:.0f})")
        ref = [r for r in rows if r["step"] == step and r["implementation"] != ours_name]
        if ref:
            ref = ref[0]
            line += f"; scvi-tools {ref['cells_per_s']:.0f} cells/s"
            steady = ref["steady_cells_per_s"]  # None when the reference trained one epoch only
            line += f" (steady {steady:.0f})" if steady else ""
            line += f"; speed-up {mine['cells_per_s'] / ref['cells_per_s']:.2f}x"
            line += f" (steady {mine['steady_cells_per_s'] / steady:.2f}x)" if steady else ""
        print(line)


if __name__ == "__main__":
    main()
