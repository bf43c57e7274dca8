"""Where the extra time of the first ``train()`` call in a process goes.

Each run is a fresh Python process: it imports mrvi_pyro, simulates a small cohort (untimed),
then trains three models one after the other with identical calls and reports each call's
wall time. With ``--preimport`` the process first imports ``torch._dynamo`` (timed on its
own) before the first ``train()``. The difference between the first call and the later ones
is the one-time cost; comparing the two modes shows how much of it is that import.

Why that import: every ``torch.optim`` optimiser wraps its methods in ``torch._disable_dynamo``,
which imports ``torch._dynamo`` (with sympy and parts of ``torch.distributed``) the first time an
optimiser is constructed in the process. ``train()`` uses ``torch.optim.Adam``, so its first
call pays for that import; so does any other torch training loop in the same process.

    python benchmarks/first_call.py                 # 3 repeats of each mode, 1 thread
    python benchmarks/first_call.py --threads 2 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _harness  # noqa: E402

CHILD = r"""
import json, sys, time, warnings
warnings.filterwarnings("ignore")
start = time.perf_counter()
import torch
torch.set_num_threads({threads})
sys.path.insert(0, {repository!r})
from mrvi_pyro import MRVI, datasets
import_seconds = time.perf_counter() - start
adata = datasets.simulate(n_cells={n_cells}, n_genes={n_genes}, n_samples=8, n_batches=2, seed=0)
MRVI.setup_anndata(adata, sample_key="sample", batch_key="batch")
dynamo_seconds = None
if {preimport}:
    start = time.perf_counter()
    import torch._dynamo
    dynamo_seconds = time.perf_counter() - start
calls = []
for _ in range(3):
    model = MRVI(adata, seed=0)
    start = time.perf_counter()
    model.train(max_epochs={epochs}, batch_size=128, progress_bar=False)
    calls.append(time.perf_counter() - start)
print("RESULT " + json.dumps({{"import_s": import_seconds, "dynamo_import_s": dynamo_seconds, "train_s": calls}}))
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per mode (default 3)")
    parser.add_argument("--n-cells", type=int, default=2000)
    parser.add_argument("--n-genes", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args(argv)
    rows = []
    for repeat in range(args.repeats):
        for preimport in (False, True):  # interleaved: load drift hits both modes alike
            code = CHILD.format(threads=args.threads, repository=str(HERE.parent), n_cells=args.n_cells,
                                n_genes=args.n_genes, epochs=args.epochs, preimport=preimport)
            result = _harness.run_snippet(sys.executable, code, check=True)["result"]
            rows.append({"preimport": preimport, **result})
            first, *later = result["train_s"]
            print(f"repeat {repeat}: {'torch._dynamo imported first' if preimport else 'plain':29s} "
                  f"first train() {first:.2f} s, later {', '.join(f'{s:.2f}' for s in later)} s"
                  + (f"; import torch._dynamo {result['dynamo_import_s']:.2f} s" if preimport else ""))
    print()
    print(f"{args.n_cells} cells x {args.n_genes} genes, {args.epochs} epochs per call, {args.threads} thread(s); "
          f"medians over {args.repeats} processes")
    for preimport in (False, True):
        mine = [r for r in rows if r["preimport"] == preimport]
        first = statistics.median(r["train_s"][0] for r in mine)
        later = statistics.median(s for r in mine for s in r["train_s"][1:])
        label = "torch._dynamo imported first" if preimport else "plain"
        extra = (f"; import torch._dynamo itself {statistics.median(r['dynamo_import_s'] for r in mine):.2f} s"
                 if preimport else "")
        print(f"  {label:29s} first train() {first:.2f} s, later calls {later:.2f} s, "
              f"one-time cost {first - later:+.2f} s{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
