"""mrvi_pyro's side of the benchmarks: the data and set-up steps every script shares.

Imports of torch, anndata and mrvi_pyro happen inside the functions, so a script's driver
process (which only starts children) stays light.
"""

from __future__ import annotations

import time


def simulate_h5ad(path, *, n_cells: int, n_genes: int, n_samples: int, n_batches: int, sparse: bool = True):
    """Simulate a cohort (``datasets.simulate``, seed 0), write it to ``path`` and return it."""
    from mrvi_pyro import datasets

    adata = datasets.simulate(n_cells=n_cells, n_genes=n_genes, n_samples=n_samples, n_batches=n_batches,
                              seed=0, sparse=sparse)
    adata.write_h5ad(path)
    return adata


def read_counts(path, *, threads: int, backed: bool = False):
    """Set the torch threads and read the benchmark AnnData (backed from disk if asked)."""
    import anndata
    import torch

    torch.set_num_threads(threads)
    return anndata.read_h5ad(path, backed="r" if backed else None)


def train_model(adata, *, epochs: int, batch_size: int, **train_kwargs):
    """Register ``adata`` (keys "sample", "batch"), build a default ``MRVI`` and train it on
    every cell for ``epochs`` epochs; returns ``(model, training seconds)`` (0 when epochs is 0)."""
    from mrvi_pyro import MRVI

    MRVI.setup_anndata(adata, sample_key="sample", batch_key="batch")
    model = MRVI(adata)
    if epochs <= 0:
        return model, 0.0
    start = time.perf_counter()
    model.train(max_epochs=epochs, batch_size=batch_size, train_size=1.0, progress_bar=False, **train_kwargs)
    return model, time.perf_counter() - start
