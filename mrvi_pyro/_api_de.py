"""Facade methods of :class:`mrvi_pyro.MRVI` for differential expression.

The methods marshal arguments and wrap results (xarray/pandas); the maths lives in
:mod:`mrvi_pyro.de`. They rely on the facade's ``module``, ``registry``, ``sample_info``,
``adata``, ``_cell_data(adata)`` and ``_indices(data, indices)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
from anndata import AnnData

from . import de, distributed
from ._safe_io import StagedPath, zarr_replaceable
from ._storage import open_store, partitioned_cell_arrays
from .data import check_key_added, sample_covariates
from .explore import check_memory_budget, check_positive, check_use_vmap


def _as_list(value, name: str) -> list[str]:
    values = [value] if isinstance(value, str) else list(value)
    duplicated = sorted({v for v in values if values.count(v) > 1})
    if duplicated:
        raise ValueError(f"{name} lists {duplicated} more than once; give each key once.")
    return values


def _sample_level_counts(data, n_samples: int, n_levels: int) -> np.ndarray:
    """(n_samples, n_levels) number of cells of each sample in each nuisance level."""
    counts = np.zeros((n_samples, n_levels), dtype=np.int64)
    np.add.at(counts, (data.sample_index, data.batch_index), 1)
    return counts


class DEMixin:
    """Methods of :class:`mrvi_pyro.MRVI` for differential expression."""

    def _de_covariates(self, adata: AnnData, keys: list[str], sample_subset) -> pd.DataFrame:
        """Per-sample values of ``keys`` for the kept samples (``sample_subset`` or all; validated,
        registry order). Samples without cells in ``adata`` take their values from the model's
        own AnnData, else are refused (when named in ``sample_subset``) or left out with a warning."""
        names = list(self.registry.sample_categories)
        kept = names
        if sample_subset is not None:
            subset = _as_list(sample_subset, "sample_subset")
            self.registry.check_samples(subset)
            kept = [s for s in names if s in set(subset)]
        table = sample_covariates(adata, self.registry, keys)
        missing = [s for s in kept if s not in table.index]
        if missing and adata is not self.adata and self.adata is not None:
            fallback = sample_covariates(self.adata, self.registry, keys)
            table = pd.concat([table, fallback.loc[[s for s in missing if s in fallback.index]]])
            missing = [s for s in kept if s not in table.index]
        if missing:
            if sample_subset is not None:
                raise ValueError(
                    f"sample_subset sample(s) {missing[:10]} have no cells in adata, so their values of "
                    f"{keys} are unknown; drop them from sample_subset."
                )
            warnings.warn(
                f"Sample(s) {missing[:10]} have no cells in adata, so their covariate values are unknown; "
                "they are left out of the design.", UserWarning, stacklevel=3,
            )
        return table.loc[[s for s in kept if s in table.index], keys]

    def _kept_level_counts(self, data, adata: AnnData, codes: np.ndarray) -> np.ndarray:
        """(kept samples, nuisance levels) cell counts of ``data``; kept samples without cells
        there take their counts from the model's own data."""
        n_samples, n_levels = self.registry.n_samples, self.registry.n_batches
        counts = _sample_level_counts(data, n_samples, n_levels)
        if self.adata is not None and adata is not self.adata and (counts[codes].sum(1) == 0).any():
            absent = counts.sum(1) == 0
            counts[absent] = _sample_level_counts(self._cell_data(), n_samples, n_levels)[absent]
        return counts[codes]

    def differential_expression(
        self,
        adata: AnnData | None = None,
        sample_cov_keys: Sequence[str] | None = None,
        sample_subset: Sequence[str] | None = None,
        batch_size: int = 128,
        use_vmap: str | bool = "auto",
        normalize_design_matrix: bool = True,
        add_batch_specific_offsets: bool = False,
        mc_samples: int = 50,
        store_lfc: bool = False,
        store_lfc_metadata_subset: Sequence[str] | None = None,
        store_baseline: bool = False,
        eps_lfc: float = 1e-4,
        filter_inadmissible_samples: bool = False,
        lambd: float = 0.0,
        delta: float | None = 0.3,
        *,
        pvalue_method: str = "robust",
        n_permutations: int = 999,
        credible_interval: float | None = None,
        max_in_memory_gb: float = 4.0,
        zarr_path: str | Path | None = None,
        overwrite: bool = False,
        paired_draws: bool = True,
        regression_uncertainty: bool = True,
        seed: int = 0,
        key_added: str | None = None,
        **filter_samples_kwargs,
    ) -> xr.Dataset:
        """Cell-specific differential expression by counterfactual regression.

        Every cell's counterfactual representations :math:`z_n^{(s)}` over the kept samples are
        regressed on the sample design matrix (an intercept, optional batch offsets, the
        covariates); each covariate column is tested per cell with an exact test, and its effect
        can be decoded into per-gene log fold-changes with paired posterior draws. The maths and
        the null distribution are in :mod:`mrvi_pyro.de`.

        Parameters
        ----------
        adata
            Cells to analyse (default: the model's AnnData); not modified. Covariate values come
            from its ``obs`` (sample-level columns); samples without cells in it take their values
            from the model's AnnData when possible.
        sample_cov_keys
            Sample-level obs columns: categorical (pandas category, strings, booleans; contrasts
            against the first level, ``"<key>_<level>"``) or numeric (``"<key>"``).
        sample_subset
            Only these samples enter the regression (default: all).
        batch_size
            Cells per chunk.
        use_vmap
            Accepted for compatibility with scvi-tools and ignored (cells and samples are always
            tensor dimensions): ``"auto"``, True or False.
        normalize_design_matrix
            Standardise numeric covariates (coefficients per standard deviation); indicator
            columns stay 0/1.
        add_batch_specific_offsets
            Add an offset column per nuisance level after the first, holding each sample's share
            of cells in that level (an indicator when samples are nested in levels; samples
            spread over several levels are accepted), so that covariate effects are estimated
            net of batch; the LFCs then use each level's own offset.
        mc_samples
            Posterior draws of u per cell for the LFCs.
        store_lfc
            Decode log2 fold-changes: ``lfc``, ``lfc_std``, ``pde`` (cell_name, covariate, gene).
        store_lfc_metadata_subset
            Only decode the columns of these keys (a subset of ``sample_cov_keys``); the LFC
            variables then have the dimension ``covariate_sub``.
        store_baseline
            Also return ``baseline_expression`` (cell_name, gene): the decoded baseline arm,
            averaged over draws and nuisance levels.
        eps_lfc
            Added to the normalised expression before the log, so lowly expressed genes do not
            produce huge LFCs.
        filter_inadmissible_samples
            Give each cell weight 0 for the samples that are inadmissible for it
            (:meth:`get_outlier_cell_sample_pairs`); adds ``n_samples`` (cell_name).
        lambd
            Ridge penalty on the covariate coefficients (``beta`` and the LFCs; the tests use
            the unpenalised fit).
        delta
            LFC threshold of ``pde`` = P(|lfc| >= delta); None skips ``pde``.
        pvalue_method
            Ours: ``"robust"`` (default; an HC2 sandwich test with Bell-McCaffrey degrees of
            freedom, calibrated when sample groups differ in size and variability; columns
            resting on a single sample fall back to ``"chi2"`` with a warning), ``"chi2"`` (the
            exact null of the chi-squared statistic when all samples vary equally, see
            :mod:`mrvi_pyro.de`) or ``"permutation"`` (sample labels permuted, within the
            dominant batch of each sample when ``add_batch_specific_offsets``).
        n_permutations
            Ours: relabellings for ``"permutation"``.
        credible_interval
            Ours: probability of highest-density intervals of the LFCs (``lfc_lower``,
            ``lfc_upper``; :func:`arviz.hdi`, about 10 microseconds per cell and gene).
        max_in_memory_gb
            Ours: (cell, covariate, gene) outputs larger than this are written to a zarr store
            (``zarr_path``, or a temporary directory named in a warning) and returned lazily.
        zarr_path
            Ours: write the LFC outputs (and then the whole result) to this zarr store, chunk by
            chunk, and return the Dataset opened lazily from it. The store is written beside it
            and renamed into place when complete, so an interrupted run leaves ``zarr_path`` as
            it was.
        overwrite
            Ours: replace an existing non-empty ``zarr_path`` (only if it is a zarr store;
            anything else is refused) and existing ``obs`` columns of ``key_added``. False
            (default): either is a ``ValueError``, raised before any work.
        paired_draws
            Ours: the same posterior draw of u on both arms of an LFC (False reproduces the
            reference's unpaired comparison, for diagnostics).
        regression_uncertainty
            Ours: add the sampling uncertainty of the regression coefficients (a wild bootstrap
            over samples) to every posterior draw, so ``lfc_std`` and ``pde`` reflect how well
            the samples determine the effect; False keeps only the posterior uncertainty of u
            (each draw still has its own regression).
        seed
            Ours: seeds the posterior draws and the permutations.
        key_added
            Ours: also write per-cell summaries into ``adata.obs`` (of the AnnData analysed), for
            scanpy (``sc.pl.umap(adata, color=...)``): for each ``covariate`` value ``c``,
            ``"<key_added>_effect_size_<c>"`` and ``"<key_added>_padj_<c>"`` (e.g.
            ``key_added="mrvi_de"`` gives ``mrvi_de_effect_size_disease_disease``). Existing
            columns are refused unless ``overwrite=True``; the registered columns always.
        **filter_samples_kwargs
            Passed to :func:`mrvi_pyro.admissibility.outlier_cell_sample_pairs`.

        Returns
        -------
        Dataset with ``beta`` (cell_name, covariate, latent_dim); ``effect_size``, ``pvalue``,
        ``padj`` (cell_name, covariate); with ``store_lfc``: ``lfc``, ``lfc_std`` and (unless
        ``delta`` is None) ``pde`` (cell_name, covariate, gene), plus ``lfc_lower``/``lfc_upper``
        with ``credible_interval``; ``baseline_expression`` (cell_name, gene) with
        ``store_baseline``; ``n_samples`` (cell_name) with ``filter_inadmissible_samples``. Also
        (ours) ``nuisance_beta`` (cell_name, nuisance_term, latent_dim) for the intercept and
        offsets, and ``design_matrix`` (sample, design_column).

        Inside a distributed launch (``torchrun`` or :func:`mrvi_pyro.distributed.launch`) every
        rank computes a contiguous share of the cells (``padj`` is adjusted over all cells) and,
        with ``store_lfc``, decodes its cells' LFCs with the posterior draws and bootstrap
        multipliers one process gives them, writing them into its own chunks of the zarr store
        (or gathering them on rank 0 when they are kept in memory); rank 0 returns the whole
        result, identical to one process, and the other ranks return None.

        Differences from scvi-tools' MRVI: the design has an intercept (a binary covariate's
        coefficient is the contrast of its two levels) and the offsets and the intercept are
        not in the ``covariate`` coordinate; strings and booleans are accepted; the p-values
        come from calibrated nulls rather than a chi-squared with as many degrees of freedom as
        samples; the LFCs compare the fitted reference level (intercept, categorical covariates
        at their first level, numeric ones at their mean) with it plus the coefficient, rather
        than the average sample with it plus the coefficient; the LFC arms share their
        posterior draws; batch offsets use each sample's share of cells per batch (the
        reference one-hot encodes the batch of each sample's first cell).
        """
        if sample_cov_keys is None:
            raise ValueError("Pass sample_cov_keys=[...]: the sample-level obs columns to regress on.")
        check_use_vmap(use_vmap)
        check_memory_budget(max_in_memory_gb)
        keys = _as_list(sample_cov_keys, "sample_cov_keys")
        if not keys:
            raise ValueError("sample_cov_keys is empty; pass at least one sample-level obs column.")
        if filter_samples_kwargs and not filter_inadmissible_samples:
            raise ValueError(
                f"Arguments {sorted(filter_samples_kwargs)} only apply with filter_inadmissible_samples=True."
            )
        if pvalue_method not in ("robust", "chi2", "permutation"):
            raise ValueError(
                f"pvalue_method must be 'robust', 'chi2' or 'permutation'; got {pvalue_method!r}.")
        if pvalue_method == "permutation" and (int(n_permutations) != n_permutations or n_permutations < 1):
            raise ValueError(f"n_permutations must be a positive integer; got {n_permutations!r}.")
        if mc_samples < 1 and store_lfc:
            raise ValueError(f"mc_samples must be a positive integer; got {mc_samples!r}.")
        if credible_interval is not None and not 0 < float(credible_interval) < 1:
            raise ValueError(f"credible_interval must lie in (0, 1); got {credible_interval!r}.")
        if lambd < 0:
            raise ValueError(f"lambd must be >= 0; got {lambd!r}.")
        check_positive("batch_size", batch_size)
        if isinstance(eps_lfc, bool) or not isinstance(eps_lfc, (int, float, np.number)) or not 0 < eps_lfc < np.inf:
            raise ValueError(f"eps_lfc must be a positive number (the pseudo-count of the log); got {eps_lfc!r}.")
        if delta is not None and (isinstance(delta, bool) or not isinstance(delta, (int, float, np.number))
                                  or not 0 <= delta < np.inf):
            raise ValueError(f"delta must be a finite number >= 0 (or None to skip pde); got {delta!r}.")
        staged = None
        if zarr_path is not None and store_lfc:  # before any work: refuse a taken target now
            staged = StagedPath(zarr_path, overwrite=overwrite, what="zarr_path", replaceable=zarr_replaceable)
        lfc_keys = keys
        if store_lfc_metadata_subset is not None:
            lfc_keys = _as_list(store_lfc_metadata_subset, "store_lfc_metadata_subset")
            outside = [k for k in lfc_keys if k not in keys]
            if outside:
                raise ValueError(
                    f"store_lfc_metadata_subset {outside} not in sample_cov_keys {keys}; it must be a subset."
                )
        data = self._cell_data(adata)
        partition = distributed.CellPartition.current(  # all cells in one process
            len(data), batch_size, module=self.module, data=data, arguments={
                "analysis": "de", "keys": keys, "subset": sample_subset, "seed": seed, "lambd": lambd,
                "pvalue_method": pvalue_method, "filter": filter_inadmissible_samples,
                "offsets": add_batch_specific_offsets, "normalize": normalize_design_matrix,
                "n_permutations": n_permutations, "store_lfc": store_lfc, "lfc_keys": lfc_keys,
                "mc_samples": mc_samples, "baseline": store_baseline, "eps_lfc": eps_lfc, "delta": delta,
                "credible_interval": credible_interval, "paired": paired_draws,
                "regression_uncertainty": regression_uncertainty,
                "zarr_path": None if zarr_path is None else str(zarr_path)})
        adata = self.adata if adata is None else adata
        covariates = self._de_covariates(adata, keys, sample_subset)
        kept = list(covariates.index)
        codes = np.array([self.registry.sample_categories.index(s) for s in kept])
        counts = self._kept_level_counts(data, adata, codes)
        design = de.sample_design(
            covariates, keys, counts, level_names=self.registry.batch_categories,
            normalize_design_matrix=normalize_design_matrix, add_batch_specific_offsets=add_batch_specific_offsets,
            pvalue_method=pvalue_method,
        )
        if key_added is not None:
            columns = [f"{key_added}_{name}_{c}" for c in design.covariate_names for name in ("effect_size", "padj")]
            check_key_added(key_added, adata.obs, columns, where="adata.obs", overwrite=overwrite,
                            registry=self.registry)
        weights = None
        if filter_inadmissible_samples:
            from .admissibility import outlier_cell_sample_pairs

            admissible = outlier_cell_sample_pairs(self.module, data, partition=partition, gather=False,
                                                   **filter_samples_kwargs)["is_admissible"]
            weights = admissible[:, codes].astype(np.float64)  # rows of this rank's cells
        coords, lfc_columns, lfc_dim = de.result_coordinates(
            design, lfc_keys, cell_names=data.obs_names, gene_names=self.registry.var_names, samples=kept)
        if store_lfc:  # rank 0 decides (and makes a temporary store if needed)
            variables, zarr_path = partition.broadcast(de.lfc_outputs(
                coords, lfc_dim, delta=delta, credible_interval=credible_interval, store_baseline=store_baseline,
                max_in_memory_gb=max_in_memory_gb, zarr_path=zarr_path) if partition.is_main else None)
        level_weights = de.nuisance_level_weights(counts)
        sink = None
        try:
            if store_lfc:  # this rank's cells in memory; in zarr, its chunks of rank 0's store
                sink = partitioned_cell_arrays(
                    variables, {k: coords[k] for k in ("cell_name", lfc_dim, "gene")}, partition,
                    zarr_path=zarr_path if staged is None else staged.staging, chunk_cells=batch_size)
            out = de.differential_expression(
                self.module, data, design, codes, weights=weights, batch_size=batch_size, lambd=lambd,
                pvalue_method=pvalue_method, n_permutations=n_permutations, store_lfc=store_lfc,
                lfc_columns=lfc_columns, mc_samples=mc_samples, level_weights=level_weights, eps_lfc=eps_lfc,
                delta=delta, credible_interval=credible_interval, store_baseline=store_baseline, sink=sink,
                paired=paired_draws, regression_uncertainty=regression_uncertainty, seed=seed, partition=partition,
            )
            if sink is not None:
                sink = sink.gathered(partition)  # in memory: all cells on rank 0
                partition.barrier()  # in zarr: every rank's chunks are written before rank 0 completes it
        except BaseException:
            if staged is not None:
                staged.discard()
            raise
        if out is None:  # a rank other than 0 of a distributed launch
            return None
        attrs = {
            "pvalue_method": pvalue_method,
            "n_permutations": int(n_permutations) if pvalue_method == "permutation" else 0,
            "mc_samples": int(mc_samples),
            "eps_lfc": float(eps_lfc),
            "delta": float("nan") if delta is None else float(delta),
            "lambd": float(lambd),
            "paired_draws": int(bool(paired_draws)),
            "regression_uncertainty": int(bool(regression_uncertainty)),
            "credible_interval": float("nan") if credible_interval is None else float(credible_interval),
            "reference_levels": [f"{k}={v}" for k, v in design.reference_levels.items()],
            "nuisance_level_weights": [float(v) for v in level_weights],
            "seed": int(seed),
        }
        result = de.result_dataset(out, design, coords, attrs, sink=sink, with_n_samples=filter_inadmissible_samples)
        if key_added is not None:
            for j, c in enumerate(design.covariate_names):
                adata.obs[f"{key_added}_effect_size_{c}"] = np.asarray(out["effect_size"][:, j])
                adata.obs[f"{key_added}_padj_{c}"] = np.asarray(out["padj"][:, j])
        if sink is None or not sink.on_disk:
            return result
        sink.add_variables(result)
        if staged is not None:
            staged.commit()
        return open_store(zarr_path, dask=False)

    def differential_expression_summary(
        self,
        de_result: xr.Dataset,
        groupby: str = "cell_type",
        adata: AnnData | None = None,
        covariate: str | Sequence[str] | None = None,
        n_top_genes: int | None = 10,
        interval: tuple[float, float] = (0.05, 0.95),
        padj_threshold: float = 0.05,
        max_cells_per_group: int = 5000,
        seed: int = 0,
    ) -> pd.DataFrame:
        """Tidy per-group table of a :meth:`differential_expression` result (ours).

        Parameters
        ----------
        de_result
            The Dataset returned by :meth:`differential_expression` (in memory or on disk).
        groupby
            obs column of ``adata`` grouping the cells (e.g. cell type).
        adata
            The AnnData the result was computed on (default: the model's); its ``obs_names``
            must match ``cell_name``.
        covariate
            Covariate column(s) to summarise (default: all with LFCs, or all).
        n_top_genes
            Genes kept per (group, covariate), ranked by ``|lfc_mean|``; None keeps all.
        interval
            Quantiles of the per-cell mean LFCs over the group's cells (``lfc_lower``,
            ``lfc_upper``: how much the effect varies within the group).
        padj_threshold
            Cells with ``padj`` below it count as significant.
        max_cells_per_group, seed
            The interval uses at most this many (seeded, random) cells of a group.

        Returns
        -------
        DataFrame, one row per (group, covariate, gene) with ``rank``, ``lfc_mean``,
        ``lfc_lower``, ``lfc_upper``, ``lfc_std_mean`` (mean posterior sd), ``pde_mean``, and
        per (group, covariate) ``n_cells``, ``effect_size_mean``, ``frac_significant``. Without
        LFCs in the result, one row per (group, covariate) without the gene columns.
        """
        adata = self.adata if adata is None else adata
        if groupby not in adata.obs:
            raise ValueError(
                f"groupby key {groupby!r} is not a column of adata.obs (columns: {list(adata.obs.columns)})."
            )
        obs = adata.obs.reindex(pd.Index(np.asarray(de_result["cell_name"].values)))
        if obs[groupby].isna().any():
            raise ValueError(
                "de_result's cell names are not all in adata.obs_names (or the groupby column has missing values); "
                "pass the AnnData the result was computed on."
            )
        return de.group_summary(
            de_result, obs[groupby], covariates=None if covariate is None else _as_list(covariate, "covariate"),
            n_top_genes=n_top_genes, interval=interval, padj_threshold=padj_threshold,
            max_cells_per_group=max_cells_per_group, seed=seed,
        )
