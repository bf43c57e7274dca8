"""Data registration and minibatches.

:func:`setup_anndata` validates an AnnData of raw counts and records a *registry* (which obs
columns hold the sample, nuisance and label annotations, their category orders, the layer and
the genes) as a JSON string in ``adata.uns["_mrvi_pyro"]``. That is the only thing it writes.

:class:`CellData` reads minibatches from a dense, CSR or CSC matrix (``X`` or a layer, in memory
or backed) without densifying more than one minibatch at a time.

Backed counts (``anndata.read_h5ad(path, backed="r")``) are never loaded whole: a minibatch
reads its rows, sorted and de-duplicated, from the file. A CSR matrix in an .h5ad is read by
:class:`BackedCSRRows` with one HDF5 read per array (data, indices) per minibatch, from the
row offsets (``indptr``, 8 bytes per cell) kept in memory; :meth:`CellData.read_ahead` reads
the next minibatches in a worker process while the current one is used.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scipy import sparse

REGISTRY_KEY = "_mrvi_pyro"
NO_BATCH = "_no_batch_"
VALIDATION_ELEMENTS = 1 << 19
"""Entries per block when validating counts (bounds the temporary copies to a few MB)."""


@dataclass(frozen=True)
class Registry:
    """What :func:`setup_anndata` recorded: keys, category orders, layer and genes."""

    sample_key: str
    batch_key: str | None
    labels_key: str | None
    layer: str | None
    sample_categories: list
    batch_categories: list
    label_categories: list
    var_names: list

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> "Registry":
        return cls(**json.loads(text))

    def check_samples(self, names: list, argument: str = "sample_subset") -> None:
        """Raise ``ValueError`` naming any of ``names`` that is not a registered sample."""
        unknown = [s for s in names if s not in self.sample_categories]
        if unknown:
            known = self.sample_categories
            raise ValueError(
                f"{argument} has unknown sample(s) {unknown[:10]}; known samples of {self.sample_key!r}: "
                f"{known[:20]}{'...' if len(known) > 20 else ''}."
            )

    @property
    def n_samples(self) -> int:
        return len(self.sample_categories)

    @property
    def n_batches(self) -> int:
        return len(self.batch_categories)

    @property
    def n_labels(self) -> int:
        return len(self.label_categories)


def _count_matrix(adata: AnnData, layer: str | None):
    if layer is None:
        if adata.X is None:
            raise ValueError("adata.X is empty; pass `layer=` naming the layer that holds raw counts.")
        return adata.X
    if layer not in adata.layers:
        raise ValueError(f"Layer {layer!r} not found in adata.layers (available: {list(adata.layers)}).")
    return adata.layers[layer]


def _row_chunks(matrix, chunk: int | None = None) -> Iterator[np.ndarray | sparse.spmatrix]:
    if chunk is None:
        chunk = max(1, VALIDATION_ELEMENTS // max(1, matrix.shape[1]))
    for start in range(0, matrix.shape[0], chunk):
        yield matrix[start : start + chunk]


def validate_counts(matrix, where: str = "adata.X", check: bool = True) -> tuple:
    """Raise ``ValueError`` unless ``matrix`` holds finite, non-negative integer counts and no
    cell has zero total counts. Works chunk by chunk on dense, sparse and backed matrices.

    Returns a cheap fingerprint of the values, computed in the same pass: the shape and, in
    float64, the total, the sum of squares and the sums weighted by row and by column position.
    Any in-place normalisation or transformation changes it. ``check=False`` only fingerprints.
    """
    n_zero = 0
    n_genes = matrix.shape[1]
    column_weights = np.arange(1, n_genes + 1, dtype=np.float64)
    total = squares = by_row = by_column = 0.0
    start = 0
    for block in _row_chunks(matrix):
        if sparse.issparse(block) or hasattr(block, "toarray") and not isinstance(block, np.ndarray):
            block = sparse.csr_matrix(block)
            values = block.data
            totals = np.asarray(block.sum(axis=1, dtype=np.float64)).ravel()
            column_sums = np.bincount(block.indices, weights=values.astype(np.float64), minlength=n_genes)
        else:
            values = np.asarray(block)
            totals = values.sum(axis=1, dtype=np.float64) if values.dtype.kind in "biuf" else None
            column_sums = values.sum(axis=0, dtype=np.float64) if totals is not None else None
        if not np.issubdtype(values.dtype, np.number) or values.dtype.kind == "c":
            raise ValueError(f"{where} must be numeric counts, got dtype {values.dtype}.")
        total += float(totals.sum())
        squares += float(np.square(values, dtype=np.float64).sum())
        by_row += float(totals @ np.arange(start + 1, start + len(totals) + 1, dtype=np.float64))
        by_column += float(column_sums @ column_weights)
        start += len(totals)
        if not check:
            continue
        if not np.all(np.isfinite(values)):
            raise ValueError(f"{where} contains NaN or infinite values; MrVI needs raw counts.")
        if np.any(values < 0):
            raise ValueError(f"{where} contains negative values; MrVI needs raw (non-negative) counts.")
        if np.any(values != np.round(values)):
            raise ValueError(
                f"{where} contains non-integer values; MrVI needs raw counts, not normalised or "
                "log-transformed data (use `layer=` to point at the raw counts)."
            )
        n_zero += int(np.sum(totals == 0))
    if check and n_zero:
        raise ValueError(
            f"{n_zero} cell(s) have zero total counts in {where}; remove them first, e.g. "
            "`adata = adata[adata.X.sum(1) > 0].copy()` or `sc.pp.filter_cells(adata, min_counts=1)`."
        )
    return (tuple(matrix.shape), total, squares, by_row, by_column)


def category_levels(values: pd.Series) -> list:
    """The levels of a column, in the one order every part of mrvi_pyro uses: the category order
    of a categorical (only the categories present), else the distinct values sorted as text."""
    if isinstance(values.dtype, pd.CategoricalDtype):
        present = set(values.unique())
        return [c for c in values.cat.categories if c in present]
    return sorted(pd.unique(values).tolist(), key=str)


def _categories(adata: AnnData, key: str, role: str) -> list:
    if key not in adata.obs:
        raise ValueError(f"{role} {key!r} is not a column of adata.obs (columns: {list(adata.obs.columns)}).")
    column = adata.obs[key]
    if column.isna().any():
        raise ValueError(f"adata.obs[{key!r}] has {int(column.isna().sum())} missing value(s); fill or drop them.")
    values = category_levels(column)
    as_text = [str(v) for v in values]
    if len(set(as_text)) < len(as_text):
        clashes = [v for v in values if as_text.count(str(v)) > 1][:4]
        raise ValueError(
            f"adata.obs[{key!r}] has distinct values that read the same as text: "
            f"{', '.join(f'{v!r} ({type(v).__name__})' for v in clashes)}. MrVI identifies {role} levels by "
            f"their text, so these would be one level; make the column consistent first, e.g. "
            f"`adata.obs[{key!r}] = adata.obs[{key!r}].astype(str)`."
        )
    return values


def setup_anndata(
    adata: AnnData,
    sample_key: str,
    batch_key: str | None = None,
    labels_key: str | None = None,
    layer: str | None = None,
) -> None:
    """Validate ``adata`` and record the MrVI registry in ``adata.uns["_mrvi_pyro"]``.

    Parameters
    ----------
    adata
        Raw counts, cells x genes.
    sample_key
        obs column of the sample (the unit compared, e.g. donor). At least two samples.
    batch_key
        Optional obs column of a nuisance covariate (batch, site).
    labels_key
        Optional obs column of cell-type labels (label-guided prior).
    layer
        Layer holding the counts (default ``X``).

    Raises
    ------
    ValueError
        For a missing column, missing values, fewer than two samples, counts that are negative,
        non-integer, NaN or infinite, or cells with zero total counts.
    """
    if not isinstance(adata, AnnData):
        raise ValueError(f"Expected an AnnData, got {type(adata).__name__}.")
    samples = _categories(adata, sample_key, "sample_key")
    if len(samples) < 2:
        raise ValueError(
            f"adata.obs[{sample_key!r}] has {len(samples)} sample(s); MrVI compares samples and needs at least 2."
        )
    batches = _categories(adata, batch_key, "batch_key") if batch_key is not None else [NO_BATCH]
    labels = _categories(adata, labels_key, "labels_key") if labels_key is not None else []
    validate_counts(_count_matrix(adata, layer), f"adata.layers[{layer!r}]" if layer else "adata.X")
    registry = Registry(
        sample_key=sample_key,
        batch_key=batch_key,
        labels_key=labels_key,
        layer=layer,
        sample_categories=[str(s) for s in samples],
        batch_categories=[str(b) for b in batches],
        label_categories=[str(c) for c in labels],
        var_names=[str(v) for v in adata.var_names],
    )
    adata.uns[REGISTRY_KEY] = registry.to_json()


def get_registry(adata: AnnData) -> Registry:
    """The registry recorded by :func:`setup_anndata` (``ValueError`` if there is none)."""
    if REGISTRY_KEY not in adata.uns:
        raise ValueError("This AnnData was not set up; call `MRVI.setup_anndata(adata, sample_key=...)` first.")
    return Registry.from_json(adata.uns[REGISTRY_KEY])


def _codes(adata: AnnData, key: str | None, categories: list, role: str) -> np.ndarray:
    if key is None:
        return np.zeros(adata.n_obs, dtype=np.int64)
    if key not in adata.obs:
        raise ValueError(f"{role} {key!r} is not a column of adata.obs; the model was set up with it.")
    values = adata.obs[key].astype(str).to_numpy()
    lookup = {c: i for i, c in enumerate(categories)}
    codes = np.fromiter((lookup.get(v, -1) for v in values), dtype=np.int64, count=len(values))
    if np.any(codes < 0):
        unknown = sorted(set(values[codes < 0]))[:10]
        raise ValueError(
            f"adata.obs[{key!r}] has categories the model was not trained on: {unknown}. "
            f"Known categories: {categories[:20]}{'...' if len(categories) > 20 else ''}."
        )
    return codes


def _obs_signature(adata: AnnData, registry: Registry) -> tuple:
    """Order-sensitive hashes of the registered obs columns (detects a reassigned column)."""
    keys = (registry.sample_key, registry.batch_key, registry.labels_key)
    weights = np.arange(1, adata.n_obs + 1, dtype=np.uint64)
    signature = []
    for key in keys:
        if key is None or key not in adata.obs:
            signature.append(None)
            continue
        hashes = pd.util.hash_pandas_object(adata.obs[key], index=False).to_numpy()
        signature.append(int(np.sum(hashes * weights, dtype=np.uint64)))
    return tuple(signature)


def check_matches_registry(adata: AnnData, registry: Registry) -> None:
    """Raise ``ValueError`` unless ``adata`` has the registry's genes (same order)."""
    genes = [str(v) for v in adata.var_names]
    if genes != registry.var_names:
        missing = [g for g in registry.var_names if g not in set(genes)][:5]
        raise ValueError(
            f"adata has {len(genes)} genes but the model was trained on {len(registry.var_names)}; "
            f"they must be the same genes in the same order (e.g. missing: {missing}). "
            "Subset with `adata[:, model_var_names]`."
        )
    if registry.layer is not None and registry.layer not in adata.layers:
        raise ValueError(f"Layer {registry.layer!r}, used at setup, is missing from adata.layers.")


