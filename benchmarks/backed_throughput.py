"""Training throughput with the counts in memory versus read from a backed .h5ad.

Simulates a cohort (default 20,000 cells x 1,000 genes x 24 samples, 3 batches, CSR counts) and
writes it to an .h5ad once. Then each configuration trains a default ``MRVI`` for ``--epochs``
epochs (batch 128, no validation set) in a fresh process (peak RSS from ``_harness``):

- ``memory``: ``anndata.read_h5ad(path)`` (CSR in memory);
- ``backed, anndata rows``: ``read_h5ad(path, backed="r")`` with anndata's own row indexing
  (a read per row; how backed minibatches were read before);
- ``backed``: the same file through :class:`mrvi_pyro.data.BackedCSRRows` (one HDF5 read per
  array per minibatch), without read-ahead (``MRVI_PYRO_READ_AHEAD=0``);
- ``backed + read-ahead``: as above, the next minibatches read by a worker process
  (``MRVI_PYRO_READ_AHEAD=1``; by default it is used when torch leaves a core free or the model
  runs on a GPU).

Each is run with 1 torch thread and with torch's default thread count, ``--repeats`` times
interleaved (a shared machine is noisy), and the table reports the median wall-clock
throughput of the training epochs (the one-off validation pass over the counts when the data
are first read is not included), the CPU seconds per 1,000 cells (process CPU time, less sensitive to other load) and
their ratios to ``memory`` at the same thread count (``CPU vs memory`` > 1: cheaper than memory).

    python benchmarks/backed_throughput.py                          # full size
    python benchmarks/backed_throughput.py --n-cells 4000 --repeats 1   # quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _harness  # noqa: E402
import _ours  # noqa: E402

MODES = ("memory", "backed, anndata rows", "backed", "backed + read-ahead")


def child(args: argparse.Namespace) -> None:
    """Train on ``args.data`` in the configuration ``args.mode`` and emit a RESULT line."""
    import resource

    import torch

    import mrvi_pyro.data

    if args.mode == "backed, anndata rows":
        mrvi_pyro.data.BackedCSRRows.supported = staticmethod(lambda matrix: False)
    threads = args.threads if args.threads > 0 else torch.get_num_threads()
    adata = _ours.read_counts(args.data, threads=threads, backed=args.mode != "memory")
    model, _ = _ours.train_model(adata, epochs=0, batch_size=args.batch_size)
    model._cell_data(purpose="training")  # the one-off validation pass over the counts, not timed

    def cpu_seconds():
        own, workers = (resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
        return own.ru_utime + own.ru_stime, workers.ru_utime + workers.ru_stime

    before = cpu_seconds()
    model.train(max_epochs=args.epochs, batch_size=args.batch_size, train_size=1.0, progress_bar=False)
    own, workers = (after - start for after, start in zip(cpu_seconds(), before))
    seconds = float(model.history["seconds"].sum())
    cells = adata.n_obs * args.epochs
    _harness.emit_result({
        "mode": args.mode, "threads": threads, "seconds": seconds, "cells_per_s": cells / seconds,
        "cpu_s_per_1000_cells": 1000 * own / cells, "worker_cpu_s_per_1000_cells": 1000 * workers / cells,
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _harness.add_cohort_arguments(parser, n_cells=20_000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--thread-counts", type=int, nargs="+", default=[1, 0],
                        help="torch threads per run; 0 = torch's default (default: 1 and 0)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    tmp = _harness.scratch_dir("mrvi_bench_backed_")
    data = os.path.join(tmp, "counts.h5ad")
    _ours.simulate_h5ad(data, n_cells=args.n_cells, n_genes=args.n_genes, n_samples=args.n_samples,
                        n_batches=args.n_batches, sparse=True)
    print(f"data: {args.n_cells} cells x {args.n_genes} genes (CSR, {os.path.getsize(data) / 1e6:.0f} MB .h5ad), "
          f"{args.epochs} epoch(s), batch {args.batch_size}, {args.repeats} repeat(s)", flush=True)
    runs: dict[tuple, list[dict]] = {}
    for _ in range(args.repeats):
        for threads in args.thread_counts:
            for mode in MODES:
                env = dict(os.environ)
                env["MRVI_PYRO_READ_AHEAD"] = "1" if mode == "backed + read-ahead" else "0"
                if threads > 0:
                    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
                else:
                    env.pop("OMP_NUM_THREADS", None)
                    env.pop("MKL_NUM_THREADS", None)
                out = _harness.run_script(sys.executable, __file__, [
                    "--child", "--data", data, "--mode", mode, "--threads", threads, "--epochs", args.epochs,
                    "--batch-size", args.batch_size], check=True, env=env)
                result = {**out["result"], "peak_rss_gb": out["peak_rss_gb"]}
                runs.setdefault((result["threads"], mode), []).append(result)
                print(f"  {mode} ({result['threads']} thread(s)): {result['cells_per_s']:.0f} cells/s, "
                      f"{result['cpu_s_per_1000_cells']:.3f} CPU s / 1000 cells "
                      f"(+{result['worker_cpu_s_per_1000_cells']:.3f} in the read-ahead worker)", flush=True)
    rows = []
    for (threads, mode), results in runs.items():
        base = runs[(threads, "memory")]
        speed = statistics.median(r["cells_per_s"] for r in results)
        cpu = statistics.median(r["cpu_s_per_1000_cells"] for r in results)
        rows.append({
            "threads": threads, "mode": mode, "cells_per_s": speed,
            "vs_memory": speed / statistics.median(r["cells_per_s"] for r in base),
            "cpu_s_per_1000_cells": cpu,
            "cpu_vs_memory": statistics.median(r["cpu_s_per_1000_cells"] for r in base) / cpu,
            "worker_cpu": statistics.median(r["worker_cpu_s_per_1000_cells"] for r in results),
            "peak_rss_gb": statistics.median(r["peak_rss_gb"] for r in results),
        })
    print("\nTraining throughput, counts in memory vs backed (medians; ratios to memory at the same threads)")
    print(f"{'threads':>7}  {'mode':<22} {'cells/s':>8} {'vs memory':>9} {'CPU s/1000 cells':>16} "
          f"{'CPU vs memory':>13} {'+worker CPU':>11} {'peak RSS GB':>11}")
    for r in rows:
        print(f"{r['threads']:>7}  {r['mode']:<22} {r['cells_per_s']:>8.0f} {r['vs_memory']:>9.2f} "
              f"{r['cpu_s_per_1000_cells']:>16.3f} {r['cpu_vs_memory']:>13.2f} {r['worker_cpu']:>11.3f} "
              f"{r['peak_rss_gb']:>11.2f}")


if __name__ == "__main__":
    main()
