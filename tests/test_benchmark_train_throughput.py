"""benchmarks/train_throughput.py: ours trains from a backed file, reading only minibatches."""

import subprocess
import sys
from pathlib import Path

import anndata
import numpy as np

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import _ours  # noqa: E402
import train_throughput  # noqa: E402


def test_backed_training_reads_the_file_backed_and_gives_the_in_memory_model(tmp_path):
    path = tmp_path / "counts.h5ad"
    _ours.simulate_h5ad(path, n_cells=300, n_genes=80, n_samples=4, n_batches=2, sparse=True)
    cells, seconds, per_epoch = train_throughput._train_once(str(path), 1, 1, 64, "cpu", backed=True)
    assert cells == 300 and seconds > 0 and len(per_epoch) == 1

    # The backed read is what trains: the same model as from the counts in memory.
    backed = _ours.read_counts(path, threads=1, backed=True)
    assert backed.isbacked
    in_memory = anndata.read_h5ad(path)
    models = [_ours.train_model(a, epochs=1, batch_size=64)[0] for a in (backed, in_memory)]
    for (name, a), (_, b) in zip(models[0].module.state_dict().items(), models[1].module.state_dict().items()):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)


def test_one_epoch_without_the_reference_prints_the_backed_row():
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "train_throughput.py"), "--n-cells", "240", "--n-genes", "80",
         "--n-samples", "4", "--n-batches", "2", "--batch-sizes", "64", "--epochs", "1", "--backed",
         "--no-reference"], capture_output=True, text=True, check=True).stdout
    assert "CSR, ours reads it backed" in out
    assert "bs=64: mrvi_pyro (backed)" in out
