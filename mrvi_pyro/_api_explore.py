"""Facade methods of :class:`mrvi_pyro.MRVI` for exploratory analysis: counterfactual sample
representations, local sample distances and their stratification.

The methods marshal arguments and wrap results (xarray/pandas); the maths lives in
:mod:`mrvi_pyro.explore`. They rely on the facade's ``module``, ``registry``, ``sample_info``,
``_cell_data(adata)`` and ``_indices(data, indices)``.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import xarray as xr
from anndata import AnnData

from . import distributed, explore
from ._safe_io import StagedPath, zarr_replaceable
from ._storage import partitioned_cell_arrays
from .data import category_levels


def _group_codes(adata: AnnData, key: str) -> tuple[np.ndarray, list]:
    """Codes (n_obs,) and category values of the obs column ``key`` (categorical order when
    categorical, else sorted)."""
    if not isinstance(key, str) or key not in adata.obs:
        raise ValueError(
            f"groupby key {key!r} is not a column of adata.obs (columns: {list(adata.obs.columns)})."
        )
    column = adata.obs[key]
    if column.isna().any():
        raise ValueError(
            f"groupby key {key!r} has {int(column.isna().sum())} missing value(s); fill them or drop those cells."
        )
    categories = category_levels(column)
    codes = pd.Categorical(column.to_numpy(), categories=categories).codes.astype(np.int64)
    return codes, categories


def _check_sample_level(info: pd.DataFrame, key: str, sample_key: str) -> None:
    """Refuse ``key`` unless it is a sample-level covariate (a column of ``sample_info`` other than
    the sample key and ``n_cells``)."""
    if key not in info.columns or key in (sample_key, "n_cells"):
        candidates = [c for c in info.columns if c not in (sample_key, "n_cells")]
        raise ValueError(
            f"{key!r} is not a sample-level covariate (an obs column constant within every sample); "
            f"the sample-level columns are {candidates}."
        )


WRITTEN_BY = "mrvi_pyro.cluster_cells_by_sample_distances"
"""Tag in ``adata.uns[key_added]`` marking an obs column as written (and replaceable) by us."""


def _check_key_added(adata: AnnData, key: str, registry) -> None:
    """Refuse a ``key_added`` that would overwrite a column the user (or the registry) owns."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"key_added must be a non-empty string or None; got {key!r}.")
    registered = {registry.sample_key, registry.batch_key, registry.labels_key} - {None}
    if key in registered:
        raise ValueError(f"key_added={key!r} is a column the model was set up with; choose another name.")
    previous = adata.uns.get(key)
    ours = isinstance(previous, dict) and previous.get("written_by") == WRITTEN_BY
    if (key in adata.obs or key in adata.uns) and not ours:
        raise ValueError(
            f"key_added={key!r} would overwrite an existing obs column or uns entry that mrvi_pyro did not "
            "write; choose another name (or key_added=None to write nothing)."
        )


def _groupby_keys(groupby: str | Sequence[str] | None) -> list[str]:
    if groupby is None:
        return []
    keys = [groupby] if isinstance(groupby, str) else list(groupby)
    duplicated = sorted({k for k in keys if keys.count(k) > 1})
    if duplicated:
        raise ValueError(f"groupby lists {duplicated} more than once; give each key once.")
    if "cell" in keys:
        raise ValueError("groupby key 'cell' clashes with the per-cell variable 'cell'; rename that obs column.")
    return keys


def _warn_missing_samples(data, indices: np.ndarray, sample_names: list, stacklevel: int = 3) -> None:
    present = np.bincount(data.sample_index[indices], minlength=len(sample_names)) > 0
    missing = [s for s, ok in zip(sample_names, present) if not ok]
    if missing:
        warnings.warn(
            f"Sample(s) {missing} have no cells among the cells analysed. Their counterfactual "
            "representations are still computed for every cell (the model knows all its samples), "
            "so they appear in the sample dimensions.",
            UserWarning,
            stacklevel=stacklevel,
        )


