r"""Admissibility of cell-sample pairs: is sample ``s`` represented near cell ``n``?

A counterfactual :math:`z_n^{(s)}` re-imagines cell :math:`n` in sample :math:`s`. If sample
:math:`s` has no cells in the neighbourhood of :math:`u_n` the model never saw that region for
that sample, and the counterfactual is an extrapolation; differential expression can leave such
pairs out.

Both rules below score a pair against the *component cells* :math:`\mathcal{C}_s` of sample
:math:`s`: its cells among those passed, at most ``subsample_size`` of them (a seeded random
subset; all of them when it has fewer). Each component :math:`m` contributes the posterior
:math:`q(u \mid x_m, s_m) = \mathcal{N}(\mu_m, \operatorname{diag}\sigma_m^2)`, and cells are
represented by their posterior means :math:`u_n`.

``flavor="ball"`` (default; the rule of scvi-tools' MRVI since its PR 3007)
-----------------------------------------------------------------------------
- ``log_probs[n, s]`` :math:`= \max_{m \in \mathcal{C}_s} \log\mathcal{N}(u_n;\, \mu_m,
  \operatorname{diag}\sigma_m^2)`: the cell's score under the nearest component of :math:`s`.
  Thresholding it asks whether :math:`u_n` lies inside the ball (an ellipsoid, in
  :math:`\sigma_m` units) around at least one of :math:`s`'s cells. A component cell's own
  component counts (a cell is never an extrapolation of its own sample), as in scvi-tools.
- One *global* threshold: the ``quantile_threshold`` quantile, pooled over all cells, of each
  cell's score under its own sample with its own component left out (how far a cell
  typically lies from its nearest other cell of the same sample).
- ``log_ratios = log_probs - threshold``; ``is_admissible = log_ratios >
  admissibility_threshold``.

``flavor="mog"`` (the rule before PR 3007)
------------------------------------------
- ``log_probs[n, s]`` :math:`= \log q_s(u_n)`, the aggregated posterior (mixture) density of
  :mod:`mrvi_pyro.da`; for a component cell under its own sample, its own component is left out
  (normalised by :math:`M_s - 1`).
- One threshold *per sample*: the ``quantile_threshold`` quantile of ``log_probs[n, s]`` over
  the cells of :math:`s`. So about a fraction ``1 - quantile_threshold`` of each sample's own
  cells are admissible for it.
- ``log_ratios``, ``is_admissible`` as above (strict ``>``).

Differences from scvi-tools (same argument and output names): every sample of the registry is a
column (in registry order, not order of appearance); a sample without cells among those passed
has ``log_probs = -inf`` and is admissible for no cell (with a warning); the ball threshold
pools the leave-one-out scores of all cells passed, not only of the subsampled ones (identical
when no sample exceeds ``subsample_size``); the subsample is seeded; any number of cells works
(scvi-tools fails under ``batch_size`` cells); memory is bounded by query x component blocks
(never ``n_cells x n_cells``).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import torch

from .da import (
    COMPONENT_CHUNK,
    QUERY_CHUNK,
    ComponentTable,
    aggregated_log_density,
    pack_components,
    posterior_parameters,
    query_features,
    select_components,
)
from .distributed import CellPartition

FLAVORS = ("ball", "mog")


def _check_arguments(flavor, subsample_size, quantile_threshold, batch_size) -> None:
    if flavor not in FLAVORS:
        raise ValueError(f"flavor must be one of {FLAVORS}; got {flavor!r}.")
    if subsample_size is not None and (int(subsample_size) != subsample_size or subsample_size < 2):
        raise ValueError(f"subsample_size must be an integer >= 2 or None (all cells); got {subsample_size!r}.")
    if not 0.0 <= float(quantile_threshold) <= 1.0:
        raise ValueError(f"quantile_threshold must lie in [0, 1]; got {quantile_threshold!r}.")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}.")


def nearest_component_log_density(
    u: torch.Tensor,
    table: ComponentTable,
    sample_index: torch.Tensor,
    *,
    own_position: torch.Tensor | None = None,
    query_chunk: int = QUERY_CHUNK,
    component_chunk: int = COMPONENT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best single-component log density per sample, and under the own sample leaving self out.

    Parameters
    ----------
    u
        Query points (n, L_u).
    table
        Packed components from :func:`mrvi_pyro.da.pack_components`.
    sample_index
        (n,) sample code of each query point.
    own_position
        Optional (n,) flat position of each query point's own component in ``table`` (-1 for
        none); it is excluded from the second output only.
    query_chunk, component_chunk
        Block sizes: a block holds about ``query_chunk * component_chunk`` values. Results do not
        depend on them.

    Returns
    -------
    best
        (n, n_samples) float32: :math:`\\max_{m \\in \\mathcal{C}_s} \\log\\mathcal{N}(u_n; \\mu_m,
        \\sigma_m^2)`, :math:`-\\infty` for samples without components.
    own_best
        (n,) float32: the same maximum over the components of the point's own sample other than
        itself (:math:`-\\infty` when there is none).
    """
    n = u.shape[0]
    dtype = table.features.dtype
    rows_per_block = max(1, component_chunk // table.row_size)
    block_entries = rows_per_block * table.row_size
    center = table.center.to(u.device)
    best = torch.full((n, table.n_samples), -math.inf, dtype=torch.float32, device=u.device)
    own_best = torch.full((n,), -math.inf, dtype=torch.float32, device=u.device)
    for q0 in range(0, n, query_chunk):
        phi = query_features(u[q0 : q0 + query_chunk].to(torch.float64) - center, dtype)
        q = phi.shape[0]
        codes = sample_index[q0 : q0 + q].to(table.row_sample.device)
        own = None if own_position is None else own_position[q0 : q0 + q]
        chunk_best = torch.full((q, table.n_samples), -math.inf, dtype=dtype, device=u.device)
        chunk_own = torch.full((q,), -math.inf, dtype=dtype, device=u.device)
        for e0 in range(0, table.features.shape[0], block_entries):
            dens = phi @ table.features[e0 : e0 + block_entries].T  # (q, entries)
            row_sample = table.row_sample[e0 // table.row_size : (e0 + dens.shape[1]) // table.row_size]
            row_max = dens.view(q, -1, table.row_size).amax(-1)  # (q, rows in block)
            chunk_best.scatter_reduce_(1, row_sample.expand(q, -1), row_max, reduce="amax")
            if own is not None:
                hit = torch.nonzero((own >= e0) & (own < e0 + dens.shape[1])).squeeze(-1)
                if len(hit):
                    dens[hit, own[hit] - e0] = -math.inf
                    row_max = dens.view(q, -1, table.row_size).amax(-1)
            same = row_sample.unsqueeze(0) == codes.unsqueeze(1)
            own_rows = torch.where(same, row_max, torch.full_like(row_max, -math.inf))
            chunk_own = torch.maximum(chunk_own, own_rows.amax(-1))
        best[q0 : q0 + q] = chunk_best.to(torch.float32)
        own_best[q0 : q0 + q] = chunk_own.to(torch.float32)
    return best, own_best


def outlier_cell_sample_pairs(
    module,
    data,
    indices: np.ndarray | None = None,
    *,
    flavor: str = "ball",
    subsample_size: int | None = 5000,
    quantile_threshold: float = 0.05,
    admissibility_threshold: float = 0.0,
    batch_size: int = 256,
    seed: int | None = 0,
    partition: CellPartition | None = None,
    gather: bool = True,
) -> dict | None:
    """Admissibility scores of every (cell, sample) pair (definitions in the module docstring).

    Parameters
    ----------
    module
        A module implementing the analysis protocol (``encode_u``, ``n_samples``).
    data
        :class:`mrvi_pyro.data.CellData`.
    indices
        Cells to use (default all): they are both the query cells and the cells the components
        and thresholds are built from.
    flavor
        ``"ball"`` (nearest component, one global threshold; default, as scvi-tools) or
        ``"mog"`` (leave-one-out mixture density, one threshold per sample).
    subsample_size
        At most this many component cells per sample (seeded random subset; None: all). Bounds
        the cost at ``n_cells x n_samples x subsample_size``.
    quantile_threshold
        Quantile of the within-sample scores used as the threshold.
    admissibility_threshold
        A pair is admissible when ``log_ratios > admissibility_threshold``.
    batch_size
        Cells per encoder minibatch (also the query chunk size).
    seed
        Seed of the component subsample.
    partition
        A :class:`mrvi_pyro.distributed.CellPartition` of the cells (None: all, in this
        process). Every rank encodes its cells, the posterior parameters and the own-sample
        scores (for the thresholds) are gathered on every rank, and each rank scores its own
        cells.
    gather
        Assemble the per-cell arrays of all ranks on rank 0 (the others return None); False
        returns each rank's own rows (``partition.cells``).

    Returns
    -------
    dict with numpy arrays ``"log_probs"``, ``"log_ratios"`` (float32) and ``"is_admissible"``
    (bool), each (n_cells, n_samples) with columns in sample-code order (all
    ``module.n_samples`` samples), plus ``"thresholds"`` (n_samples,; one value repeated for
    ``"ball"``) and ``"sample_index"`` (n_cells,) of the cells' own sample codes.
    """
    _check_arguments(flavor, subsample_size, quantile_threshold, batch_size)
    loc, scale, samples = posterior_parameters(module, data, indices, batch_size=batch_size, partition=partition)
    partition = CellPartition.whole(len(loc)) if partition is None else partition
    mine = partition.cells
    n_samples = int(module.n_samples)
    table = pack_components(loc, scale, samples, n_samples, select_components(samples, subsample_size, seed=seed))
    codes = samples.cpu().numpy().astype(np.int64)
    names = list(getattr(getattr(data, "registry", None), "sample_categories", range(n_samples)))
    absent = [names[s] for s in range(n_samples) if not (codes == s).any()]
    if absent and partition.is_main:
        warnings.warn(
            f"Sample(s) {absent[:10]}{'...' if len(absent) > 10 else ''} have no cells among the cells "
            "used, so no cell is admissible for them.", UserWarning, stacklevel=2,
        )
    chunk = max(int(batch_size), 1)
    if flavor == "ball":
        best, own_best = nearest_component_log_density(
            loc[mine], table, samples[mine], own_position=table.position[mine], query_chunk=chunk
        )
        log_probs, own_best = best.cpu().numpy(), partition.all_gather(own_best).cpu().numpy()
        finite = own_best[np.isfinite(own_best)]
        if not len(finite):
            raise ValueError(
                "No sample has two cells among the cells used, so the admissibility threshold is undefined; "
                "pass more cells (adata/indices) or a larger subsample_size."
            )
        thresholds = np.full(n_samples, np.quantile(finite.astype(np.float64), float(quantile_threshold)))
    else:
        log_probs = aggregated_log_density(loc[mine], table, own_position=table.position[mine],
                                           query_chunk=chunk)
        own = partition.all_gather(log_probs[torch.arange(len(log_probs), device=log_probs.device), samples[mine]])
        own = own.cpu().numpy()
        log_probs = log_probs.cpu().numpy()
        thresholds = (
            pd.Series(own).groupby(codes).quantile(float(quantile_threshold)).reindex(range(n_samples)).to_numpy()
        )
        undefined = [names[s] for s in np.unique(codes) if np.isnan(thresholds[s])]
        if undefined and partition.is_main:
            warnings.warn(
                f"Sample(s) {undefined[:10]} have a single cell, so their leave-one-out threshold is undefined "
                "and no cell is admissible for them.", UserWarning, stacklevel=2,
            )
    log_ratios = (log_probs - thresholds[None, :].astype(np.float32)).astype(np.float32)
    with np.errstate(invalid="ignore"):
        is_admissible = ~np.isnan(log_ratios) & (log_ratios > admissibility_threshold)
    out = {"log_probs": log_probs, "log_ratios": log_ratios, "is_admissible": is_admissible}
    if gather:
        out = {name: partition.gather(values) for name, values in out.items()}
        if not partition.is_main:
            return None
    else:
        codes = codes[mine]
    return {**out, "thresholds": thresholds, "sample_index": codes}