class BackedCSRRows:
    """Dense float32 rows of a CSR matrix stored in an HDF5 group (a backed .h5ad's ``X`` or
    layer), read with one HDF5 read per array per call.

    The row offsets (``indptr``) are read once and kept (8 bytes per cell); the values and
    column indices of the requested rows -- runs of consecutive rows merged -- are selected as
    one union of hyperslabs per array and read in one call, which is much faster than a read
    per row (anndata's backed indexing).

    Parameters
    ----------
    group
        The h5py group with ``data``, ``indices``, ``indptr`` and a ``shape`` attribute.
    """

    def __init__(self, group):
        self.path, self.name = group.file.filename, group.name
        self.data, self.indices = group["data"], group["indices"]
        self.indptr = np.asarray(group["indptr"][:], dtype=np.int64)
        self.shape = tuple(int(v) for v in group.attrs["shape"])

    @staticmethod
    def supported(matrix) -> bool:
        """A backed CSR matrix (anndata's sparse dataset) stored in HDF5."""
        group = getattr(matrix, "group", None)
        try:
            import h5py
        except ImportError:  # pragma: no cover - anndata depends on h5py
            return False
        return getattr(matrix, "format", None) == "csr" and isinstance(group, h5py.Group)

    @staticmethod
    def _read_runs(dataset, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
        """Entries ``[a, b)`` for every run, concatenated in file order (one ``H5Dread``)."""
        from h5py import h5s

        total = int((stops - starts).sum())
        out = np.empty(total, dtype=dataset.dtype)
        if total == 0:
            return out
        space = dataset.id.get_space()
        space.select_none()
        for a, b in zip(starts.tolist(), stops.tolist()):
            space.select_hyperslab((a,), (b - a,), op=h5s.SELECT_OR)
        dataset.id.read(h5s.create_simple((total,)), space, out)
        return out

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        """Dense (len(rows), n_genes) float32 rows; ``rows`` sorted and unique."""
        starts, stops = self.indptr[rows], self.indptr[rows + 1]
        lengths = stops - starts
        nonempty = lengths > 0
        run_starts, run_stops = starts[nonempty], stops[nonempty]
        if len(run_starts) > 1:  # merge runs that touch in the file (consecutive rows)
            breaks = np.flatnonzero(run_starts[1:] != run_stops[:-1]) + 1
            run_starts = run_starts[np.concatenate([[0], breaks])]
            run_stops = run_stops[np.concatenate([breaks - 1, [len(run_stops) - 1]])]
        values = self._read_runs(self.data, run_starts, run_stops)
        columns = self._read_runs(self.indices, run_starts, run_stops)
        out = np.zeros((len(rows), self.shape[1]), dtype=np.float32)
        out[np.repeat(np.arange(len(rows)), lengths), columns] = values
        return out


class _FileRows(torch.utils.data.Dataset):
    """Dense rows of a backed CSR matrix, read in a ``DataLoader`` worker from its own handle of
    the file (opened on first use, so nothing of the parent's HDF5 state is used)."""

    def __init__(self, path: str, name: str):
        self.path, self.name, self.reader = path, name, None

    def __getitem__(self, rows: np.ndarray) -> torch.Tensor:
        if self.reader is None:
            import h5py

            self.reader = BackedCSRRows(h5py.File(self.path, "r")[self.name])
        return torch.from_numpy(self.reader(rows))


class CellData:
    """Codes and counts of an AnnData under a registry, served as minibatches of tensors.

    Parameters
    ----------
    adata
        The AnnData (not modified).
    registry
        The model's registry; genes and categories are checked against it.

    Notes
    -----
    The counts are validated (:func:`validate_counts`) whenever a ``CellData`` is built, so
    every AnnData that enters an analysis, training or :meth:`MRVI.load` is checked. Dense
    counts may share memory with ``adata`` (no copy of a float32 ``X``): a cached ``CellData``
    is checked with :meth:`is_current` before each use, and a change to the counts after it
    was built is refused rather than silently used.
    """

    def __init__(self, adata: AnnData, registry: Registry):
        check_matches_registry(adata, registry)
        self.where = f"adata.layers[{registry.layer!r}]" if registry.layer else "adata.X"
        self.fingerprint = validate_counts(_count_matrix(adata, registry.layer), self.where)
        self.obs_signature = _obs_signature(adata, registry)
        self.registry = registry
        self.n_obs = adata.n_obs
        self.obs_names = adata.obs_names.copy()
        self.sample_index = _codes(adata, registry.sample_key, registry.sample_categories, "sample_key")
        self.batch_index = _codes(adata, registry.batch_key, registry.batch_categories, "batch_key")
        self.label_index = (
            _codes(adata, registry.labels_key, registry.label_categories, "labels_key")
            if registry.labels_key is not None
            else None
        )
        matrix = _count_matrix(adata, registry.layer)
        if sparse.issparse(matrix) and matrix.format == "csc":
            matrix = matrix.tocsr()  # row access; a sparse copy, never densified
        dense = isinstance(matrix, np.ndarray)
        self._dense = torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float32)) if dense else None
        self._matrix = matrix
        self._backed_rows = BackedCSRRows(matrix.group) if BackedCSRRows.supported(matrix) else None
        self.backed = self._dense is None and not sparse.issparse(matrix)
        """Whether the counts are read from disk minibatch by minibatch."""
        h5 = getattr(matrix, "group", matrix)  # the HDF5 group (backed sparse) or dataset (backed dense)
        self._read_only = self.backed and getattr(getattr(h5, "file", None), "mode", None) == "r"

    def __len__(self) -> int:
        return self.n_obs

    def is_current(self, adata: AnnData) -> bool:
        """Whether ``adata`` still has the counts and annotations this was built from.

        Raises ``ValueError`` when the counts changed (e.g. ``sc.pp.normalize_total`` or
        ``log1p`` in place after setup); returns False when only the registered obs columns
        changed (the codes must then be rebuilt). Counts in a file opened read-only (backed
        ``"r"``) cannot change and are not read again (a full pass over a large file).
        """
        current = self.fingerprint if self._read_only else validate_counts(
            _count_matrix(adata, self.registry.layer), self.where, check=False)
        if current != self.fingerprint:
            raise ValueError(
                f"{self.where} changed after the model first read it (e.g. normalize_total or log1p in "
                "place); MrVI needs the raw counts it was set up with. Keep the raw counts in a layer "
                "(`adata.layers['counts'] = adata.X.copy()` before normalising, then "
                "`setup_anndata(..., layer='counts')`) or restore them."
            )
        return _obs_signature(adata, self.registry) == self.obs_signature

    def counts(self, indices: np.ndarray) -> torch.Tensor:
        """Dense float32 counts of the given cells."""
        if self._dense is not None:
            return self._dense[torch.as_tensor(indices)]
        # sorted, unique row reads (required by backed/HDF5 matrices, fastest for CSR)
        unique, inverse = np.unique(indices, return_inverse=True)
        if self._backed_rows is not None:
            rows = self._backed_rows(unique)
        else:
            rows = self._matrix[unique]
            rows = rows.toarray() if hasattr(rows, "toarray") else np.asarray(rows)
        return torch.from_numpy(np.asarray(rows, dtype=np.float32)[inverse])

    def batch(self, indices: np.ndarray, device: torch.device | str = "cpu") -> dict:
        """Tensors for the given cells: ``x``, ``sample_index``, ``batch_index``, ``label_index``."""
        indices = np.asarray(indices, dtype=np.int64)
        return self._batch(indices, self.counts(indices), device)

    def _batch(self, indices: np.ndarray, counts: torch.Tensor, device) -> dict:
        out = {
            "x": counts.to(device),
            "sample_index": torch.from_numpy(self.sample_index[indices]).to(device),
            "batch_index": torch.from_numpy(self.batch_index[indices]).to(device),
            "label_index": None
            if self.label_index is None
            else torch.from_numpy(self.label_index[indices]).to(device),
        }
        return out

    def read_ahead(self, cell_lists: Iterable[np.ndarray], device: torch.device | str = "cpu") -> Iterator[dict]:
        """Yield :meth:`batch` of each index array in ``cell_lists``, in order.

        For counts in a backed .h5ad (CSR, opened read-only) the minibatches are read ahead by a
        worker process (a ``torch.utils.data.DataLoader`` worker that opens the file itself and
        reads the next two minibatches while the caller uses the current one), so reading
        overlaps with training -- when a core is free for it: the model runs on a GPU, or torch
        uses fewer threads than there are cores (otherwise the worker only competes with torch's
        threads; measured in ``benchmarks/backed_throughput.py``). The environment variable
        ``MRVI_PYRO_READ_AHEAD`` overrides that choice (``1`` on, ``0`` off). In-memory counts and
        other backed formats or modes are read in place. (A thread would not help: h5py holds
        the GIL while it reads.)
        """
        cell_lists = [np.asarray(cells, dtype=np.int64) for cells in cell_lists]
        setting = os.environ.get("MRVI_PYRO_READ_AHEAD", "auto")
        free_core = torch.device(device).type != "cpu" or torch.get_num_threads() < (os.cpu_count() or 1)
        wanted = setting == "1" or (setting != "0" and free_core)
        if not (wanted and self._backed_rows is not None and self._read_only):  # HDF5 locks a writable file
            for cells in cell_lists:
                yield self.batch(cells, device)
            return
        from torch.utils.data import DataLoader

        sorted_rows = [np.unique(cells, return_inverse=True) for cells in cell_lists]
        loader = DataLoader(_FileRows(self._backed_rows.path, self._backed_rows.name), batch_size=None,
                            sampler=[rows for rows, _ in sorted_rows], num_workers=1, prefetch_factor=2,
                            generator=torch.Generator())  # its worker seed must not draw from torch's global RNG
        for cells, (_, inverse), rows in zip(cell_lists, sorted_rows, loader):
            yield self._batch(cells, rows[torch.from_numpy(inverse)], device)

    def iter_batches(self, indices: np.ndarray | None = None, batch_size: int = 256, device="cpu"):
        """Yield ``(indices, batch)`` over ``indices`` (all cells by default), in order."""
        indices = np.arange(self.n_obs) if indices is None else np.asarray(indices, dtype=np.int64)
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            yield chunk, self.batch(chunk, device)


