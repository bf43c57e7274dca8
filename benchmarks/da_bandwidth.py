"""Differential abundance under several kernel bandwidths, on the same trained model (ours only).

For each simulator, preset and seed: simulate the cohort as ``accuracy.py`` does, train our
default model as its child does (``MRVI(seed=s)``, ``train(seed=s)``, 90/10 split, no early
stopping), then call ``differential_abundance(sample_cov_keys=[...], bandwidth=b)`` for every
``--bandwidths`` value (``0`` is the reference's exact aggregated posteriors, ``scott`` our
default, a number a width in units of u) and score the disease log-ratio:

- ``da_auroc``: AUROC for "cell is of the planted DA type" (as ``accuracy.py``'s ``da_auroc``);
- ``type_log_ratio``: its mean over the DA type's cells, beside ``planted``, the log of the
  type's mean share in disease samples over that in healthy samples (what an abundance
  log-ratio of the type estimates);
- ``sd``: the log-ratio's standard deviation over all cells;
- with the ``programs`` simulator, the same for its balanced null sample covariate
  (``null_group``): ``null_auroc``, ``null_type_log_ratio`` beside ``null_planted`` (the chance
  difference in the type's share between the two null groups).

    python benchmarks/da_bandwidth.py --simulators programs --presets strong --seeds 0 1 --n-cells 8000
    python benchmarks/da_bandwidth.py --n-cells 1500 --n-genes 300 --epochs 10 --seeds 0   # quick
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _harness  # noqa: E402
import accuracy  # noqa: E402


def planted_log_ratio(obs, da_type: str, covariate: str, level: str) -> float:
    """log(mean share of ``da_type`` in the samples with ``covariate == level`` / in the others)."""
    per_sample = obs.assign(is_type=(obs["cell_type"] == da_type).to_numpy()).groupby("sample", observed=True).agg(
        share=("is_type", "mean"), value=(covariate, "first"))
    inside = per_sample["value"].astype(str) == level
    return float(np.log(per_sample.loc[inside, "share"].mean() / per_sample.loc[~inside, "share"].mean()))


def score(result, adata, covariate: str, level: str) -> dict:
    """DA log-ratio of ``level`` against the other level of ``covariate`` in a
    ``differential_abundance`` result, scored for the DA type."""
    from mrvi_pyro._metrics import auroc

    log_probs = result[f"{covariate}_log_probs"]
    other = [v for v in log_probs[covariate].values if v != level][0]
    ratio = (log_probs.sel({covariate: level}) - log_probs.sel({covariate: other})).values
    in_type = (adata.obs["cell_type"] == adata.uns["simulation"]["da_cell_type"]).to_numpy()
    return {"auroc": auroc(in_type, ratio), "type_log_ratio": float(np.nanmean(ratio[in_type])),
            "sd": float(np.nanstd(ratio))}


def run_cohort(simulator: str, preset: str, seed: int, args) -> list[dict]:
    import torch

    from mrvi_pyro import MRVI

    torch.set_num_threads(args.threads)
    adata = accuracy.simulate(simulator, preset, seed, args)
    MRVI.setup_anndata(adata, sample_key="sample", batch_key="batch")
    model = MRVI(adata, seed=seed)
    start = time.perf_counter()
    model.train(max_epochs=args.epochs, batch_size=args.batch_size, seed=seed, train_size=0.9,
                early_stopping=False, progress_bar=False)
    train_s = time.perf_counter() - start
    truth = adata.uns["simulation"]
    da_type = truth["da_cell_type"]
    keys = ["disease"] + (["null_group"] if "null_group" in adata.obs else [])
    rows = []
    for bandwidth in args.bandwidths:
        result = model.differential_abundance(sample_cov_keys=keys, bandwidth=bandwidth)
        row = {"simulator": simulator, "preset": preset, "seed": seed, "bandwidth": bandwidth, "train_s": train_s,
               "planted": planted_log_ratio(adata.obs, da_type, "disease", "disease")}
        disease = score(result, adata, "disease", "disease")
        row.update(da_auroc=disease["auroc"], type_log_ratio=disease["type_log_ratio"], sd=disease["sd"])
        if "null_group" in keys:
            level = sorted(adata.obs["null_group"].astype(str).unique())[-1]
            null = score(result, adata, "null_group", level)
            row.update(null_auroc=null["auroc"], null_type_log_ratio=null["type_log_ratio"], null_sd=null["sd"],
                       null_planted=planted_log_ratio(adata.obs, da_type, "null_group", level))
        rows.append(row)
        print("  " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
              flush=True)
    return rows


def parse_bandwidth(text: str):
    return text if text == "scott" else float(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _harness.add_cohort_arguments(parser, n_cells=8_000)
    parser.add_argument("--simulators", nargs="+", default=["programs", "datasets"], choices=["datasets", "programs"])
    parser.add_argument("--presets", nargs="+", default=["strong", "weak"], choices=["strong", "weak"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bandwidths", type=parse_bandwidth, nargs="+", default=[0.0, "scott"],
                        help="0 (exact aggregated posteriors), 'scott', or widths in units of u")
    args = parser.parse_args()
    rows = []
    for simulator in args.simulators:
        for preset in args.presets:
            for seed in args.seeds:
                print(f"{simulator} {preset} seed {seed}", flush=True)
                rows.extend(run_cohort(simulator, preset, seed, args))
    import pandas as pd

    table = pd.DataFrame(rows).drop(columns=["train_s"])
    print("\nDA log-ratio of the disease by kernel bandwidth (ours)")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print("\nmedians over cohorts")
    print(table.groupby("bandwidth", sort=False)[[c for c in table.columns if c not in (
        "simulator", "preset", "seed", "bandwidth")]].median().to_string(float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
