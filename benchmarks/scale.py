"""Million-cell cohorts from disk: cost of every step, and its projection to larger cohorts.

Simulates a cohort straight to an .h5ad (:func:`mrvi_pyro.datasets.write_simulated_h5ad`: the
counts are drawn and written in blocks, never held in memory), then runs each step in a fresh
process that opens the file backed (``anndata.read_h5ad(path, backed="r")``: a minibatch is all
that is read of the counts at a time; the sample, nuisance and cell-type codes are the only
per-cell arrays held):

1. ``simulate``: write the .h5ad;
2. ``train``: ``--epochs`` epochs at ``--batch-size`` (no validation set), then save the model;
3. ``distances``: ``get_local_sample_distances(groupby="cell_type", keep_cell=False)``;
4. ``da``: ``differential_abundance(sample_cov_keys=["disease"], max_components_per_sample=--da-cap)``;
5. ``de``: ``differential_expression(sample_cov_keys=["disease"])`` (no LFCs).

Every step reports its time (around the call, in the child), the one-off pass that validates
the counts when a process first reads them (``read``), and the peak RSS of its process (from
outside, ``_harness``). The projection to larger cohorts is linear in the work each step does,
as stated in its table: cells for simulation and training; cells x samples for DE and DA (at a
fixed component cap); cells x samples to cells x samples^2 for distances (the counterfactuals
grow with S, the distance matrices with S^2: both bounds are printed). Peak memory is projected
as a fixed part, plus per-cell bytes (the slope to a run at fewer cells with ``--smaller``),
plus the output (see :func:`project`); ``--from-json`` projects an earlier run again.
``--ranks`` divides the time (each rank takes an equal share of the cells: see
:mod:`mrvi_pyro.distributed`; the simulation runs in one process).

    python benchmarks/scale.py                                  # 1,000,000 cells x 2,000 genes x 300 samples
    python benchmarks/scale.py --n-cells 100000                 # what a 2-core machine runs in ~30 min
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _harness  # noqa: E402

STEPS = ("simulate", "train", "distances", "da", "de")
WORK = {"simulate": "N", "train": "N", "distances": "N*S..N*S^2", "da": "N*S", "de": "N*S"}
"""What each step's time grows with (N cells, S samples)."""


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def child(args: argparse.Namespace) -> None:
    """Run one step and emit a RESULT line."""
    import torch

    torch.set_num_threads(args.threads)
    import anndata

    from mrvi_pyro import MRVI, datasets

    baseline_kib = _rss_kib()  # a process with everything imported and no data
    result = {"step": args.step, "baseline_rss_gb": baseline_kib * 1024 / 1e9, "read_seconds": 0.0}
    if args.step == "simulate":
        start = time.perf_counter()
        datasets.write_simulated_h5ad(args.data, args.n_cells, args.n_genes, n_samples=args.n_samples,
                                      n_batches=args.n_batches, seed=0)
        result["seconds"] = time.perf_counter() - start
        result["file_gb"] = os.path.getsize(args.data) / 1e9
        _harness.emit_result(result)
        return
    adata = anndata.read_h5ad(args.data, backed="r")
    start, cpu = time.perf_counter(), time.process_time()
    if args.step == "train":
        MRVI.setup_anndata(adata, sample_key="sample", batch_key="batch")
        model = MRVI(adata)
        model._cell_data(purpose="training")
    else:
        model = MRVI.load(args.model, adata=adata)
    result["read_seconds"] = time.perf_counter() - start
    start, cpu = time.perf_counter(), time.process_time()
    if args.step == "train":
        model.train(max_epochs=args.epochs, batch_size=args.batch_size, train_size=1.0, progress_bar=False)
        result["seconds"] = time.perf_counter() - start
        result["cells_per_s"] = adata.n_obs * args.epochs / float(model.history["seconds"].sum())
        model.save(args.model)
    elif args.step == "distances":
        out = model.get_local_sample_distances(groupby="cell_type", keep_cell=False, batch_size=args.analysis_batch)
        result["seconds"] = time.perf_counter() - start
        result["output_gb"] = float(out.nbytes) / 1e9
    elif args.step == "da":
        out = model.differential_abundance(sample_cov_keys=["disease"], max_components_per_sample=args.da_cap)
        result["seconds"] = time.perf_counter() - start
        result["output_gb"] = float(out.nbytes) / 1e9
    elif args.step == "de":
        out = model.differential_expression(sample_cov_keys=["disease"], batch_size=args.analysis_batch)
        result["seconds"] = time.perf_counter() - start
        result["output_gb"] = float(out.nbytes) / 1e9
    result["cpu_seconds"] = time.process_time() - cpu  # of the step (the machine's other load aside)
    _harness.emit_result(result)