def sample_level_columns(obs: pd.DataFrame, sample_key: str) -> tuple[list[str], list[str]]:
    """Split obs columns into sample-level ones (constant within every sample) and suspicious
    ones (constant within at least half of the samples but not all)."""
    groups = obs.groupby(sample_key, observed=True)
    constant, suspicious = [], []
    for column in obs.columns:
        if column == sample_key:
            continue
        n_unique = groups[column].nunique(dropna=False)
        if (n_unique <= 1).all():
            constant.append(column)
        elif (n_unique <= 1).mean() >= 0.5:
            suspicious.append(column)
    return constant, suspicious


def build_sample_info(adata: AnnData, registry: Registry) -> pd.DataFrame:
    """One row per sample (registry order) with the sample-level obs columns and ``n_cells``.

    A column that is constant within at least half of the samples but not all of them is
    probably a sample covariate with an annotation error: it gets a ``UserWarning`` and is left
    out. Columns that vary within most samples (cell-level annotations) are left out silently.
    """
    obs = adata.obs.copy()
    key = registry.sample_key
    obs[key] = obs[key].astype(str)
    constant, suspicious = sample_level_columns(obs, key)
    if suspicious:
        warnings.warn(
            f"obs column(s) {suspicious} are constant within most samples but not all, so they are "
            "not sample-level covariates and are left out of sample_info; fix them if they should be.",
            UserWarning,
            stacklevel=3,
        )
    first = obs.groupby(key, observed=True)[constant].first() if constant else pd.DataFrame(index=obs[key].unique())
    info = pd.DataFrame(index=pd.Index(registry.sample_categories, name=key))
    info[key] = info.index.to_numpy()
    for column in constant:
        values = first[column].reindex(info.index)
        if isinstance(obs[column].dtype, pd.CategoricalDtype):
            values = pd.Categorical(values, categories=obs[column].cat.categories)
        info[column] = values
    info["n_cells"] = obs[key].value_counts().reindex(info.index).fillna(0).astype(int)
    return info


