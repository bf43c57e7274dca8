"""What each side's training loop feeds its optimiser step, epoch by epoch, through the public APIs.

``parity.py`` shows that one step is the same on both sides (same weights, same minibatch). This
script covers the rest of a training run: each side trains through its own ``train()`` on the
same simulated cohort (``datasets.simulate``, weak preset), and every step is recorded: the
number of cells and their count total, how many samples the minibatch holds, the KL weight,
the optimiser's settings (learning rate, betas, eps, weight decay, number of parameter tensors)
and the gradient norm before clipping. It prints one row per epoch and side, so a difference in
the data split, the minibatches, the warm-up schedule, the optimiser or the clipping shows up
as a difference between the rows (the count totals differ slightly: each side draws its own
90/10 split).

Run it with the reference's Python (scvi-tools installed there; mrvi_pyro from this checkout)::

    /work/refenv/bin/python benchmarks/loop_trace.py --seed 4 --epochs 3

Found with it (stop 26, seed 4, 12,000 cells, batch 128): both sides take 85 steps per epoch
(84 of 128 cells and one of 48), the KL weight is 0, 0.05, 0.1 in epochs 0-2, Adam has lr 2e-3,
betas (0.9, 0.999), eps 1e-8, weight decay 1e-8, and the median gradient norm before clipping
is 54.3 / 30.9 / 32.4 for the reference and 52.6 / 33.2 / 33.0 for ours.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]


@contextlib.contextmanager
def patched(owner, name, make):
    """Replace ``owner.name`` by ``make(original)`` for the block."""
    original = getattr(owner, name)
    setattr(owner, name, make(original))
    try:
        yield
    finally:
        setattr(owner, name, original)


def optimiser_record(group_list) -> dict:
    group = group_list[0]
    return {"lr": group["lr"], "betas": tuple(group["betas"]), "eps": group["eps"],
            "weight_decay": group["weight_decay"], "tensors": sum(len(g["params"]) for g in group_list)}


def recording_clip(log):
    def make(original):
        def clip(parameters, max_norm, *args, **kwargs):
            norm = original(parameters, max_norm, *args, **kwargs)
            log.append({"grad_norm": float(norm)})
            return norm
        return clip
    return make


def trace_reference(adata, seed: int, epochs: int, batch_size: int) -> list[dict]:
    import logging

    import scvi
    import torch
    from scvi.external import MRVI
    from scvi.external.mrvi_torch import _module

    logging.getLogger("scvi").setLevel(logging.WARNING)
    for name in ("lightning", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    log: list[dict] = []

    def make_loss(original):
        def loss(self, tensors, inference_outputs, generative_outputs, kl_weight=1.0):
            if self.training:
                x = tensors["X"]
                log.append({"cells": int(x.shape[0]), "counts": float(x.sum()), "kl_weight": float(kl_weight),
                            "samples": int(torch.unique(tensors["sample"]).numel())})
            return original(self, tensors, inference_outputs, generative_outputs, kl_weight)
        return loss

    def make_step(original):
        def step(self, *args, **kwargs):
            log.append({"optimiser": optimiser_record(self.param_groups)})
            return original(self, *args, **kwargs)
        return step

    scvi.settings.seed = seed
    adata = adata.copy()
    MRVI.setup_anndata(adata, sample_key="sample", batch_key="batch", backend="torch")
    model = MRVI(adata)
    with (patched(_module.TorchMRVAE, "loss", make_loss), patched(torch.optim.Adam, "step", make_step),
          patched(torch.nn.utils, "clip_grad_norm_", recording_clip(log))):
        model.train(max_epochs=epochs, batch_size=batch_size, train_size=0.9, early_stopping=False,
                    accelerator="cpu", devices=1, enable_progress_bar=False)
    return log


def trace_ours(adata, seed: int, epochs: int, batch_size: int) -> list[dict]:
    import torch

    from _harness import before_each_step
    from mrvi_pyro import MRVI
    from mrvi_pyro import train as train_module

    log: list[dict] = []
    adata = adata.copy()
    MRVI.setup_anndata(adata, sample_key="sample", batch_key="batch")
    model = MRVI(adata, seed=seed)
    module_cls = type(model.module)

    def make_model(original):
        def program(self, x, sample_index, batch_index, label_index=None, **kwargs):
            if self.training:
                log.append({"cells": int(x.shape[0]), "counts": float(x.sum()),
                            "kl_weight": float(kwargs.get("kl_weight", 1.0)),
                            "samples": int(torch.unique(sample_index).numel())})
            return original(self, x, sample_index, batch_index, label_index, **kwargs)
        return program

    def record_optimiser(_, optimizer):
        log.append({"optimiser": optimiser_record(optimizer.param_groups)})

    with (patched(module_cls, "model", make_model),
          patched(train_module, "make_adam", lambda original: before_each_step(original, record_optimiser)),
          patched(torch.nn.utils, "clip_grad_norm_", recording_clip(log))):
        model.train(max_epochs=epochs, batch_size=batch_size, train_size=0.9, early_stopping=False, seed=seed,
                    progress_bar=False)
    return log


def summarise(side: str, log: list[dict], epochs: int, clip: float = 40.0) -> list[str]:
    steps = [r for r in log if "cells" in r]
    norms = np.array([r["grad_norm"] for r in log if "grad_norm" in r])
    optimisers = [r["optimiser"] for r in log if "optimiser" in r]
    if not (len(steps) == len(norms) == len(optimisers)) or len(steps) % epochs:
        raise RuntimeError(f"{side}: {len(steps)} steps, {len(norms)} clips, {len(optimisers)} optimiser steps")
    per = len(steps) // epochs
    rows = []
    for epoch in range(epochs):
        part = slice(epoch * per, (epoch + 1) * per)
        s, g = steps[part], norms[part]
        settings = sorted({tuple(sorted(o.items())) for o in optimisers[part]})
        sizes = "/".join(str(c) for c in sorted({r["cells"] for r in s}, reverse=True))
        rows.append(
            f"| {side} | {epoch} | {len(s)} | {sizes} "
            f"| {'/'.join(f'{k:g}' for k in sorted({r['kl_weight'] for r in s}))} "
            f"| {np.mean([r['counts'] for r in s]):,.0f} | {np.mean([r['samples'] for r in s]):.1f} "
            f"| {'; '.join(', '.join(f'{k} {v}' for k, v in o) for o in settings)} "
            f"| {np.median(g):.1f} | {np.mean(g > clip):.2f} |"
        )
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--n-cells", type=int, default=12_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sides", nargs="+", default=["reference", "ours"], choices=["reference", "ours"])
    args = parser.parse_args(argv)

    import torch

    from mrvi_pyro import datasets

    torch.set_num_threads(args.threads)
    adata = datasets.simulate(n_cells=args.n_cells, n_genes=1000, n_samples=24, n_batches=3, seed=args.seed,
                              preset="weak", sparse=True)
    tracers = {"reference": trace_reference, "ours": trace_ours}
    print("| side | epoch | steps | cells per step | KL weight | counts per step (mean) | samples per step "
          "| optimiser | gradient norm (median) | share clipped |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for side in args.sides:
        log = tracers[side](adata, args.seed, args.epochs, args.batch_size)
        print("\n".join(summarise(side, log, args.epochs)), flush=True)


if __name__ == "__main__":
    main()
