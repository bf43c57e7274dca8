"""One side of the accuracy benchmark: train one model on an .h5ad and save the raw outputs.

Run by ``benchmarks/accuracy.py`` in a fresh process, with the project's Python for
``--side ours`` (mrvi_pyro) or with the scvi-tools Python for ``--side reference``
(``scvi.external.MRVI``, torch backend). Both sides call the same public methods with the
same arguments, so this one script serves both; it imports only numpy, anndata and the side's
package, plus ``_harness`` (stdlib). It computes no metric: it saves arrays to ``--out`` (.npz)
and ``accuracy.py`` scores both sides with the same code (``mrvi_pyro._metrics``).

Saved arrays
------------
``samples`` (S,) sample names, the order of the distance matrices' axes;
``distances_de`` and ``distances_grouping`` (S, S): ``get_local_sample_distances(
groupby="cell_type", keep_cell=False)`` in the DE cell type and in the hidden-grouping cell type;
``genes`` (G,) and ``mean_abs_lfc`` (G,): ``differential_expression(sample_cov_keys=[
de_covariate], store_lfc=True)``, |lfc| averaged over the DE cell type's cells (of the DE cell
subset); ``da_log_ratio`` (N,): ``differential_abundance(sample_cov_keys=[de_covariate])``,
``log p(disease) - log p(healthy)`` per cell; ``u`` (N, L_u): ``get_latent_representation()``;
``null_pvalue`` (n,): ``differential_expression(sample_cov_keys=[null_covariate])`` p-values of the
DE cell subset; ``null_perm_pvalue`` (K, n): the same for ``--null-draws`` K covariates made by
permuting the null covariate's values over samples (a fresh random sample-level covariate per
draw, so the share of p < 0.05 averaged over draws estimates the test's expected false-positive
rate; one draw alone says little, since every cell shares the same design); ``de_cells`` (n,)
the indices of that subset; ``elbo_validation`` (E,) the validation negative ELBO per cell after
every epoch (each side's own random 10% of the cells) and ``elbo_all`` ``get_elbo()`` on all
cells (the same cells on both sides); ``local_z`` (m, S, L) ``get_local_sample_representation()`` of
``local_cells`` (m,) random cells (``--local-cells``), samples in the order ``local_samples``.

With ``--trace-every N`` also ``trace_z`` (K, c, S, L): the same representation of ``trace_cells``
(c,) probe cells (half from the DE cell type, half from the hidden-grouping one) after every N-th
epoch ``trace_epochs`` (K,), samples in the order ``trace_samples``, to see *when* training learns
the sample effects. Tracing does not change the run: ours trains in pieces through a checkpoint
directory (``train(max_epochs=e, checkpoint_dir=...)`` resumes the same run, random states
included), the reference through a Lightning callback whose scoring runs with the random states
forked and restored.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings


def _single_covariate(dataset, key: str):
    """The one ``covariate`` coordinate of a DE result on a single binary or numeric key."""
    names = [str(c) for c in dataset["covariate"].values]
    matching = [c for c in names if c.startswith(key)]
    if len(matching) != 1:
        raise RuntimeError(f"expected one covariate column for {key!r}, got {names}")
    return matching[0]


def our_train_arguments(args) -> dict:
    """Keywords of our side's ``model.train(...)``: the benchmark's settings, then
    ``--train-kwargs`` (which may override any of them, e.g. ``{"seed": N}`` to train with a
    seed other than the initialisation's: ours reseeds torch with the same seed for the initial
    weights and for training, so training's first draws replay the initialisation's)."""
    return {"max_epochs": args.epochs, "batch_size": args.batch_size, "train_size": 0.9, "early_stopping": False,
            "seed": args.seed, "progress_bar": False, **json.loads(args.train_kwargs)}


def add_null_permutations(adata, key: str, n_draws: int, seed: int) -> list[str]:
    """Add ``n_draws`` columns ``{key}_perm{k}``: ``key``'s per-sample values permuted over samples."""
    import numpy as np
    import pandas as pd

    per_sample = adata.obs.groupby("sample", observed=True)[key].first()
    rng = np.random.default_rng(10_000 + seed)
    names = []
    for k in range(n_draws):
        name = f"{key}_perm{k}"
        mapping = dict(zip(per_sample.index, per_sample.to_numpy()[rng.permutation(len(per_sample))]))
        column = adata.obs["sample"].astype(str).map({str(k): v for k, v in mapping.items()})
        if pd.api.types.is_numeric_dtype(per_sample.dtype):
            adata.obs[name] = column.astype(float).to_numpy()
        else:
            adata.obs[name] = pd.Categorical(column.astype(str))
        names.append(name)
    return names