def sample_covariates(adata: AnnData, registry: Registry, keys: str | list[str]) -> pd.DataFrame:
    """Per-sample values of the sample-level covariates ``keys``.

    Returns a DataFrame indexed by sample (registry order, samples present in ``adata`` only)
    with one column per key, dtypes as in ``obs``.

    Raises
    ------
    ValueError
        For a key that is not an obs column, has missing values, or is not constant within
        every sample (the message names the samples that disagree).
    """
    keys = [keys] if isinstance(keys, str) else list(keys)
    obs = adata.obs
    for key in keys:
        if key not in obs:
            raise ValueError(f"Sample covariate {key!r} is not a column of adata.obs (columns: {list(obs.columns)}).")
        if obs[key].isna().any():
            raise ValueError(f"Sample covariate {key!r} has missing values; fill them or drop those cells.")
    samples = obs[registry.sample_key].astype(str)
    grouped = obs[keys].groupby(samples.to_numpy(), observed=True)
    for key in keys:
        n_unique = grouped[key].nunique()
        bad = n_unique.index[n_unique > 1].tolist()
        if bad:
            raise ValueError(
                f"{key!r} is not a sample-level covariate: it takes several values within sample(s) "
                f"{bad[:5]}{'...' if len(bad) > 5 else ''}. Use a column that is constant within each sample."
            )
    present = [s for s in registry.sample_categories if s in set(samples)]
    return grouped.first().reindex(present)


