"""Training and the contention probe when another process keeps a CPU core busy.

For each condition (``idle``; ``busy``: one CPU-bound Python loop running beside the run) and
thread count (1 and torch's default), a fresh process trains the default model for
``--epochs`` epochs at batch 128 on a simulated cohort. The script prints the training
seconds, whether the warning about torch's threads fired, and the ratio training's check
measured (:func:`mrvi_pyro._threads.thread_slowdown`: the loss of 128 cells timed with the
default threads over one thread).

    python benchmarks/contention.py                # 2,000 cells x 1,000 genes, 2 epochs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(args: argparse.Namespace) -> None:
    import warnings

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from mrvi_pyro import MRVI, _threads, datasets

    adata = datasets.simulate(n_cells=args.n_cells, n_genes=args.n_genes, n_samples=12, seed=0)
    MRVI.setup_anndata(adata, sample_key="sample", batch_key="batch")
    model = MRVI(adata, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        model.train(max_epochs=args.epochs, batch_size=128, seed=0, progress_bar=False)
        seconds = time.perf_counter() - start
    warned = any("slower with torch's" in str(w.message) for w in caught)
    training_ratio = None if _threads._last is None or _threads._last[1] is None else round(_threads._last[1], 1)
    print(json.dumps({"threads": torch.get_num_threads(), "seconds": seconds, "warned": warned,
                      "training_ratio": training_ratio}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-cells", type=int, default=2000)
    parser.add_argument("--n-genes", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    print("condition  threads  train s  warned  training's check (default threads / one thread)")
    for condition in ("idle", "busy"):
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if condition == "busy" else None
        try:
            for threads in (1, 0):
                command = [sys.executable, __file__, "--child", "--threads", str(threads), "--n-cells",
                           str(args.n_cells), "--n-genes", str(args.n_genes), "--epochs", str(args.epochs)]
                lines = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
                result = json.loads(lines.strip().splitlines()[-1])
                print(f"{condition:9s}  {result['threads']:7d}  {result['seconds']:7.2f}  {str(result['warned']):6s}  "
                      f"{result['training_ratio']}")
        finally:
            if spinner is not None:
                spinner.kill()
                spinner.wait()


if __name__ == "__main__":
    main()