class ExploreMixin:
    """Methods of :class:`mrvi_pyro.MRVI` for exploratory analysis: counterfactual sample
    representations, local sample distances and their stratification."""

    def get_local_sample_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int = 256,
        use_mean: bool = True,
        use_vmap: str | bool = "auto",
        *,
        mc_samples: int = 10,
        seed: int = 0,
    ) -> xr.DataArray:
        """Counterfactual representations ``z_n^(s)`` of every cell under every sample.

        All samples are one tensor dimension and share one ``u`` per cell (paired): the
        posterior mean, or with ``use_mean=False`` the same posterior draw for all samples.

        Parameters
        ----------
        adata
            AnnData with the model's genes (default: the model's AnnData). Not modified.
        indices
            Cells to use (default: all).
        batch_size
            Cells per chunk.
        use_mean
            Use the posterior mean of ``u``; False uses ``mc_samples`` paired draws.
        use_vmap
            Accepted for compatibility with scvi-tools and ignored (samples are always a
            tensor dimension).
        mc_samples
            Number of posterior draws when ``use_mean`` is False.
        seed
            Seed of the posterior draws.

        Returns
        -------
        xarray.DataArray ``(cell_name, sample, latent_dim)``, or
        ``(cell_name, mc_sample, sample, latent_dim)`` when ``use_mean`` is False. It holds
        n_cells x S x L floats in memory (chunk over ``indices`` for very large data).
        """
        explore.check_use_vmap(use_vmap)
        explore.check_positive("batch_size", batch_size)
        data = self._cell_data(adata)
        idx = self._indices(data, indices)
        samples = list(self.registry.sample_categories)
        _warn_missing_samples(data, idx, samples)
        blocks = [
            z.cpu().numpy()
            for _, z in explore.iter_local_sample_representations(
                self.module, data, idx, batch_size=batch_size, use_mean=use_mean, mc_samples=mc_samples, seed=seed
            )
        ]
        n_latent = self.module.config["n_latent"]
        cell_names = np.asarray(data.obs_names[idx])
        if use_mean:
            values = np.concatenate(blocks) if blocks else np.zeros((0, len(samples), n_latent), np.float32)
            dims = ["cell_name", "sample", "latent_dim"]
        else:
            values = (
                np.concatenate(blocks, axis=1).transpose(1, 0, 2, 3)
                if blocks
                else np.zeros((0, mc_samples, len(samples), n_latent), np.float32)
            )
            dims = ["cell_name", "mc_sample", "sample", "latent_dim"]
        coords = {"cell_name": cell_names, "sample": samples, "latent_dim": np.arange(n_latent)}
        if not use_mean:
            coords["mc_sample"] = np.arange(mc_samples)
        return xr.DataArray(values, dims=dims, coords=coords, name="sample_representations")

    def get_sample_effect_shares(
        self,
        sample_covariates: str | Sequence[str] | None = None,
        adata: AnnData | None = None,
        *,
        groupby: str | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int = 256,
    ) -> pd.DataFrame:
        """How much of the sample effects each sample-level covariate explains, and the batch.

        A check of what the sample distances are made of. For every cell, its counterfactual
        ``z`` under every sample (:meth:`get_local_sample_representation`, posterior mean of
        ``u``) is centred over the samples: these are the cell's sample effects, the raw
        material of :meth:`get_local_sample_distances`. For each covariate, the share of their
        sum of squares that a regression on it (with an intercept) explains is pooled over the
        cells of each group.

        The nuisance key (batch) is always included when it has two or more levels, as each
        sample's share of cells per level. Batch effects belong in the decoder's nuisance path,
        not in the sample effects. A batch share well above ``chance`` means the sample
        distances follow batch: samples of one batch look alike whatever their biology. Train
        longer, or read the distances within batches.

        Parameters
        ----------
        sample_covariates
            obs key(s) constant within every sample (columns of :attr:`sample_info`).
        adata
            AnnData with the model's genes (default: the model's AnnData). Not modified.
        groupby
            Optional obs key of cell-level categories (e.g. cell type): one row per group and
            covariate, plus the group ``"all"``.
        indices
            Cells to use (default: all).
        batch_size
            Cells per chunk.

        Returns
        -------
        pandas.DataFrame with columns ``group``, ``covariate``, ``share`` (explained over total
        sum of squares), ``chance`` (``p / (S - 1)`` for a covariate with ``p`` design columns:
        the expected share when the effects have nothing to do with it), ``n_cells``.
        """
        keys = [sample_covariates] if isinstance(sample_covariates, str) else list(sample_covariates or [])
        data = self._cell_data(adata)
        idx = self._indices(data, indices)
        explore.check_positive("batch_size", batch_size)
        info = self.sample_info
        n_samples = len(info)
        if n_samples < 3:
            raise ValueError(f"Sample effect shares need at least 3 samples; the model has {n_samples}.")
        from .de import design_matrix
        from .train import sample_batch_composition

        names, projections, n_columns = [], [], []
        registry = self.registry
        # Each sample's share of cells per nuisance level (the model's AnnData, else the one
        # passed): an indicator when every sample sits in one level; None without two levels.
        shares = sample_batch_composition(self._cell_data(None) if self.adata is not None else data)
        if shares is not None:
            names.append(registry.batch_key)
            projections.append(explore.centred_projection(shares))
            n_columns.append(explore.centred_rank(shares))
        for key in keys:
            if key == registry.batch_key:
                continue
            _check_sample_level(info, key, registry.sample_key)
            design = design_matrix(info[[key]], [key])
            columns = design.matrix[:, design.covariate_columns]
            names.append(key)
            projections.append(explore.centred_projection(columns))
            n_columns.append(explore.centred_rank(columns))
        if not names:
            raise ValueError("No covariate to assess: pass sample_covariates (the model has no nuisance key).")
        codes, groups = _group_codes(self.adata if adata is None else adata, groupby) if groupby else (None, [])
        n_groups = len(groups) + 1  # the last one is "all"
        total = np.zeros(n_groups)
        explained = np.zeros((n_groups, len(names)))
        cells = np.zeros(n_groups, dtype=np.int64)
        stacked = torch.as_tensor(np.stack(projections), dtype=torch.float32)
        for chunk, z in explore.iter_local_sample_representations(self.module, data, idx, batch_size=batch_size):
            t, e = explore.effect_sums(z.float(), stacked.to(z.device))
            t, e = t.double().cpu().numpy(), e.double().cpu().numpy()
            for target in ([codes[chunk]] if groups else []) + [np.full(len(chunk), n_groups - 1)]:
                np.add.at(total, target, t)
                np.add.at(explained, target, e)
                np.add.at(cells, target, 1)
        rows = []
        labels = [str(g) for g in groups] + ["all"]
        for g, label in enumerate(labels):
            if cells[g] == 0:
                continue
            for k, name in enumerate(names):
                rows.append({
                    "group": label, "covariate": name,
                    "share": explained[g, k] / total[g] if total[g] > 0 else float("nan"),
                    "chance": n_columns[k] / (n_samples - 1), "n_cells": int(cells[g]),
                })
        return pd.DataFrame(rows)

    def get_sample_mixing_in_u(
        self,
        sample_covariates: str | Sequence[str] | None = None,
        adata: AnnData | None = None,
        *,
        groupby: str | None = None,
        indices: Sequence[int] | None = None,
        n_neighbors: int = 15,
        max_cells: int = 5000,
        threshold: float = 0.5,
        seed: int = 0,
        warn: bool = True,
    ) -> pd.DataFrame:
        """How well the samples, the batch and each sample-level covariate mix in ``u``.

        ``u`` is meant to be the cell state *without* the sample: the sample effects belong in
        ``f(u, s)``, where the counterfactual distances, DE and DA read them. An effect that
        training left in ``u`` is invisible to all three. This happens: on small cohorts about
        one initialisation in five (ours and scvi-tools' alike, ``benchmarks/README.md``, stop
        31) keeps a strong disease effect of one cell type in ``u``; the type's sample distances
        then miss the disease split. This check finds such a case from the fitted model alone.

        For each group of cells (the categories of ``groupby``, and ``"all"``), every cell's
        ``n_neighbors`` nearest other cells in ``u`` (posterior mean, Euclidean) are found, and
        for each covariate the share of them with the cell's own value is averaged
        (``agreement``). ``chance`` is that share when the values are shuffled among the cells,
        and ``excess = (agreement - chance) / (1 - chance)`` is 0 when the covariate mixes as by
        chance and 1 when it separates the cells completely. A row with ``excess >= threshold``
        is ``kept`` in ``u`` (and, with ``warn``, a ``UserWarning`` names it).

        Some excess is expected and harmless: cell states that are more frequent in some
        samples (differential abundance) are legitimately more often neighbours. Measured on
        the tutorials' cohort (:func:`mrvi_pyro.datasets.simulate`, 3,000 cells, 12 samples,
        60 epochs at batch 128), the initialisation that kept the disease effect of ``type_0``
        in ``u`` scored 1.00 there. The disease scored -0.02 to 0.04 in every cell type of the
        seven other initialisations, and the sample, batch and disease rows within each cell
        type of eight fits on two more cohorts (simulation seeds 1 and 2) scored -0.02 to 0.08.
        The default threshold sits between. Partial retention scores in between: the shared
        test model (2,000 cells, 60 epochs at batch 256) keeps its hidden grouping at 0.86.

        If a covariate is kept in ``u``: retrain from another initialisation
        (``MRVI(adata, seed=...)``), or longer, and compare; a fit that mixes it is the one
        whose sample distances, DE and DA see its effect.

        Parameters
        ----------
        sample_covariates
            obs key(s) constant within every sample (columns of :attr:`sample_info`). Each
            distinct value is a level (a numeric covariate with one value per sample amounts to
            the sample itself). The sample key is always assessed, and the nuisance key (batch)
            too when it has two or more levels.
        adata
            AnnData with the model's genes (default: the model's AnnData). Not modified.
        groupby
            Optional obs key of cell-level categories (e.g. cell type): one set of rows per group.
        indices
            Cells to use (default: all).
        n_neighbors
            Neighbours per cell.
        max_cells
            At most this many cells per group (a seeded random subset) enter the neighbour search.
        threshold
            ``excess`` from which a row is flagged ``kept``, in (0, 1].
        seed
            Seed of the subsets.
        warn
            Whether to warn about the flagged rows.

        Returns
        -------
        pandas.DataFrame with columns ``group``, ``covariate``, ``agreement``, ``chance``,
        ``excess``, ``kept`` and ``n_cells`` (cells entering the search). A group with too few
        cells for ``n_neighbors``, or a covariate with one level in the group, gets NaN and is
        never ``kept``.
        """
        n_neighbors = explore.check_positive("n_neighbors", n_neighbors)
        max_cells = explore.check_positive("max_cells", max_cells)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
            raise ValueError(f"threshold must be a number in (0, 1]; got {threshold!r}.")
        keys = [sample_covariates] if isinstance(sample_covariates, str) else list(sample_covariates or [])
        data = self._cell_data(adata)
        idx = self._indices(data, indices)
        registry, info = self.registry, self.sample_info
        levels = {registry.sample_key: data.sample_index[idx]}
        if registry.batch_key is not None and len(np.unique(data.batch_index[idx])) > 1:
            levels[registry.batch_key] = data.batch_index[idx]
        for key in keys:
            if key in levels:
                continue
            _check_sample_level(info, key, registry.sample_key)
            if info[key].isna().any():
                missing = list(info.index[info[key].isna().to_numpy()][:5])
                raise ValueError(f"Sample-level covariate {key!r} is missing for sample(s) {missing}; fill it "
                                 "(or drop those samples' cells) to assess how it mixes in u.")
            levels[key] = pd.factorize(info[key].to_numpy())[0][data.sample_index[idx]]
        codes, groups = (
            _group_codes(self.adata if adata is None else adata, groupby) if groupby else (None, [])
        )
        u = self.get_latent_representation(adata, indices=idx)
        rng = np.random.default_rng(seed)
        members = [np.flatnonzero(codes[idx] == g) for g in range(len(groups))] + [np.arange(len(idx))]
        rows = []
        for label, cells in zip([str(g) for g in groups] + ["all"], members):
            if len(cells) > max_cells:
                cells = np.sort(rng.choice(cells, max_cells, replace=False))
            neighbours = explore.nearest_neighbours(u[cells], n_neighbors) if len(cells) > n_neighbors else None
            for name, values in levels.items():
                values = values[cells]
                agreement = chance = float("nan")
                if neighbours is not None and len(np.unique(values)) > 1:
                    chance = explore.chance_agreement(values)
                    agreement = explore.label_agreement(neighbours, values)
                excess = (agreement - chance) / (1.0 - chance) if chance < 1 else float("nan")
                rows.append({"group": label, "covariate": name, "agreement": agreement, "chance": chance,
                             "excess": excess, "kept": bool(excess >= threshold), "n_cells": int(len(cells))})
        table = pd.DataFrame(rows)
        flagged = table[table["kept"]]
        if warn and len(flagged):
            listed = "; ".join(
                f"{row.covariate} in {row.group} (agreement {row.agreement:.2f}, chance {row.chance:.2f})"
                for row in flagged.head(5).itertuples()
            )
            more = f" and {len(flagged) - 5} more" if len(flagged) > 5 else ""
            warnings.warn(
                f"Sample structure kept in u: {listed}{more}. u should not separate cells by sample-level "
                "covariates; an effect kept there is invisible to the sample distances, DE and DA of those "
                "cells. Retrain from another initialisation (MRVI(adata, seed=...)) or longer and compare.",
                UserWarning,
                stacklevel=2,
            )
        return table

    def get_local_sample_distances(
        self,
        adata: AnnData | None = None,
        batch_size: int = 256,
        use_mean: bool = True,
        normalize_distances: bool = False,
        use_vmap: str | bool = "auto",
        groupby: str | Sequence[str] | None = None,
        keep_cell: bool = True,
        norm: str = "l2",
        mc_samples: int = 10,
        *,
        indices: Sequence[int] | None = None,
        max_in_memory_gb: float = 2.0,
        zarr_path: str | os.PathLike | None = None,
        overwrite: bool = False,
        seed: int = 0,
    ) -> xr.Dataset:
        """Local (per-cell) distances between samples, streamed chunk by chunk.

        For every cell, ``D[s, s'] = ||z^(s) - z^(s')||`` between its counterfactual
        representations under samples ``s`` and ``s'`` (see :mod:`mrvi_pyro.explore` for the
        formulas). Group means are accumulated chunk by chunk, so memory is
        O(batch_size x S^2 + groups x S^2) whatever the number of cells.

        Parameters
        ----------
        adata
            AnnData with the model's genes (default: the model's AnnData). Not modified. A
            subset with some samples missing works (a ``UserWarning`` names those samples; they
            stay in the sample dimensions because every cell has a counterfactual under them).
        batch_size
            Cells per chunk.
        use_mean
            Use the posterior mean of ``u``. False averages the distances over
            ``mc_samples`` posterior draws of ``u``, each shared by all samples of a cell.
        normalize_distances
            Z-score each cell's distances against the spread of its own-sample posterior:
            ``(D - mu_n) / sigma_n`` where ``mu_n`` and ``sigma_n`` are the mean and sd over
            ``mc_samples`` pairs of independent draws of the distance between two draws of the
            cell's ``z`` under its own sample (same norm). Works with ``use_mean`` True (D from
            the posterior mean) or False (D averaged over draws). The diagonal is then
            ``-mu_n / sigma_n``.
        use_vmap
            Accepted for compatibility with scvi-tools and ignored (samples are always a tensor
            dimension).
        groupby
            obs key(s) of cell-level categories; each adds a variable ``"<key>"`` with dims
            ``("<key>_name", "sample_x", "sample_y")``: the mean matrix over the group's cells
            (coordinate ``"<key>_n_cells"`` holds the cell counts).
        keep_cell
            Return the per-cell matrices as ``"cell"`` ``(cell_name, sample_x, sample_y)``.
            ``keep_cell=False`` requires ``groupby``.
        norm
            ``"l2"``, ``"l1"`` or ``"linf"``.
        mc_samples
            Posterior draws (``use_mean=False``) and baseline pairs (``normalize_distances``).
        indices
            Cells to use (default: all).
        max_in_memory_gb
            Memory budget in GB (1e9 bytes). When the per-cell float32 tensor (n_cells x S^2 x 4
            bytes) and one chunk do not fit it, ``"cell"`` is written chunk by chunk to a zarr
            store and returned lazily (never assembled in RAM). A budget too small for one chunk
            is a ``ValueError``.
        zarr_path
            Directory of the zarr store (needs ``keep_cell=True``). Given, the per-cell
            distances (and the group means) are always written there and returned lazily. The
            store is written beside it and renamed into place when complete, so an interrupted
            run leaves ``zarr_path`` as it was. If None and the budget forces the store, a new temporary
            directory is used (a ``UserWarning`` gives its path; delete it when done).
            :func:`mrvi_pyro.explore.open_distance_store` reopens a store.
        overwrite
            Replace an existing non-empty ``zarr_path`` (only if it is a zarr store; anything
            else is refused). False (default): an existing non-empty ``zarr_path`` is a
            ``ValueError``.
        seed
            Seed of the posterior draws (reproducible for a given ``batch_size``).

        Returns
        -------
        xarray.Dataset with ``"cell"`` (when ``keep_cell``) and one variable per ``groupby`` key,
        float32. Matrices are symmetric with a zero diagonal (unless normalised). Attributes
        record the options; ``attrs["zarr_path"]`` the store when one was written.

        Inside a distributed launch (``torchrun`` or :func:`mrvi_pyro.distributed.launch`) every
        rank computes a contiguous share of the cells, with group sums all-reduced and per-cell
        matrices written by each rank into its own chunks of the zarr store; rank 0 returns the
        whole result, identical to one process, and the other ranks return None.
        """
        explore.check_use_vmap(use_vmap)
        keys = _groupby_keys(groupby)
        if not keep_cell and not keys:
            raise ValueError(
                "keep_cell=False without groupby computes nothing; pass groupby=<obs key> or keep_cell=True."
            )
        if zarr_path is not None and not keep_cell:
            raise ValueError(
                "zarr_path stores the per-cell distances, and keep_cell=False keeps none; "
                "drop zarr_path or set keep_cell=True."
            )
        explore.check_norm(norm)
        explore.check_positive("batch_size", batch_size)
        staged = None
        if zarr_path is not None:  # before any work: refuse a taken target now, not after the run
            staged = StagedPath(zarr_path, overwrite=overwrite, what="zarr_path", replaceable=zarr_replaceable)
        adata = self.adata if adata is None else adata
        data = self._cell_data(adata)
        idx = self._indices(data, indices)
        samples = [str(s) for s in self.registry.sample_categories]
        groupings, categories = {}, {}
        for key in keys:
            codes, cats = _group_codes(adata, key)
            groupings[key], categories[key] = (codes, len(cats)), cats
        n_samples, n_latent = len(samples), self.module.config["n_latent"]
        partition = distributed.CellPartition.current(  # all cells in one process
            len(idx), batch_size, module=self.module, data=data, arguments={
                "analysis": "distances", "cells": idx, "groupby": keys, "keep_cell": keep_cell, "use_mean": use_mean,
                "normalize": normalize_distances, "norm": norm, "mc_samples": mc_samples, "seed": seed,
                "zarr_path": None if zarr_path is None else os.fspath(zarr_path)})
        storage = explore.plan_cell_storage(
            len(idx), n_samples, n_latent, batch_size=batch_size,
            n_groups=sum(len(c) for c in categories.values()), keep_cell=keep_cell,
            max_in_memory_gb=max_in_memory_gb, zarr_path=zarr_path,
        )
        if storage == "zarr" and zarr_path is None:
            zarr_path = partition.broadcast(
                Path(tempfile.mkdtemp(prefix="mrvi_pyro_distances_")) / "distances.zarr" if partition.is_main else None
            )
        if storage == "zarr" and staged is None and partition.is_main:
            warnings.warn(
                f"The per-cell distances ({4 * len(idx) * n_samples**2 / 1e9:.3g} GB) exceed "
                f"max_in_memory_gb={max_in_memory_gb}; they are written to {zarr_path} and returned lazily. "
                "Delete that folder when you no longer need them, or pass zarr_path= to choose it.",
                UserWarning,
                stacklevel=2,
            )
        _warn_missing_samples(data, idx, samples)
        cell_names = np.asarray(data.obs_names[idx], dtype=object)
        variables = {"cell": (("cell_name", "sample_x", "sample_y"), (len(idx), n_samples, n_samples))}
        coords = {"cell_name": cell_names, "sample_x": samples, "sample_y": samples}
        sink = None
        try:
            if storage is not None:  # this rank's cells in memory; in zarr, its chunks of rank 0's store
                sink = partitioned_cell_arrays(
                    variables, coords, partition, zarr_path=None if storage == "memory" else (
                        zarr_path if staged is None else staged.staging), chunk_cells=batch_size, fill_value=None)
            result = explore.local_sample_distances(
                self.module, data, idx, groupings=groupings, cell_sink=sink, batch_size=batch_size,
                use_mean=use_mean, mc_samples=mc_samples, normalize=normalize_distances, norm=norm, seed=seed,
                partition=partition,
            )
            if storage == "memory":
                sink = sink.gathered(partition)  # all cells on rank 0, None on the others
            partition.barrier()
        except BaseException:
            if staged is not None:
                staged.discard()
            raise
        if not partition.is_main:
            return None
        groups = xr.Dataset(coords={"sample_x": samples, "sample_y": samples})
        for key in keys:
            counts = result.group_counts[key]
            keep = counts > 0
            name = f"{key}_name"
            groups[key] = xr.DataArray(
                result.groups[key][keep], dims=[name, "sample_x", "sample_y"],
                coords={name: np.asarray(categories[key], dtype=object)[keep], f"{key}_n_cells": (name, counts[keep]),
                        "sample_x": samples, "sample_y": samples},
            )
        attrs = {"norm": norm, "use_mean": int(use_mean), "normalize_distances": int(normalize_distances),
                 "mc_samples": int(mc_samples), "seed": int(seed)}
        if storage == "zarr":
            if keys:
                sink.add_variables(groups)
            if staged is not None:
                staged.commit()
            stored = explore.open_distance_store(zarr_path)[["cell"]]
            ds = xr.merge([stored, groups], combine_attrs="drop")
            ds = ds.assign_coords(cell_name=cell_names, sample_x=samples, sample_y=samples)
            attrs["zarr_path"] = os.fspath(zarr_path)
        else:
            ds = groups
            if storage == "memory":
                ds = sink.to_dataset().merge(groups)
        ds.attrs.update(attrs)
        return ds

    def cluster_cells_by_sample_distances(
        self,
        adata: AnnData | None = None,
        n_clusters: int = 5,
        n_sample_clusters: int = 2,
        distances: xr.Dataset | xr.DataArray | None = None,
        *,
        batch_size: int = 256,
        use_mean: bool = True,
        normalize_distances: bool = False,
        norm: str = "l2",
        mc_samples: int = 10,
        n_components: int = 10,
        sketch_dim: int = 128,
        linkage_method: str = "average",
        key_added: str | None = "mrvi_cell_cluster",
        seed: int = 0,
    ) -> xr.Dataset:
        """Stratify cells by how samples differ in them, then cluster samples per stratum.

        1. Each cell's (S, S) distance matrix is reduced to its condensed upper triangle
           (sketched by a seeded random projection to ``sketch_dim`` values when longer),
           projected on ``n_components`` principal components and clustered by k-means into
           ``n_clusters`` cell clusters.
        2. The matrices are averaged within each cell cluster (a second streamed pass).
        3. Samples are clustered hierarchically per cell cluster (scipy ``linkage`` with
           ``linkage_method`` and optimal leaf ordering) and the tree is cut into
           ``n_sample_clusters`` groups.

        Distances are streamed (never held per cell) unless ``distances`` is given.

        Parameters
        ----------
        adata
            AnnData with the model's genes (default: the model's AnnData).
        n_clusters
            Number of cell clusters.
        n_sample_clusters
            Number of sample groups per cell cluster.
        distances
            Optional precomputed result of :meth:`get_local_sample_distances` (with ``"cell"``,
            in memory or lazily on disk) for exactly the cells of ``adata``; read in blocks.
        batch_size, use_mean, normalize_distances, norm, mc_samples, seed
            As in :meth:`get_local_sample_distances` (when ``distances`` is None); ``seed``
            also seeds the projection and k-means.
        n_components, sketch_dim
            Principal components for k-means; length of the random sketch of the triangles.
        linkage_method
            Linkage method: ``"average"`` (default), ``"complete"``, ``"single"`` or ``"weighted"``.
        key_added
            Where to write the results into ``adata`` (None: write nothing).
            Writes ``adata.obs[key_added]`` (categorical cell cluster labels ``"0"``, ``"1"``...)
            and ``adata.uns[key_added]``: a dict with ``"distances"`` (n_clusters, S, S) mean
            matrices, ``"samples"``, ``"clusters"``, ``"n_cells"``, ``"sample_clusters"``
            (n_clusters, S), ``"linkage"`` (n_clusters, S-1, 4), ``"leaf_order"`` and
            ``"params"``: the sample-level view downstream tools read. An existing obs column
            of that name is only replaced when an earlier call wrote it (``adata.uns[key_added]``
            records that); any other column, and the registered sample, nuisance and label
            columns, are refused with a ``ValueError`` before any work.

        Returns
        -------
        xarray.Dataset with ``cell_cluster`` (cell_name), ``distances`` (cluster, sample_x,
        sample_y), ``n_cells`` (cluster), ``sample_cluster`` (cluster, sample; labels
        1..n_sample_clusters), ``linkage`` (cluster, merge, linkage_field; scipy's format, for
        :func:`scipy.cluster.hierarchy.dendrogram`) and ``leaf_order`` (cluster, leaf; sample
        indices in dendrogram order).
        """
        adata = self.adata if adata is None else adata
        if key_added is not None:
            _check_key_added(adata, key_added, self.registry)
        explore.check_positive("batch_size", batch_size)
        data = self._cell_data(adata)
        samples = [str(s) for s in self.registry.sample_categories]
        n_samples = len(samples)
        idx = np.arange(len(data))
        if distances is not None:
            cell = distances["cell"] if isinstance(distances, xr.Dataset) else distances
            if not isinstance(cell, xr.DataArray) or tuple(cell.dims) != ("cell_name", "sample_x", "sample_y"):
                raise ValueError(
                    "distances must be the Dataset of get_local_sample_distances(keep_cell=True) or its "
                    "'cell' DataArray with dims (cell_name, sample_x, sample_y)."
                )
            if [str(c) for c in cell["cell_name"].values] != [str(c) for c in data.obs_names]:
                raise ValueError("distances must hold exactly the cells of adata, in the same order.")
            if [str(s) for s in cell["sample_x"].values] != samples:
                raise ValueError("distances must have the model's samples in the registry order.")

            def blocks():
                return (block for _, block in explore.iter_cell_blocks(cell, batch_size))
        else:
            explore.check_norm(norm)

            def blocks():
                return (
                    dist.cpu().numpy()
                    for _, dist in explore.iter_local_sample_distances(
                        self.module, data, idx, batch_size=batch_size, use_mean=use_mean, mc_samples=mc_samples,
                        normalize=normalize_distances, norm=norm, seed=seed,
                    )
                )

        _warn_missing_samples(data, idx, samples)
        features = explore.distance_features(blocks(), n_samples, sketch_dim=sketch_dim, seed=seed)
        labels = explore.cluster_cells(features, n_clusters, n_components=n_components, seed=seed)
        means = explore.GroupedMean(labels, n_clusters, n_samples)
        start = 0
        for block in blocks():
            means.add(idx[start : start + len(block)], _as_tensor(block))
            start += len(block)
        matrices = means.mean()
        counts = means.counts.numpy().astype(np.int64)
        linkages, groups, orders = explore.stratify_samples(matrices, n_sample_clusters, linkage_method)
        clusters = [str(k) for k in range(n_clusters)]
        ds = xr.Dataset(
            {
                "cell_cluster": ("cell_name", labels),
                "distances": (("cluster", "sample_x", "sample_y"), matrices),
                "n_cells": ("cluster", counts),
                "sample_cluster": (("cluster", "sample"), groups),
                "linkage": (("cluster", "merge", "linkage_field"), linkages),
                "leaf_order": (("cluster", "leaf"), orders),
            },
            coords={
                "cell_name": np.asarray(data.obs_names, dtype=object), "cluster": clusters, "sample": samples,
                "sample_x": samples, "sample_y": samples, "linkage_field": ["left", "right", "distance", "size"],
            },
            attrs={"norm": norm, "linkage_method": linkage_method, "n_sample_clusters": int(n_sample_clusters),
                   "seed": int(seed)},
        )
        if key_added is not None:
            adata.obs[key_added] = pd.Categorical.from_codes(labels, categories=clusters)
            adata.uns[key_added] = {
                "distances": matrices, "samples": samples, "clusters": clusters, "n_cells": counts,
                "sample_clusters": groups, "linkage": linkages, "leaf_order": orders, "written_by": WRITTEN_BY,
                "params": {"n_clusters": int(n_clusters), "n_sample_clusters": int(n_sample_clusters),
                           "linkage_method": linkage_method, "norm": norm, "use_mean": bool(use_mean),
                           "normalize_distances": bool(normalize_distances), "precomputed": distances is not None},
            }
        return ds


def _as_tensor(block: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(block))
