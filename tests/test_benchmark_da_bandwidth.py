"""benchmarks/da_bandwidth.py: the exact and the kernel DA estimators on one trained model."""

import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import da_bandwidth  # noqa: E402


def test_planted_log_ratio_is_the_log_of_the_mean_shares():
    obs = pd.DataFrame({"sample": ["a", "a", "b", "b", "b", "b", "c", "c"],
                        "cell_type": ["t", "o", "t", "t", "t", "o", "o", "o"],
                        "disease": ["d", "d", "d", "d", "d", "d", "h", "h"]})
    obs.loc[6, "cell_type"] = "t"
    # disease samples a (1/2) and b (3/4): mean share 0.625; healthy c: 1/2
    assert da_bandwidth.planted_log_ratio(obs, "t", "disease", "d") == pytest.approx(np.log(0.625 / 0.5))
    assert da_bandwidth.planted_log_ratio(obs, "t", "disease", "h") == pytest.approx(np.log(0.5 / 0.625))


def test_the_kernel_recovers_the_planted_type_and_its_abundance_better_than_the_exact_mixture():
    args = Namespace(n_cells=1200, n_genes=300, n_samples=12, n_batches=3, epochs=5, batch_size=128, threads=1,
                     bandwidths=[0.0, "scott"])
    exact, kernel = da_bandwidth.run_cohort("programs", "strong", 0, args)
    assert exact["bandwidth"] == 0.0 and kernel["bandwidth"] == "scott"
    assert kernel["da_auroc"] > 0.95 and kernel["da_auroc"] > exact["da_auroc"]
    assert abs(kernel["type_log_ratio"] - kernel["planted"]) < 0.5 * abs(exact["type_log_ratio"] - exact["planted"])
    assert kernel["sd"] < exact["sd"] / 3
    assert abs(kernel["null_type_log_ratio"] - kernel["null_planted"]) < 0.1
