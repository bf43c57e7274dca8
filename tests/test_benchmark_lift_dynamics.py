"""benchmarks/lift_dynamics.py: the reference's product lift trains faster under Adam than our single lift."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import lift_dynamics  # noqa: E402
from mrvi_pyro import MRVI, datasets  # noqa: E402


def test_product_lifts_move_further_than_single_lifts():
    adata = datasets.simulate(n_cells=600, n_genes=80, n_samples=6, n_batches=2, seed=0)
    MRVI.setup_anndata(adata, sample_key="sample", batch_key="batch")
    moved = {}
    for architecture in (2, 3):
        model = MRVI(adata, architecture=architecture, seed=0)
        changes = lift_dynamics.lift_changes(
            model, lambda m=model: m.train(max_epochs=2, batch_size=64, seed=0, progress_bar=False))
        assert set(changes) == {"sample_mapper.attention", "decoder.nuisance"}
        assert all(c > 0 for values in changes.values() for c in values)
        moved[architecture] = np.median([c for values in changes.values() for c in values])
    assert moved[3] > 2 * moved[2]
