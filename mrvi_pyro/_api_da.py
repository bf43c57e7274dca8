"""Facade methods of :class:`mrvi_pyro.MRVI` for differential abundance and admissibility.

The methods marshal arguments and wrap results (xarray/pandas); the maths lives in
:mod:`mrvi_pyro.da` and :mod:`mrvi_pyro.admissibility`. They rely on the facade's ``module``,
``registry``, ``sample_info``, ``_cell_data(adata)`` and ``_indices(data, indices)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
import xarray as xr
from anndata import AnnData

from . import da, distributed
from .admissibility import outlier_cell_sample_pairs
from .data import category_levels, check_key_added, sample_covariates
from .explore import check_positive

BANDWIDTH = "scott"
"""Default kernel ``bandwidth`` of :meth:`differential_abundance` and its summary."""


def _check_cap(max_components_per_sample) -> None:
    if max_components_per_sample is not None and (
        int(max_components_per_sample) != max_components_per_sample or max_components_per_sample < 1
    ):
        raise ValueError(
            "max_components_per_sample must be a positive integer or None (all cells); "
            f"got {max_components_per_sample!r}."
        )


class DAMixin:
    """Methods of :class:`mrvi_pyro.MRVI` for differential abundance and admissibility."""

    # ----- helpers ------------------------------------------------------------------------
    def _da_inputs(self, adata, sample_subset, max_components_per_sample):
        """Validated ``(data, adata, present sample codes, their names, subset)`` of a DA call."""
        _check_cap(max_components_per_sample)
        data = self._cell_data(adata)
        adata = self.adata if adata is None else adata
        present = self._present_samples(data)
        names = [self.registry.sample_categories[s] for s in present]
        return data, adata, present, names, self._check_sample_subset(sample_subset, names)

    def _present_samples(self, data) -> np.ndarray:
        """Codes of the registry samples that have cells in ``data`` (registry order)."""
        return np.flatnonzero(np.bincount(data.sample_index, minlength=self.registry.n_samples) > 0)

    def _check_sample_subset(self, sample_subset, present_names: list) -> list | None:
        if sample_subset is None:
            return None
        subset = [sample_subset] if isinstance(sample_subset, str) else [str(s) for s in sample_subset]
        self.registry.check_samples(subset)
        missing = [s for s in subset if s not in present_names]
        if missing:
            warnings.warn(f"sample_subset sample(s) {missing[:10]} have no cells in adata and are ignored.",
                          UserWarning, stacklevel=3)
        return [s for s in subset if s in present_names]

    def _sample_groups(self, adata, key: str, sample_names: list, subset: list | None,
                       stacklevel: int = 3) -> tuple[list, np.ndarray]:
        """Levels of ``key`` and the (n_samples, n_levels) membership of the given samples,
        restricted to ``subset``; levels left without samples are dropped with a warning."""
        table = sample_covariates(adata, self.registry, [key])
        values = table[key].reindex(sample_names)
        levels = category_levels(table[key])
        if len(levels) > len(sample_names) / 2:
            warnings.warn(
                f"Sample covariate {key!r} has {len(levels)} levels for {len(sample_names)} samples (more "
                "than half as many): DA compares groups of samples, so it should be a discrete covariate "
                "with several samples per level.", UserWarning, stacklevel=stacklevel,
            )
        keep = np.ones(len(sample_names), bool) if subset is None else np.isin(sample_names, subset)
        membership = np.stack([(values.to_numpy() == v) & keep for v in levels], axis=1)
        empty = [v for v, m in zip(levels, membership.T) if not m.any()]
        if empty:
            warnings.warn(
                f"Level(s) {empty} of {key!r} have no samples in sample_subset and are left out.",
                UserWarning, stacklevel=stacklevel,
            )
        kept = [i for i, v in enumerate(levels) if v not in empty]
        return [levels[i] for i in kept], membership[:, kept]

    # ----- admissibility ------------------------------------------------------------------
    def get_outlier_cell_sample_pairs(
        self,
        adata: AnnData | None = None,
        subsample_size: int | None = 5000,
        quantile_threshold: float = 0.05,
        admissibility_threshold: float = 0.0,
        batch_size: int = 256,
        *,
        flavor: str = "ball",
        seed: int = 0,
    ) -> xr.Dataset:
        """Admissibility of every (cell, sample) pair.

        See :mod:`mrvi_pyro.admissibility` for the definitions. With ``flavor="ball"`` (default,
        the rule of scvi-tools), ``log_probs[n, s]`` is the log density of cell n's posterior mean
        under the nearest of sample s's cell posteriors, and ``log_ratios`` subtracts one global
        threshold (the ``quantile_threshold`` quantile of the cells' leave-one-out scores under
        their own sample). With ``flavor="mog"``, ``log_probs`` is the (leave-one-out) aggregated
        posterior density and each sample has its own threshold. Either way at most
        ``subsample_size`` cells per sample (drawn with ``seed``) are components and
        ``is_admissible = log_ratios > admissibility_threshold``. Works for any number of
        cells, in bounded memory; ``adata`` is not modified.

        Returns
        -------
        Dataset with ``log_probs``, ``log_ratios``, ``is_admissible`` of dims
        ``(cell_name, sample)`` (all registry samples; samples without cells in ``adata`` are
        never admissible) and ``threshold`` (sample).

        Inside a distributed launch (``torchrun`` or :func:`mrvi_pyro.distributed.launch`) every
        rank computes a contiguous share of the cells (the posterior parameters and own-sample
        scores are all-gathered); rank 0 returns the whole result, identical to one process, and the
        other ranks return None.
        """
        check_positive("batch_size", batch_size)
        data = self._cell_data(adata)
        out = outlier_cell_sample_pairs(
            self.module, data, flavor=flavor, subsample_size=subsample_size, quantile_threshold=quantile_threshold,
            admissibility_threshold=admissibility_threshold, batch_size=batch_size, seed=seed,
            partition=distributed.CellPartition.current(
                len(data), batch_size, module=self.module, data=data, arguments={
                "analysis": "outliers", "flavor": flavor, "subsample_size": subsample_size, "seed": seed,
                "quantile_threshold": quantile_threshold, "admissibility_threshold": admissibility_threshold,
            }),
        )
        if out is None:  # a rank other than 0 of a distributed launch
            return None
        coords = {"cell_name": np.asarray(data.obs_names), "sample": list(self.registry.sample_categories)}
        dims = ("cell_name", "sample")
        return xr.Dataset(
            {
                "log_probs": (dims, out["log_probs"]),
                "log_ratios": (dims, out["log_ratios"]),
                "is_admissible": (dims, out["is_admissible"]),
                "threshold": (("sample",), out["thresholds"]),
            },
            coords=coords,
            attrs={"flavor": flavor, "subsample_size": -1 if subsample_size is None else int(subsample_size),
                   "quantile_threshold": float(quantile_threshold),
                   "admissibility_threshold": float(admissibility_threshold), "seed": int(seed)},
        )

    # ----- differential abundance ---------------------------------------------------------
    def differential_abundance(
        self,
        adata: AnnData | None = None,
        sample_cov_keys: Sequence[str] | None = None,
        sample_subset: Sequence[str] | None = None,
        compute_log_enrichment: bool = False,
        omit_original_sample: bool = True,
        batch_size: int = 128,
        *,
        max_components_per_sample: int | None = None,
        seed: int = 0,
        component_chunk: int = da.COMPONENT_CHUNK,
        key_added: str | None = None,
        overwrite: bool = False,
        bandwidth: float | str = BANDWIDTH,
    ) -> xr.Dataset:
        """Per-cell log densities of the samples' aggregated posteriors, and of covariate levels.

        See :mod:`mrvi_pyro.da` for the maths. Memory stays bounded (blocks of query cells x
        component cells); the result is exact unless ``max_components_per_sample`` is set.

        Parameters
        ----------
        adata
            AnnData to analyse (default: the model's); not modified.
        sample_cov_keys
            Sample-level obs columns (discrete); for each, the log density of every level's
            samples pooled with equal weights.
        sample_subset
            Only these samples form the covariate groups (``log_probs`` still has every
            sample with cells).
        compute_log_enrichment
            Also give each level's log density against all other (subset) samples pooled.
        omit_original_sample
            Leave each cell's own sample out of the group densities; a cell whose sample is the
            only one of a level gets NaN for that level (with a warning).
        batch_size
            Cells per encoder minibatch.
        max_components_per_sample
            Ours: at most this many (seeded, random) cells per sample as mixture components
            (None: all cells, exact). For large data, e.g. 500.
        seed
            Ours: seed of the component subsample.
        component_chunk
            Ours: component cells per block (memory ~ 512 x component_chunk doubles).
        key_added
            Ours: also write the per-cell log-ratio of each level against the first level of
            each key into ``adata.obs`` (of the AnnData analysed), for scanpy:
            ``"<key_added>_log_ratio_<key>_<level>"`` = ``log q_level - log q_first`` (e.g.
            ``key_added="mrvi_da"`` gives ``mrvi_da_log_ratio_disease_disease``, disease vs
            healthy; NaN where a cell's own sample is the only one of a level).
        overwrite
            Ours: replace existing ``obs`` columns of ``key_added`` (False: a ``ValueError``
            before any work; the registered columns are always refused).
        bandwidth
            Ours: width of a Gaussian kernel convolved with every component of the aggregated
            posteriors (:func:`mrvi_pyro.da.kernel_bandwidth`): ``"scott"`` (Scott's rule on the
            posterior means), a number >= 0 in units of u, or 0 for the exact aggregated
            posteriors (the reference's estimator). Default ``"scott"``: trained posteriors
            are so narrow that the exact density at a cell is carried by its nearest few cells,
            which makes the per-cell log-ratio noisy and too large; the kernel averages over
            many cells (figures in the README's "Differences from scvi-tools").

        Returns
        -------
        Dataset: ``log_probs`` (cell_name, sample); ``"<key>_log_probs"`` (cell_name, <key>);
        ``"<key>_log_enrichs"`` (cell_name, <key>) with ``compute_log_enrichment``.

        Inside a distributed launch (``torchrun`` or :func:`mrvi_pyro.distributed.launch`) every
        rank computes a contiguous share of the cells against the components of all cells (the
        posterior parameters are all-gathered); rank 0 returns the whole result, identical to one
        process, and the other ranks return None.
        """
        check_positive("batch_size", batch_size)
        da.check_bandwidth(bandwidth)
        data, adata, present, names, subset = self._da_inputs(adata, sample_subset, max_components_per_sample)
        keys = [] if sample_cov_keys is None else ([sample_cov_keys] if isinstance(sample_cov_keys, str)
                                                    else list(sample_cov_keys))
        groups = {key: self._sample_groups(adata, key, names, subset) for key in keys}  # validates first
        if key_added is not None:
            columns = [f"{key_added}_log_ratio_{key}_{level}" for key, (levels, _) in groups.items()
                       for level in levels[1:]]
            check_key_added(key_added, adata.obs, columns, where="adata.obs", overwrite=overwrite,
                            registry=self.registry)

        log_probs = da.sample_log_probs(
            self.module, data, max_components_per_sample=max_components_per_sample, batch_size=batch_size,
            component_chunk=component_chunk, seed=seed, partition=distributed.CellPartition.current(
                len(data), batch_size, module=self.module, data=data, arguments={
                    "analysis": "da", "max_components_per_sample": max_components_per_sample, "seed": seed,
                    "bandwidth": bandwidth}),
            bandwidth=bandwidth,
        )
        if log_probs is None:  # a rank other than 0 of a distributed launch
            return None
        log_probs = log_probs[:, present]
        position = np.full(self.registry.n_samples, -1)
        position[present] = np.arange(len(present))
        cell_sample = position[data.sample_index]
        coords = {"cell_name": np.asarray(data.obs_names), "sample": names}
        data_vars = {"log_probs": (("cell_name", "sample"), log_probs)}
        for key, (levels, membership) in groups.items():
            coords[key] = levels
            data_vars[f"{key}_log_probs"] = (("cell_name", key), da.group_log_probs(
                log_probs, cell_sample, membership, omit_original_sample=omit_original_sample, level_names=levels))
            if compute_log_enrichment:
                eligible = None if subset is None else np.isin(names, subset)
                data_vars[f"{key}_log_enrichs"] = (("cell_name", key), da.log_enrichment(
                    log_probs, cell_sample, membership, omit_original_sample=omit_original_sample,
                    eligible=eligible, level_names=levels, covariate=key))
        if key_added is not None:
            for key, (levels, _) in groups.items():
                level_log_probs = data_vars[f"{key}_log_probs"][1]
                for v, level in enumerate(levels[1:], start=1):
                    adata.obs[f"{key_added}_log_ratio_{key}_{level}"] = level_log_probs[:, v] - level_log_probs[:, 0]
        return xr.Dataset(data_vars, coords=coords)

    def differential_abundance_summary(
        self,
        sample_cov_key: str,
        group1=None,
        group2=None,
        adata: AnnData | None = None,
        sample_subset: Sequence[str] | None = None,
        omit_original_sample: bool = True,
        groupby: str | None = None,
        n_draws: int = 10,
        n_bootstrap: int = 100,
        hdi_prob: float = 0.95,
        batch_size: int = 128,
        max_components_per_sample: int | None = None,
        seed: int = 0,
        bandwidth: float | str = BANDWIDTH,
    ) -> xr.Dataset:
        """Uncertainty of the DA log-ratio of two levels of a sample covariate (ours).

        ``log_ratio`` is :math:`r_n = \\log q_{A_1}(u_n) - \\log q_{A_2}(u_n)` with
        :math:`A_1` the samples with ``sample_cov_key == group1`` and :math:`A_2` those with
        ``group2``. Its replicates combine ``n_draws`` posterior draws of each cell's u with
        ``n_bootstrap`` Bayesian-bootstrap (flat Dirichlet) reweightings of the samples within
        each group, shared across cells (see :mod:`mrvi_pyro.da`): a signal carried by one
        donor gives a wide interval and a ``prob_positive`` far from 1.

        Parameters
        ----------
        sample_cov_key
            A sample-level obs column.
        group1, group2
            Its two levels compared (``group1`` vs ``group2``). Default: with exactly two
            levels, the second level vs the first (categorical order, e.g. disease vs healthy).
        groupby
            Optional obs column (e.g. cell type): adds a per-group table of the mean log-ratio
            over each group's cells, with the same summaries.
        n_draws, n_bootstrap
            Posterior draws of u per cell and bootstrap weight vectors (replicates = product).
        hdi_prob
            Probability mass of the highest-density interval (:func:`arviz.hdi`).
        max_components_per_sample, seed, batch_size, sample_subset, omit_original_sample, bandwidth
            As in :meth:`differential_abundance`; ``seed`` also seeds the draws and weights.

        Returns
        -------
        Dataset with ``log_ratio``, ``log_ratio_sd``, ``log_ratio_lower``, ``log_ratio_upper``,
        ``prob_positive`` of dim ``cell_name``; with ``groupby`` also ``"<groupby>_<name>"``
        for the same five names plus ``"<groupby>_n_cells"``, of dim ``"<groupby>_name"``
        (``ds[[...]].to_dataframe()`` gives the per-group table). ``attrs`` record the
        comparison.
        """
        check_positive("batch_size", batch_size)
        da.check_bandwidth(bandwidth)
        data, adata, present, names, subset = self._da_inputs(adata, sample_subset, max_components_per_sample)
        levels, membership = self._sample_groups(adata, sample_cov_key, names, subset)
        if group1 is None and group2 is None:
            if len(levels) != 2:
                raise ValueError(
                    f"{sample_cov_key!r} has levels {levels}; pass group1= and group2= to choose the two compared."
                )
            group1, group2 = levels[1], levels[0]
        for arg, value in (("group1", group1), ("group2", group2)):
            if value not in levels:
                raise ValueError(
                    f"{arg}={value!r} is not a level of {sample_cov_key!r} with samples; levels: {levels}."
                )
        if group1 == group2:
            raise ValueError("group1 and group2 must be different levels.")
        if groupby is not None and groupby not in adata.obs:
            raise ValueError(f"groupby {groupby!r} is not a column of adata.obs (columns: {list(adata.obs.columns)}).")
        if int(n_draws) < 1 or int(n_bootstrap) < 1:
            raise ValueError("n_draws and n_bootstrap must be positive integers.")
        full = np.zeros((self.registry.n_samples, 2), bool)
        full[present] = membership[:, [levels.index(group1), levels.index(group2)]]
        cell_groups = group_names = None
        if groupby is not None:
            cats = pd.Categorical(adata.obs[groupby])
            cell_groups, group_names = cats.codes.astype(np.int64), list(cats.categories)
        summary = da.log_ratio_summary(
            self.module, data, full[:, 0], full[:, 1], cell_groups=cell_groups,
            n_groups=None if group_names is None else len(group_names), omit_original_sample=omit_original_sample,
            n_draws=int(n_draws), n_bootstrap=int(n_bootstrap), hdi_prob=hdi_prob,
            max_components_per_sample=max_components_per_sample, batch_size=batch_size, seed=seed,
            level_names=(group1, group2), bandwidth=bandwidth,
        )
        data_vars = {k: (("cell_name",), v) for k, v in summary.cells.items()}
        coords = {"cell_name": np.asarray(data.obs_names)}
        if summary.groups is not None:
            coords[f"{groupby}_name"] = group_names
            data_vars.update({f"{groupby}_{k}": ((f"{groupby}_name",), v) for k, v in summary.groups.items()})
        return xr.Dataset(data_vars, coords=coords, attrs={
            "sample_cov_key": sample_cov_key, "group1": str(group1), "group2": str(group2),
            "n_draws": int(n_draws), "n_bootstrap": int(n_bootstrap), "hdi_prob": float(hdi_prob),
            "omit_original_sample": int(omit_original_sample), "seed": int(seed),
        })

    def get_aggregated_posterior(
        self,
        adata: AnnData | None = None,
        sample: str | int | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int = 256,
    ):
        """The aggregated posterior of ``sample`` (all cells when None) over ``u``, as a Pyro
        ``MixtureSameFamily`` of diagonal normals with equal weights, one per cell (restricted
        to ``indices`` when given). Sample or evaluate it like any Pyro distribution."""
        check_positive("batch_size", batch_size)
        data = self._cell_data(adata)
        idx = self._indices(data, indices)
        if sample is not None:
            cats = self.registry.sample_categories
            if isinstance(sample, (int, np.integer)) and not isinstance(sample, bool):
                if not 0 <= int(sample) < len(cats):
                    raise ValueError(f"sample index {sample} outside [0, {len(cats)}).")
                code = int(sample)
            elif str(sample) in cats:
                code = cats.index(str(sample))
            else:
                raise ValueError(f"sample {sample!r} is not a sample of {self.registry.sample_key!r}: {cats[:20]}.")
            idx = idx[data.sample_index[idx] == code]
            if idx.size == 0:
                raise ValueError(f"sample {sample!r} has no cells among the selected cells.")
        loc, scale, _ = da.posterior_parameters(self.module, data, idx, batch_size=batch_size)
        return da.aggregated_posterior(loc, scale)