def check_key_added(key_added, mapping, columns: list[str], *, where: str, overwrite: bool,
                    registry: Registry | None = None) -> None:
    """The rule of every ``key_added``: refuse, before any work, to write ``columns`` into
    ``mapping`` (an AnnData's ``obs`` or ``obsm``, named ``where`` in messages) when one of them
    exists, unless ``overwrite=True``; the registered sample, nuisance and label columns are
    refused even then.

    Raises
    ------
    ValueError
        For a ``key_added`` that is not a non-empty string, or a column it would overwrite.
    """
    if not isinstance(key_added, str) or not key_added:
        raise ValueError(f"key_added must be a non-empty string (a prefix of {where} keys) or None; got {key_added!r}.")
    if registry is not None:
        registered = {registry.sample_key, registry.batch_key, registry.labels_key} - {None}
        taken = [c for c in columns if c in registered]
        if taken:
            raise ValueError(f"key_added={key_added!r} would write {taken[0]!r}, a column the model was set up "
                             "with; choose another key_added.")
    existing = [c for c in columns if c in mapping]
    if existing and not overwrite:
        shown = ", ".join(map(repr, existing[:5])) + (", ..." if len(existing) > 5 else "")
        raise ValueError(f"{where} already has {shown}; pass overwrite=True to replace "
                         f"{'it' if len(existing) == 1 else 'them'}, or choose another key_added.")
