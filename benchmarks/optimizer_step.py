"""The optimiser machinery of one training step alone, per variant, in microseconds.

Builds the default module (1,000 genes, 24 samples, 3 batches) and times ``--steps`` steps of:
zero the gradients, backward of a cheap loss that touches every parameter (so each gets a fresh
gradient, as in training), gradient-norm clipping, Adam update -- for

- ``flat``: ``mrvi_pyro.train.FlatParameters`` and one fused Adam on the flat buffer (on commits that
  have it, up to 44951d9);
- ``fused``: ``torch.optim.Adam(fused=True)`` and ``clip_grad_norm_(foreach=True)``;
- ``foreach``: ``torch.optim.Adam(foreach=True)`` and ``clip_grad_norm_(foreach=True)``.

The variants run interleaved, ``--repeats`` times, in one process; the median time per step is
printed next to the time of a whole training step (``benchmarks/optimizer_and_malloc.py``).

    python benchmarks/optimizer_step.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch

    from mrvi_pyro import MrVIModule
    from mrvi_pyro import train as train_module

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    module = MrVIModule(1000, 24, 3)
    params = [p for p in module.parameters() if p.requires_grad]
    weights = [torch.randn_like(p) for p in params]
    variants = ["fused", "foreach"] + (["flat"] if hasattr(train_module, "FlatParameters") else [])

    def run(variant: str) -> float:
        flat = train_module.FlatParameters(params) if variant == "flat" else None
        if flat is not None:
            optimizer = torch.optim.Adam([flat.flat], lr=1e-9, fused=True)
        else:
            optimizer = torch.optim.Adam(params, lr=1e-9, **{variant: True})
        try:
            for step in range(20 + args.steps):
                if step == 20:
                    start = time.process_time()
                if flat is not None:
                    flat.zero_grad()
                else:
                    optimizer.zero_grad(set_to_none=True)
                sum((p * w).sum() for p, w in zip(params, weights)).backward()
                if flat is not None:
                    flat.check_grads()
                    flat.clip_grad_norm_(40.0)
                else:
                    torch.nn.utils.clip_grad_norm_(params, 40.0, foreach=True)
                optimizer.step()
            return (time.process_time() - start) / args.steps * 1e6
        finally:
            if flat is not None:
                flat.release()

    times = {v: [] for v in variants}
    for _ in range(args.repeats):
        for variant in variants:
            times[variant].append(run(variant))
    print(f"{sum(p.numel() for p in params):,} parameters in {len(params)} tensors; {args.threads} thread(s); "
          f"CPU microseconds per step (median of {args.repeats} x {args.steps} steps):")
    for variant, values in times.items():
        print(f"  {variant:8s} {statistics.median(values):8.0f}   (runs: {', '.join(f'{v:.0f}' for v in values)})")


if __name__ == "__main__":
    main()
