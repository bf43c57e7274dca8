r"""Admissibility of cell-sample pairs: is sample ``s`` represented near cell ``n``?

A counterfactual :math:`z_n^{(s)}` re-imagines cell :math:`n` in sample :math:`s`. If sample
:math:`s` has no cells in the neighbourhood of :math:`u_n` the model never saw that region for
that sample, and the counterfactual is an extrapolation; differential expression can leave such
pairs out.

Definition
----------
With :math:`q_s` the aggregated posterior of sample :math:`s` built from at most
``subsample_size`` of its cells (a seeded random subset; all of them when it has fewer), see
:mod:`mrvi_pyro.da`:

- ``log_probs[n, s]`` :math:`= \log q_s(u_n)` at the posterior mean :math:`u_n`. When cell
  :math:`n` is itself one of the components of :math:`q_s` (its own sample), its own component is
  left out (a leave-one-out density, normalised by :math:`M_s - 1`): otherwise every cell would
  find itself "dense" in its own sample, however isolated it is.
- ``thresholds[s]`` = the ``quantile_threshold`` quantile of ``log_probs[n, s]`` over the cells
  :math:`n` of sample :math:`s` itself: how low a density sample :math:`s` gives its own
  least typical cells.
- ``log_ratios[n, s] = log_probs[n, s] - thresholds[s]``;
  ``is_admissible[n, s] = log_ratios[n, s] >= admissibility_threshold``.

So, with ``admissibility_threshold=0``, about a fraction ``1 - quantile_threshold`` of each
sample's own cells are admissible for that sample, and a cell of another sample is admissible
for :math:`s` when :math:`s` gives it at least the density of its own typical cells.

Differences from scvi-tools' MRVI (same argument and output names): the reference scores a pair
by the single best component (the maximum over :math:`s`'s cells of
:math:`\log\mathcal{N}(u_n; \mu_m, \sigma_m)`) and uses one threshold pooled over all samples,
and it fails for fewer than 256 cells. Here the score is the mixture density itself (the same
quantity as differential abundance, computed by the same code), each sample is calibrated
against its own cells, the subsample is seeded, and any number of cells works.

Samples without cells in ``data`` (or ``indices``) have ``log_probs = -inf`` and no threshold:
no pair with them is admissible. A sample with a single cell has no leave-one-out density for
that cell, so no threshold either; both cases are reported with a warning.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from .da import aggregated_log_density, pack_components, posterior_parameters, select_components


def _check_arguments(subsample_size, quantile_threshold, batch_size) -> None:
    if subsample_size is not None and (int(subsample_size) != subsample_size or subsample_size < 2):
        raise ValueError(f"subsample_size must be an integer >= 2 or None (all cells); got {subsample_size!r}.")
    if not 0.0 <= float(quantile_threshold) <= 1.0:
        raise ValueError(f"quantile_threshold must lie in [0, 1]; got {quantile_threshold!r}.")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}.")


def outlier_cell_sample_pairs(
    module,
    data,
    indices: np.ndarray | None = None,
    *,
    subsample_size: int | None = 5000,
    quantile_threshold: float = 0.05,
    admissibility_threshold: float = 0.0,
    batch_size: int = 256,
    seed: int | None = 0,
) -> dict:
    """Admissibility scores of every (cell, sample) pair (definition in the module docstring).

    Parameters
    ----------
    module
        A module implementing the analysis protocol (``encode_u``, ``n_samples``).
    data
        :class:`mrvi_pyro.data.CellData`.
    indices
        Cells to use (default all): they are both the query cells and the cells the aggregated
        posteriors and thresholds are built from.
    subsample_size
        At most this many component cells per sample (seeded random subset; None: all). Bounds
        the cost at ``n_cells x n_samples x subsample_size``.
    quantile_threshold
        Quantile of a sample's own leave-one-out log densities used as its threshold.
    admissibility_threshold
        A pair is admissible when ``log_ratios >= admissibility_threshold``.
    batch_size
        Cells per encoder minibatch (also the query chunk size).
    seed
        Seed of the component subsample.

    Returns
    -------
    dict with numpy arrays ``"log_probs"``, ``"log_ratios"`` (float32) and ``"is_admissible"``
    (bool), each (n_cells, n_samples) with columns in sample-code order (all
    ``module.n_samples`` samples), plus ``"thresholds"`` (n_samples,) and ``"sample_index"``
    (n_cells,) of the cells' own sample codes.
    """
    _check_arguments(subsample_size, quantile_threshold, batch_size)
    loc, scale, samples = posterior_parameters(module, data, indices, batch_size=batch_size)
    n_samples = int(module.n_samples)
    components = select_components(samples, subsample_size, seed=seed)
    table = pack_components(loc, scale, samples, n_samples, components)
    log_probs = aggregated_log_density(
        loc, table, own_position=table.position, query_chunk=max(int(batch_size), 1)
    ).cpu().numpy()
    codes = samples.cpu().numpy().astype(np.int64)
    own = log_probs[np.arange(len(codes)), codes]
    thresholds = (
        pd.Series(own).groupby(codes).quantile(float(quantile_threshold)).reindex(range(n_samples)).to_numpy()
    )
    names = list(getattr(getattr(data, "registry", None), "sample_categories", range(n_samples)))
    absent = [names[s] for s in range(n_samples) if s not in set(codes.tolist())]
    undefined = [names[s] for s in set(codes.tolist()) if not np.isfinite(thresholds[s])]
    if absent:
        warnings.warn(
            f"Sample(s) {absent[:10]}{'...' if len(absent) > 10 else ''} have no cells among the cells "
            "used, so no cell is admissible for them.", UserWarning, stacklevel=2,
        )
    if undefined:
        warnings.warn(
            f"Sample(s) {undefined[:10]} have a single cell, so their leave-one-out threshold is undefined "
            "and no cell is admissible for them.", UserWarning, stacklevel=2,
        )
    log_ratios = (log_probs - thresholds[None, :].astype(np.float32)).astype(np.float32)
    with np.errstate(invalid="ignore"):
        is_admissible = ~np.isnan(log_ratios) & (log_ratios >= admissibility_threshold)
    return {
        "log_probs": log_probs,
        "log_ratios": log_ratios,
        "is_admissible": is_admissible,
        "thresholds": thresholds,
        "sample_index": codes,
    }
