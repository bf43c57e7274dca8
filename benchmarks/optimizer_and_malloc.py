"""The training step's hand-written machinery, measured against the library's own.

Compares, on the default model (3,000 cells x 1,000 genes x 24 samples, batch 128, 3 epochs, every
cell trained, no validation set), each run in a fresh process and the settings interleaved:

- ``flat``: ``mrvi_pyro.train.FlatParameters`` (parameters and gradients as views of one flat
  buffer; one zeroing, one norm, one clip and one fused Adam update per step) -- only on commits
  that have it (up to 44951d9; removed after this measurement, see ``results/optimizer_and_malloc.md``);
- ``fused``: ``torch.optim.Adam(fused=True)`` per parameter tensor with
  ``clip_grad_norm_(foreach=True)``;
- ``foreach``: ``torch.optim.Adam(foreach=True)`` with ``clip_grad_norm_(foreach=True)``;

each with the glibc allocator tuning (``mrvi_pyro.settings.tune_malloc``) on and off, at 1 and 2
torch threads. Prints the median training throughput of ``--repeats`` runs per setting.

    python benchmarks/optimizer_and_malloc.py            # 3 repeats
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _harness  # noqa: E402
import _ours  # noqa: E402


def child(args: argparse.Namespace) -> None:
    import torch

    import mrvi_pyro
    from mrvi_pyro import train as train_module

    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # one-time torch._dynamo import, not training
    mrvi_pyro.settings.tune_malloc = args.malloc == "on"
    if args.optimizer != "flat" and hasattr(train_module, "FlatParameters"):
        train_module.FlatParameters.supported = staticmethod(lambda params: False)
    if args.optimizer == "foreach":
        train_module.make_adam = lambda params, **kwargs: torch.optim.Adam(params, foreach=True, **kwargs)
    if args.optimizer == "flat" and not hasattr(train_module, "FlatParameters"):
        raise SystemExit("this mrvi_pyro has no FlatParameters")
    adata = _ours.read_counts(args.data, threads=args.threads)
    before = resource.getrusage(resource.RUSAGE_SELF)
    model, seconds = _ours.train_model(adata, epochs=args.epochs, batch_size=args.batch_size)
    after = resource.getrusage(resource.RUSAGE_SELF)
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    cells = adata.n_obs * args.epochs
    _harness.emit_result({"package": mrvi_pyro.__file__, "seconds": seconds, "cells_per_s": cells / seconds,
                          "cells_per_cpu_s": cells / (user + system), "user_s": user, "system_s": system,
                          "minor_faults": after.ru_minflt - before.ru_minflt})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-cells", type=int, default=3_000)
    parser.add_argument("--n-genes", type=int, default=1_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--optimizers", nargs="+", default=["fused", "foreach"], help="also 'flat' on commits "
                        "that have FlatParameters")
    parser.add_argument("--malloc", nargs="+", default=["on", "off"])
    parser.add_argument("--passive-wait", action="store_true",
                        help="OMP_WAIT_POLICY=PASSIVE for several threads: on a machine shared with other jobs, "
                             "spinning OpenMP threads measure the contention rather than the training step")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--optimizer", help=argparse.SUPPRESS)
    parser.add_argument("--thread-count", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.threads = args.thread_count
        child(args)
        return

    data = os.path.join(_harness.scratch_dir("mrvi_bench_"), "train.h5ad")
    _ours.simulate_h5ad(data, n_cells=args.n_cells, n_genes=args.n_genes, n_samples=24, n_batches=3, sparse=False)
    settings = [(t, o, m) for t in args.threads for o in args.optimizers for m in args.malloc]
    runs: dict[tuple, list[float]] = {s: [] for s in settings}
    for repeat in range(args.repeats):
        for threads, optimizer, malloc in settings:  # interleaved: load drift hits every setting alike
            out = _harness.run_script(sys.executable, __file__, [
                "--child", "--data", data, "--optimizer", optimizer, "--malloc", malloc, "--thread-count", threads,
                "--epochs", args.epochs, "--batch-size", args.batch_size], check=True,
                extra_env={"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                           **({"OMP_WAIT_POLICY": "PASSIVE"} if args.passive_wait and threads > 1 else {})})
            r = out["result"]
            runs[(threads, optimizer, malloc)].append(r)
            print(f"repeat {repeat}: threads={threads} {optimizer:8s} malloc {malloc:3s} "
                  f"{r['cells_per_s']:6.0f} cells/s "
                  f"wall, {r['cells_per_cpu_s']:6.0f} cells per CPU-s (user {r['user_s']:.1f} s, system "
                  f"{r['system_s']:.2f} s, {r['minor_faults']} minor page faults)", flush=True)
    print(f"\n{args.n_cells} cells x {args.n_genes} genes, batch {args.batch_size}, {args.epochs} epochs; median of "
          f"{args.repeats} runs, training only: cells/s of wall time | cells per CPU second (user + system, all "
          "threads; robust to other load on the machine)")
    for metric in ("cells_per_s", "cells_per_cpu_s"):
        for threads in args.threads:
            for malloc in args.malloc:
                med = {o: statistics.median(r[metric] for r in runs[(threads, o, malloc)]) for o in args.optimizers}
                base = med[args.optimizers[0]]
                print(f"{metric:15s} threads={threads} malloc {malloc:3s}: "
                      + ", ".join(f"{o} {v:.0f} ({v / base - 1:+.1%})" for o, v in med.items()))


if __name__ == "__main__":
    main()
