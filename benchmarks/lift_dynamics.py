"""How fast the attention lifts train: our single lift (architecture 2) against the reference's
product lift (architecture 3).

Both parametrise the same function (a scalar token lifted to the query, key and value channels)
and start from the same distribution, and a step of each computes the same loss and gradient of
the function (``parity.py``). But Adam moves every parameter by about ``lr`` per step whatever
its gradient's size, so a lift written as a product of a token lift and the attention's input
projection (the reference's form) moves by about ``lr`` times the sum of both factors' entries per
step, several times further than one vector of the same function does. This script trains both
architectures on the same data and seeds for a few epochs and prints how far each block's
effective lifts (``AttentionBlock.lifts()``) moved, relative to where they started.

    python benchmarks/lift_dynamics.py                    # 4,000 cells, seeds 0-2, 3 epochs
    python benchmarks/lift_dynamics.py --epochs 10 --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def lift_changes(model, train) -> dict[str, tuple[float, float, float]]:
    """Relative change (Frobenius norm) of each attention block's q, k and v lift over ``train()``."""
    from mrvi_pyro.nn import AttentionBlock

    blocks = {name: block for name, block in model.module.named_modules() if isinstance(block, AttentionBlock)}
    before = {name: [w.detach().clone() for w, _ in block.lifts()] for name, block in blocks.items()}
    train()
    changes = {}
    for name, block in blocks.items():
        after = [w.detach() for w, _ in block.lifts()]
        changes[name] = tuple(float((a - b).norm() / b.norm()) for a, b in zip(after, before[name]))
    return changes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-cells", type=int, default=4000)
    parser.add_argument("--n-genes", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from mrvi_pyro import MRVI, datasets

    torch.set_num_threads(args.threads)
    adata = datasets.simulate(n_cells=args.n_cells, n_genes=args.n_genes, n_samples=24, n_batches=3, seed=0,
                              preset="weak")
    MRVI.setup_anndata(adata, sample_key="sample", batch_key="batch")
    print(f"weak preset, {args.n_cells} cells x {args.n_genes} genes, batch 128, {args.epochs} epochs: relative "
          "change of the effective lifts (q / k / v) of each attention block")
    summary = {}
    for architecture in (2, 3):
        for seed in args.seeds:
            model = MRVI(adata, architecture=architecture, seed=seed)
            changes = lift_changes(model, lambda m=model, s=seed: m.train(max_epochs=args.epochs, batch_size=128,
                                                                          seed=s, progress_bar=False))
            cells = "; ".join(f"{name}: " + " / ".join(f"{c:.3f}" for c in values) for name, values in changes.items())
            print(f"  architecture {architecture}, seed {seed}: {cells}", flush=True)
            for name, values in changes.items():
                summary.setdefault((architecture, name), []).extend(values)
    print("median over seeds and q/k/v:")
    for name in sorted({name for _, name in summary}):
        two, three = np.median(summary[(2, name)]), np.median(summary[(3, name)])
        print(f"  {name}: architecture 2 {two:.3f}, architecture 3 {three:.3f} ({three / two:.1f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