def project(row: dict, n_cells: int, n_samples: int, to_cells: int, to_samples: int, ranks: int,
            analysis_batch: int, smaller: dict | None = None) -> dict:
    """Time on ``ranks`` ranks and peak memory per rank at ``to_cells`` x ``to_samples``.

    Time: the step (and its read of the counts) grows linearly in its work (:data:`WORK`) and
    is divided by the ranks. Memory does not shrink with the ranks: every rank holds the
    per-cell annotations of all cells, and rank 0 assembles the whole output (N x S log
    densities for DA, N x covariates x L coefficients for DE, groups x S^2 means for distances).
    It is a fixed part + per-cell bytes x cells + the output (+ for distances the working set of
    one chunk, :func:`mrvi_pyro.explore.chunk_bytes`, which grows with S^2). The per-cell bytes
    are the slope between this run and ``smaller`` (the same step at fewer cells) when given,
    else all memory above a bare process but the output (an upper bound).
    """
    from mrvi_pyro.explore import chunk_bytes

    cells, samples = to_cells / n_cells, to_samples / n_samples
    work = {"N": cells, "N*S": cells * samples, "N*S..N*S^2": (cells * samples, cells * samples**2)}[WORK[row["step"]]]
    low, high = work if isinstance(work, tuple) else (work, work)
    output_scale = {"distances": samples**2, "da": cells * samples, "de": cells}.get(row["step"], 0.0)
    output = row.get("output_gb", 0.0)
    if smaller is not None:
        per_cell = max((row["peak_rss_gb"] - output) - (smaller["peak_rss_gb"] - smaller.get("output_gb", 0.0)),
                       0.0) / (n_cells - smaller["n_cells"])
        fixed = row["peak_rss_gb"] - output - per_cell * n_cells
    else:
        per_cell = max(row["peak_rss_gb"] - row["baseline_rss_gb"] - output, 0.0) / n_cells
        fixed = row["baseline_rss_gb"]
    memory = fixed + per_cell * to_cells + output * output_scale
    if row["step"] == "distances":
        memory += chunk_bytes(analysis_batch, to_samples, 30) / 1e9
    seconds = row["seconds"] + row["read_seconds"]
    ranks = 1 if row["step"] == "simulate" else ranks
    return {"hours_low": seconds * low / ranks / 3600, "hours_high": seconds * high / ranks / 3600,
            "memory_gb": memory, "per_cell_kb": per_cell * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _harness.add_cohort_arguments(parser, n_cells=1_000_000, n_genes=2_000, n_samples=300)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128, help="training minibatch")
    parser.add_argument("--analysis-batch", type=int, default=128, help="cells per analysis chunk")
    parser.add_argument("--da-cap", type=int, default=200, help="max_components_per_sample of the DA step")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per step (the 2 cores)")
    parser.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    parser.add_argument("--project", nargs="+", default=["1000000x300", "1000000x1000", "5000000x1000"],
                        help="cohorts CELLSxSAMPLES to project to")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 8], help="ranks of the projections")
    parser.add_argument("--workdir", default=None, help="keep the data and model here (default: a temp dir)")
    parser.add_argument("--from-json", default=None, help="project the steps of an earlier --out instead of running")
    parser.add_argument("--smaller", default=None,
                        help="--out of a run at fewer cells: the per-cell memory is the slope between the two")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    smaller = {}
    if args.smaller:
        earlier = json.loads(Path(args.smaller).read_text())
        smaller = {r["step"]: {**r, "n_cells": earlier["arguments"]["n_cells"]} for r in earlier["steps"]}
    if args.from_json:
        earlier = json.loads(Path(args.from_json).read_text())
        for name in ("n_cells", "n_genes", "n_samples", "n_batches", "threads", "analysis_batch"):
            setattr(args, name, earlier["arguments"][name])
        args.steps, args.workdir = [], earlier["arguments"]["workdir"]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="mrvi_scale_"))
    workdir.mkdir(parents=True, exist_ok=True)
    data, model = workdir / "cohort.h5ad", workdir / "model"
    print(f"{args.n_cells:,} cells x {args.n_genes:,} genes x {args.n_samples} samples ({args.n_batches} batches); "
          f"{args.threads} torch thread(s); work in {workdir}", flush=True)
    rows = [] if not args.from_json else json.loads(Path(args.from_json).read_text())["steps"]
    for step in args.steps:
        if step == "simulate" and data.exists():
            data.unlink()
        if step == "train" and model.exists():
            shutil.rmtree(model)
        out = _harness.run_script(sys.executable, __file__, [
            "--child", "--step", step, "--data", data, "--model", model, "--n-cells", args.n_cells,
            "--n-genes", args.n_genes, "--n-samples", args.n_samples, "--n-batches", args.n_batches,
            "--epochs", args.epochs, "--batch-size", args.batch_size, "--analysis-batch", args.analysis_batch,
            "--da-cap", args.da_cap, "--threads", args.threads], check=True)
        row = {**out["result"], "peak_rss_gb": out["peak_rss_gb"]}
        rows.append(row)
        extra = "".join(f", {k} {row[k]:.3g}" for k in ("cpu_seconds", "cells_per_s", "file_gb", "output_gb")
                        if k in row)
        print(f"  {step}: {row['seconds']:.1f} s (+{row['read_seconds']:.1f} s reading/validating the counts), "
              f"peak RSS {row['peak_rss_gb']:.2f} GB{extra}", flush=True)

    print("\nProjection (time = step + read, linear in each step's work, divided by the ranks; memory per rank = "
          f"fixed + per-cell bytes ({'slope to the smaller run' if smaller else 'upper bound'}) x all cells + the "
          "whole output on rank 0 + for distances one chunk's working set):")
    projections = []
    for target in args.project:
        to_cells, to_samples = (int(v) for v in target.lower().split("x"))
        for ranks in args.ranks:
            for row in rows:
                p = project(row, args.n_cells, args.n_samples, to_cells, to_samples, ranks, args.analysis_batch,
                            smaller.get(row["step"]))
                projections.append({"cells": to_cells, "samples": to_samples, "ranks": ranks, "step": row["step"], **p})
                hours = (f"{p['hours_low']:.2f} h" if p["hours_low"] == p["hours_high"]
                         else f"{p['hours_low']:.2f}-{p['hours_high']:.2f} h")
                print(f"  {to_cells:>9,} x {to_samples:>5}, {ranks} rank(s), {row['step']:<9} "
                      f"({WORK[row['step']]:>10}): {hours:>14}, ~{p['memory_gb']:.1f} GB per rank "
                      f"({p['per_cell_kb']:.2f} kB per cell)")
    if args.out:
        Path(args.out).write_text(json.dumps({"arguments": vars(args), "steps": rows, "projections": projections},
                                             indent=2, default=str))
    if args.workdir is None and not args.from_json:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
