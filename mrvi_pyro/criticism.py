"""Posterior predictive checks: does the fitted model generate counts that look like the data?

For the cells checked, each of ``n_samples`` draws of replicated counts ``x_rep ~ p(x_new | x)``
(:func:`mrvi_pyro.train.iter_posterior_predictive`: the guide's draw of ``u`` and ``z``, then the
model with its count site unconditioned) gives per-gene statistics over the cells; the same
statistics of the observed counts are compared with their spread over the draws. Statistics:

``mean``, ``variance`` (unbiased), ``zero_fraction`` (share of cells with a zero count) and
``cv`` (coefficient of variation, standard deviation over mean; NaN for a gene with no counts).

The draws are reduced chunk by chunk to per-gene sums (of the counts, their squares and the
zeros), so memory is ``n_samples x n_genes`` numbers whatever the number of cells.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .train import iter_posterior_predictive

STATISTICS = ("mean", "variance", "zero_fraction", "cv")
"""The per-gene statistics of :func:`posterior_predictive_statistics`, in their column order."""


def _statistics(sums: np.ndarray, squares: np.ndarray, zeros: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """The per-gene statistics from the sums over ``n`` cells (any leading shape)."""
    mean = sums / n
    variance = (squares - sums * mean) / max(n - 1, 1)
    variance = np.maximum(variance, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        cv = np.where(mean > 0, np.sqrt(variance) / np.where(mean > 0, mean, 1.0), np.nan)
    return {"mean": mean, "variance": variance, "zero_fraction": zeros / n, "cv": cv}


def posterior_predictive_statistics(module, data, indices: np.ndarray | None = None, *, n_samples: int = 20,
                                    genes: slice | np.ndarray = slice(None), gene_names=None,
                                    interval: float = 0.9, batch_level: int | None = None, batch_size: int = 256,
                                    seed: int = 0) -> pd.DataFrame:
    """Observed and replicated per-gene statistics, one row per (statistic, gene).

    Columns: ``statistic``, ``gene``, ``observed``; ``replicated`` (median over the draws),
    ``low`` and ``high`` (the central ``interval`` of the draws), ``inside`` (``low <= observed
    <= high``) and ``ppp``, the posterior predictive p-value ``P(replicated >= observed)`` over
    the draws (near 0 or 1: the model misses that statistic of that gene). The share of genes
    ``inside`` should be near ``interval`` for a model that fits.
    """
    if not 0 < interval < 1:
        raise ValueError(f"interval must be between 0 and 1 (e.g. 0.9); got {interval!r}.")
    n_genes = len(data.registry.var_names)
    observed = np.zeros((3, n_genes))
    replicated = np.zeros((n_samples, 3, n_genes))
    n_cells = 0
    for _, k, batch, counts in iter_posterior_predictive(module, data, indices, n_samples=n_samples,
                                                         batch_level=batch_level, batch_size=batch_size, seed=seed):
        if k == 0:
            x = batch["x"].double()
            observed += torch.stack([x.sum(0), x.square().sum(0), (x == 0).sum(0)]).cpu().numpy()
            n_cells += len(x)
        counts = counts.double()
        replicated[k] += torch.stack([counts.sum(0), counts.square().sum(0), (counts == 0).sum(0)]).cpu().numpy()
    if n_cells < 2:
        raise ValueError(f"A posterior predictive check needs at least 2 cells; got {n_cells}.")
    observed_stats = _statistics(*observed, n_cells)
    replicated_stats = _statistics(replicated[:, 0], replicated[:, 1], replicated[:, 2], n_cells)
    names = np.asarray(data.registry.var_names if gene_names is None else gene_names)[genes]
    tail = (1 - interval) / 2
    frames = []
    for name in STATISTICS:
        obs, rep = observed_stats[name][genes], replicated_stats[name][:, genes]
        low, mid, high = np.nanquantile(rep, [tail, 0.5, 1 - tail], axis=0)
        frames.append(pd.DataFrame({
            "statistic": name, "gene": names, "observed": obs, "replicated": mid, "low": low, "high": high,
            "inside": (obs >= low) & (obs <= high),
            "ppp": np.where(np.isnan(obs), np.nan, (rep >= obs).mean(0)),  # NaN: a CV of a gene without counts
        }))
    table = pd.concat(frames, ignore_index=True)
    table["statistic"] = pd.Categorical(table["statistic"], categories=list(STATISTICS))
    table.attrs.update(n_cells=n_cells, n_samples=n_samples, interval=interval, seed=seed)
    return table
