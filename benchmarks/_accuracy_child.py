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
the indices of that subset; ``local_z`` (m, S, L) ``get_local_sample_representation()`` of
``local_cells`` (m,) random cells (``--local-cells``), samples in the order ``local_samples``.
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

    start = time.perf_counter()
    if args.side == "ours":
        import mrvi_pyro
        from mrvi_pyro import MRVI

        seconds["package"] = mrvi_pyro.__file__
        MRVI.setup_anndata(adata, sample_key="sample", batch_key="batch")
        if args.zero_masked_grads:  # the reference's step while the KL weight is 0 (see parity.py)
            from _harness import before_each_step, fill_missing_grads
            from mrvi_pyro import train as train_module

            train_module.make_adam = before_each_step(train_module.make_adam,
                                                      lambda params, _: fill_missing_grads(params))
        model_kwargs = json.loads(args.model_kwargs)  # "architecture" included: a module argument
        model = MRVI(adata, seed=args.seed, **model_kwargs)
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
        model.train(max_epochs=args.epochs, batch_size=args.batch_size, train_size=0.9,
                    early_stopping=False, accelerator="cpu", devices=1, enable_progress_bar=False)
    seconds["train"] = time.perf_counter() - start

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

    np.savez(args.out, samples=samples, genes=genes, mean_abs_lfc=mean_abs_lfc, da_log_ratio=da_log_ratio,
             u=np.asarray(u), null_pvalue=np.asarray(null_pvalue), null_perm_pvalue=null_perm_pvalue,
             de_cells=de_cells, local_z=local_z, local_samples=local_samples, local_cells=local_cells,
             **distances)
    emit_result({"side": args.side, "seconds": seconds, "torch_threads": torch.get_num_threads(),
                 "argv": json.dumps(vars(args))})
    return 0


if __name__ == "__main__":
    sys.exit(main())
