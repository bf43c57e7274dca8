"""benchmarks/train_throughput.py: ours trains from a backed file, reading only minibatches; paired
repeats are summarised by their median speed-up."""

import os
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


def _row(batch_size, implementation, cells_per_s):
    return {"batch_size": batch_size, "implementation": implementation, "cells_per_s": cells_per_s,
            "steady_cells_per_s": cells_per_s}


def test_summary_pairs_each_repeat_with_the_reference_run_beside_it():
    ref = train_throughput.REFERENCE_NAME
    rows = [_row(128, "mrvi_pyro", 6000.0), _row(128, ref, 3000.0),   # 2.00x
            _row(128, ref, 2000.0), _row(128, "mrvi_pyro", 3000.0),   # 1.50x (the slow pair)
            _row(128, "mrvi_pyro", 5400.0), _row(128, ref, 3000.0),   # 1.80x
            _row(256, "mrvi_pyro", 8000.0), _row(256, ref, 4000.0)]
    rows[-1]["steady_cells_per_s"] = None  # the reference trained one epoch
    lines = train_throughput.summary_lines(rows, [128, 256], "mrvi_pyro")
    # Pairing by repeat gives 2.00, 1.50, 1.80 (median 1.80); a ratio of the medians would give
    # 5400 / 3000 = 1.80 as well, but the range shows the spread over the sitting.
    assert "speed-up 1.80x (median of 3 paired runs, range 1.50-2.00x: 2.00, 1.50, 1.80)" in lines[0]
    assert "mrvi_pyro 5400 cells/s" in lines[0] and "scvi-tools 3000 cells/s" in lines[0]
    assert "ours over its 3 runs 6000, 3000, 5400" in lines[0]
    assert lines[1].endswith("speed-up 2.00x")  # one run: no range, no steady ratio without one


def test_repeats_alternate_and_are_refused_below_one():
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "train_throughput.py"), "--n-cells", "200", "--n-genes", "80",
         "--n-samples", "4", "--n-batches", "2", "--batch-sizes", "64", "--epochs", "1", "--repeats", "2",
         "--no-reference"], capture_output=True, text=True, check=True).stdout
    assert "train bs=64 #2" in out and "ours over its 2 runs" in out
    bad = subprocess.run(
        [sys.executable, str(BENCHMARKS / "train_throughput.py"), "--repeats", "0", "--no-reference"],
        capture_output=True, text=True)
    assert bad.returncode == 2 and "--repeats must be at least 1, got 0" in bad.stderr


def test_the_scratch_folder_goes_when_the_script_exits(tmp_path):
    # The simulated .h5ad lives in a folder the script made; it is removed at exit, and nothing
    # else in the temporary folder is touched.
    keep = tmp_path / "someone_elses.txt"
    keep.write_text("mine")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import _harness, pathlib; "
            "p = pathlib.Path(_harness.scratch_dir('mrvi_bench_')); (p / 'train.h5ad').write_bytes(b'x'); print(p)")
    out = subprocess.run([sys.executable, "-c", code, str(BENCHMARKS)], capture_output=True, text=True,
                         check=True, env={**os.environ, "TMPDIR": str(tmp_path)}).stdout.strip()
    made = Path(out)
    assert made.parent == tmp_path and made.name.startswith("mrvi_bench_")
    assert not made.exists() and keep.read_text() == "mine"