def probe_cells(adata, truth: dict, n_cells: int, seed: int):
    """Sorted indices of up to ``n_cells`` random cells, half of the DE cell type and half of the
    hidden-grouping cell type (the cells whose sample distances carry the two planted effects)."""
    import numpy as np

    rng = np.random.default_rng(seed + 2)
    chosen = []
    for key in ("de_cell_type", "grouping_cell_type"):
        pool = np.flatnonzero((adata.obs["cell_type"] == truth[key]).to_numpy())
        chosen.append(rng.choice(pool, min(n_cells // 2, len(pool)), replace=False))
    return np.sort(np.unique(np.concatenate(chosen)))


def trace_stops(epochs: int, every: int) -> list[int]:
    """The epochs after which a traced run records: every ``every``-th, and the last."""
    return sorted({*range(every, epochs + 1, every), epochs})


def reference_tracer(model, record, every: int):
    """A Lightning callback calling ``record(model, epoch)`` after every ``every``-th training epoch
    (and the last). Scoring must not change the run: torch's, numpy's and Python's random states
    are restored afterwards, and the module's training mode too."""
    import random

    import numpy as np
    import torch
    from lightning.pytorch.callbacks import Callback

    class Tracer(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            epoch = trainer.current_epoch + 1
            if epoch not in trace_stops(trainer.max_epochs, every):
                return
            numpy_state, python_state = np.random.get_state(), random.getstate()
            training, trained = pl_module.module.training, model.is_trained_
            with torch.random.fork_rng():
                try:
                    pl_module.module.eval()
                    model.is_trained_ = True
                    record(model, epoch)
                finally:
                    model.is_trained_ = trained
                    pl_module.module.train(training)
                    np.random.set_state(numpy_state)
                    random.setstate(python_state)

    return Tracer()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", required=True, choices=("ours", "reference"))
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True, help=".npz path for the arrays")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--de-cells", type=int, default=0, help="DE on this many random cells (0: all)")
    parser.add_argument("--mc-samples", type=int, default=50)
    parser.add_argument("--local-cells", type=int, default=2000,
                        help="cells whose counterfactual z under every sample is saved (local_z)")
    parser.add_argument("--null-draws", type=int, default=0,
                        help="DE on this many permutations of the null covariate over samples")
    parser.add_argument("--train-kwargs", default="{}", help="JSON of extra train(...) arguments (ours)")
    parser.add_argument("--zero-masked-grads", action="store_true",
                        help="ours: give parameters without a gradient a zero one before each Adam step (ablation)")
    parser.add_argument("--model-kwargs", default="{}",
                        help="JSON of extra MRVI(...) arguments for ours (ablations), e.g. '{\"architecture\": 2}'")
    parser.add_argument("--trace-every", type=int, default=0,
                        help="save the counterfactual z of --trace-cells probe cells after every this many epochs")
    parser.add_argument("--trace-cells", type=int, default=400)
    args = parser.parse_args(argv)

    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import anndata
    import numpy as np
    import torch

    from _harness import emit_result

    torch.set_num_threads(args.threads)
    adata = anndata.read_h5ad(args.data)
    truth = adata.uns["simulation"]
    seconds = {}
    null_keys = add_null_permutations(adata, truth["null_covariate"], args.null_draws, args.seed)
    trace = {"epochs": [], "z": [], "samples": None}
    trace_cells = probe_cells(adata, truth, args.trace_cells, args.seed) if args.trace_every > 0 else None

    def record(model, epoch: int) -> None:
        rep = model.get_local_sample_representation(indices=trace_cells)
        trace["z"].append(np.asarray(rep.transpose("cell_name", "sample", "latent_dim").values, dtype=np.float32))
        trace["samples"] = np.asarray(rep["sample"].values).astype(str)
        trace["epochs"].append(epoch)

    start = time.perf_counter()
    if args.side == "ours":
        import mrvi_pyro
        from mrvi_pyro import MRVI

        seconds["package"] = mrvi_pyro.__file__
        MRVI.setup_anndata(adata, sample_key="sample", batch_key="batch")
        if args.zero_masked_grads:  # the reference's step while the KL weight is 0 (see parity.py)
            from _harness import before_each_step
            from mrvi_pyro import train as train_module

            train_module.make_adam = before_each_step(train_module.make_adam,
                                                      lambda params, _: train_module.zero_missing_gradients(params))
        model_kwargs = json.loads(args.model_kwargs)  # "architecture" included: a module argument
        model = MRVI(adata, seed=args.seed, **model_kwargs)
        if args.trace_every > 0:
            import tempfile

            with tempfile.TemporaryDirectory() as checkpoints:
                for epoch in trace_stops(args.epochs, args.trace_every):
                    model.train(**{**our_train_arguments(args), "max_epochs": epoch, "checkpoint_dir": checkpoints})
                    record(model, epoch)
        else:
            model.train(**our_train_arguments(args))
    else:
        import logging

        import scvi
        from scvi.external import MRVI

        seconds["package"] = f"scvi-tools {scvi.__version__}"
        logging.getLogger("scvi").setLevel(logging.WARNING)
        for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
            logging.getLogger(name).setLevel(logging.ERROR)
        scvi.settings.seed = args.seed
        MRVI.setup_anndata(adata, sample_key="sample", batch_key="batch", backend="torch")
        model = MRVI(adata)
        callbacks = [reference_tracer(model, record, args.trace_every)] if args.trace_every > 0 else []
        model.train(max_epochs=args.epochs, batch_size=args.batch_size, train_size=0.9,
                    early_stopping=False, accelerator="cpu", devices=1, enable_progress_bar=False,
                    callbacks=callbacks)
    seconds["train"] = time.perf_counter() - start
    # Validation negative ELBO per cell after every epoch (both sides: one posterior draw per
    # cell, the full KL weight), to compare how fast the two fits progress.
    elbo_validation = np.asarray(model.history["elbo_validation"], dtype=np.float64).ravel()
    # The ELBO per cell on all cells (the same cells on both sides, unlike the validation sets).
    elbo_all = float(model.get_elbo())

    start = time.perf_counter()
    grouped = model.get_local_sample_distances(groupby="cell_type", keep_cell=False)["cell_type"]
    samples = np.asarray(grouped["sample_x"].values).astype(str)
    distances = {
        name: grouped.sel(cell_type_name=truth[key]).transpose("sample_x", "sample_y").values
        for name, key in (("distances_de", "de_cell_type"), ("distances_grouping", "grouping_cell_type"))
    }
    seconds["distances"] = time.perf_counter() - start

    # The counterfactual z of a random subset of cells under every sample (the raw material of
    # the distances), for the batch share of the sample effects (``batch_in_z`` in accuracy.py).
    start = time.perf_counter()
    local_cells = np.sort(np.random.default_rng(args.seed + 1).choice(
        adata.n_obs, min(args.local_cells, adata.n_obs), replace=False))
    local = model.get_local_sample_representation(indices=local_cells)
    local_z = np.asarray(local.transpose("cell_name", "sample", "latent_dim").values, dtype=np.float32)
    local_samples = np.asarray(local["sample"].values).astype(str)
    seconds["local"] = time.perf_counter() - start
    start = time.perf_counter()
    u = model.get_latent_representation()
    seconds["latent"] = time.perf_counter() - start

    de_cells = np.arange(adata.n_obs)
    if 0 < args.de_cells < adata.n_obs:
        de_cells = np.sort(np.random.default_rng(args.seed).choice(adata.n_obs, args.de_cells, replace=False))
    adata_de = adata if len(de_cells) == adata.n_obs else adata[de_cells].copy()
    start = time.perf_counter()
    de = model.differential_expression(adata=adata_de, sample_cov_keys=[truth["de_covariate"]], store_lfc=True,
                                       mc_samples=args.mc_samples)
    lfc = de["lfc"].sel(covariate=_single_covariate(de, truth["de_covariate"]), cell_name=list(adata_de.obs_names))
    lfc = lfc.transpose("cell_name", "gene")
    in_de_type = (adata_de.obs["cell_type"] == truth["de_cell_type"]).to_numpy()
    mean_abs_lfc = np.abs(np.asarray(lfc.values)[in_de_type]).mean(axis=0)
    genes = np.asarray(lfc["gene"].values).astype(str)
    seconds["de"] = time.perf_counter() - start

    start = time.perf_counter()
    null = model.differential_expression(adata=adata_de, sample_cov_keys=[truth["null_covariate"]], store_lfc=False)
    null_pvalue = null["pvalue"].sel(covariate=_single_covariate(null, truth["null_covariate"]),
                                     cell_name=list(adata_de.obs_names)).values
    perm_pvalues = []
    for key in null_keys:
        res = model.differential_expression(adata=adata_de, sample_cov_keys=[key], store_lfc=False)
        perm_pvalues.append(res["pvalue"].sel(covariate=_single_covariate(res, key),
                                              cell_name=list(adata_de.obs_names)).values)
    null_perm_pvalue = np.stack(perm_pvalues) if perm_pvalues else np.zeros((0, len(de_cells)))
    seconds["de_null"] = time.perf_counter() - start

    start = time.perf_counter()
    da = model.differential_abundance(sample_cov_keys=[truth["da_covariate"]])
    log_probs = da[f"{truth['da_covariate']}_log_probs"]
    level_dim = truth["da_covariate"]
    log_ratio = log_probs.sel({level_dim: "disease"}) - log_probs.sel({level_dim: "healthy"})
    da_log_ratio = log_ratio.sel(cell_name=list(adata.obs_names)).values
    seconds["da"] = time.perf_counter() - start

    if trace_cells is not None:
        distances.update(trace_z=np.stack(trace["z"]), trace_epochs=np.asarray(trace["epochs"]),
                         trace_cells=trace_cells, trace_samples=trace["samples"])
    np.savez(args.out, samples=samples, genes=genes, mean_abs_lfc=mean_abs_lfc, da_log_ratio=da_log_ratio,
             u=np.asarray(u), null_pvalue=np.asarray(null_pvalue), null_perm_pvalue=null_perm_pvalue,
             de_cells=de_cells, local_z=local_z, local_samples=local_samples, local_cells=local_cells,
             elbo_validation=elbo_validation, elbo_all=elbo_all,
             **distances)
    emit_result({"side": args.side, "seconds": seconds, "torch_threads": torch.get_num_threads(),
                 "argv": json.dumps(vars(args))})
    return 0


if __name__ == "__main__":
    sys.exit(main())
