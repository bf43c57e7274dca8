"""benchmarks/loop_trace.py, our side: what our training loop feeds each optimiser step."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import loop_trace  # noqa: E402
from mrvi_pyro import datasets  # noqa: E402


def test_our_loop_feeds_the_reference_schedule_and_minibatches():
    adata = datasets.simulate(n_cells=400, n_genes=80, n_samples=6, n_batches=2, seed=0)
    log = loop_trace.trace_ours(adata, seed=0, epochs=2, batch_size=64)
    steps = [r for r in log if "cells" in r]
    # 90% of 400 cells for training: 5 full minibatches of 64 and one of 40 per epoch
    assert [r["cells"] for r in steps] == [64, 64, 64, 64, 64, 40] * 2
    assert [r["kl_weight"] for r in steps] == [0.0] * 6 + [0.05] * 6  # a 20-epoch warm-up, by epoch
    optimisers = [r["optimiser"] for r in log if "optimiser" in r]
    assert len(optimisers) == 12 and all(
        o["lr"] == 2e-3 and o["betas"] == (0.9, 0.999) and o["eps"] == 1e-8 and o["weight_decay"] == 1e-8
        for o in optimisers)
    assert len([r for r in log if "grad_norm" in r]) == 12
    rows = loop_trace.summarise("ours", log, epochs=2)
    assert len(rows) == 2 and rows[0].startswith("| ours | 0 | 6 | 64/40 | 0 |")
    # the patches are undone afterwards
    import torch

    from mrvi_pyro import train as train_module
    assert torch.nn.utils.clip_grad_norm_.__module__.startswith("torch")
    assert train_module.make_adam.__module__ == "mrvi_pyro.train"
