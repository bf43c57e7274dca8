"""One storage abstraction for per-cell outputs: :class:`CellArrays`.

Named float32 arrays whose first axis is the cells, written block by block as the cells are
processed, kept either in memory (numpy) or in one zarr store (format 3, chunked along the
cells) that is read back lazily. The per-cell distances (:mod:`mrvi_pyro.explore`) and the
(cell, covariate, gene) DE outputs (:mod:`mrvi_pyro.de`) both go through it. :func:`open_store`
reads a store of either zarr format, so stores written by earlier versions (DE outputs were
format 2) still open.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

ZARR_FORMAT = 3
"""The zarr format every store is written in."""


def _text_as_objects(coords: Mapping) -> dict:
    """Coordinates with text values as object arrays (how xarray writes strings to zarr format 3)."""
    out = {}
    for name, values in coords.items():
        array = np.asarray(values)
        out[name] = array.astype(object) if array.dtype.kind in "OU" else array
    return out


class CellArrays:
    """Named float32 arrays of shape (cells, ...) written block by block: in memory or in zarr.

    Parameters
    ----------
    variables
        Name -> ``(dims, shape)``; the first dimension of every variable is the cells.
    coords
        Coordinates of those dimensions (written to the store; kept for :meth:`to_dataset`; those
        of all cells, also for a shard).
    zarr_path
        None: numpy arrays. A path that does not exist yet: a zarr store (format 3) created there.
    chunk_cells
        Cells per zarr chunk (the writers' block size, so every write fills whole chunks).
    fill_value
        Initial value of unwritten entries (NaN); None leaves in-memory arrays uninitialised
        (for outputs that are always written completely).
    first
        In memory: the position among all cells of the arrays' first row (a shard of a
        distributed analysis holds rows ``first:first + n``); :meth:`write` takes positions among
        all cells. A zarr store always holds all cells.

    :meth:`attach` opens an existing store for writing: the other ranks of a distributed
    analysis write their cell ranges into the store rank 0 created (whole chunks, so no two
    ranks touch one chunk).
    """

    def __init__(self, variables: Mapping[str, tuple[tuple, tuple]], coords: Mapping, *, zarr_path=None,
                 chunk_cells: int = 128, fill_value: float | None = np.nan, first: int = 0):
        self.first = 0 if zarr_path is not None else int(first)
        self.variables = {name: (tuple(dims), tuple(shape)) for name, (dims, shape) in variables.items()}
        self.coords = dict(coords)
        self.zarr_path = None if zarr_path is None else os.fspath(zarr_path)
        self.arrays: dict = {}
        if self.zarr_path is None:
            for name, (_, shape) in self.variables.items():
                self.arrays[name] = (np.empty(shape, dtype=np.float32) if fill_value is None
                                     else np.full(shape, fill_value, dtype=np.float32))
            return
        import xarray as xr
        import zarr

        if os.path.exists(self.zarr_path):
            raise ValueError(f"zarr_path {self.zarr_path!r} already exists; choose a new path or remove it first.")
        xr.Dataset(coords=_text_as_objects(self.coords)).to_zarr(
            self.zarr_path, mode="w-", consolidated=False, zarr_format=ZARR_FORMAT)
        group = zarr.open_group(self.zarr_path, mode="a", zarr_format=ZARR_FORMAT)
        for name, (dims, shape) in self.variables.items():
            self.arrays[name] = group.create_array(
                name, shape=shape, chunks=(max(1, min(int(chunk_cells), shape[0])), *shape[1:]), dtype="float32",
                fill_value=np.nan if fill_value is None else fill_value, dimension_names=list(dims),
            )

    @classmethod
    def attach(cls, zarr_path, variables: Mapping[str, tuple[tuple, tuple]], coords: Mapping | None = None
               ) -> "CellArrays":
        """The store at ``zarr_path`` (created by another process's constructor), for writing
        ``variables`` (name -> ``(dims, shape)`` as there)."""
        import zarr

        arrays = cls.__new__(cls)
        arrays.first = 0
        arrays.variables = {name: (tuple(dims), tuple(shape)) for name, (dims, shape) in variables.items()}
        arrays.coords = dict(coords or {})
        arrays.zarr_path = os.fspath(zarr_path)
        group = zarr.open_group(arrays.zarr_path, mode="a", zarr_format=ZARR_FORMAT)
        arrays.arrays = {name: group[name] for name in arrays.variables}
        return arrays

    @property
    def on_disk(self) -> bool:
        """Whether the arrays live in a zarr store."""
        return self.zarr_path is not None

    def write(self, name: str, rows: slice, values: np.ndarray) -> None:
        """Write ``values`` to the cells ``rows`` (positions among all cells) of the variable ``name``."""
        if self.first:
            rows = slice(rows.start - self.first, rows.stop - self.first)
        self.arrays[name][rows] = values

    def gathered(self, partition) -> "CellArrays | None":
        """All rows, in memory on rank 0 of a sharded analysis (``partition``, a
        :class:`mrvi_pyro.distributed.CellPartition`, whose ranks each held their own rows; the
        other ranks get None). A zarr store, which every rank wrote into, or an unsharded
        partition: the arrays themselves. A collective on every rank of a sharded partition."""
        if self.on_disk or not partition.sharded:
            return self
        arrays = {name: partition.gather(values) for name, values in self.arrays.items()}
        if not partition.is_main:
            return None
        whole = CellArrays({name: (dims, arrays[name].shape) for name, (dims, _) in self.variables.items()},
                           self.coords, fill_value=None)
        whole.arrays = arrays
        return whole

    def add_variables(self, dataset) -> None:
        """Append the variables of an ``xarray.Dataset`` to the store (zarr only)."""
        if not self.on_disk:
            raise ValueError("add_variables needs a zarr store; in memory, merge with to_dataset() instead.")
        dataset.assign_coords(_text_as_objects({k: v.values for k, v in dataset.coords.items()})).to_zarr(
            self.zarr_path, mode="a", consolidated=False, zarr_format=ZARR_FORMAT)

    def to_dataset(self, *, dask: bool = True):
        """The arrays as an ``xarray.Dataset``: in memory, or the store opened lazily (:func:`open_store`)."""
        import xarray as xr

        if self.on_disk:
            return open_store(self.zarr_path, dask=dask)
        return xr.Dataset({name: (self.variables[name][0], values) for name, values in self.arrays.items()},
                          coords=self.coords)


def partitioned_cell_arrays(variables: Mapping[str, tuple[tuple, tuple]], coords: Mapping, partition, *,
                            zarr_path=None, chunk_cells: int = 128, fill_value: float | None = np.nan) -> CellArrays:
    """This rank's :class:`CellArrays` for the cells of ``partition`` (a
    :class:`mrvi_pyro.distributed.CellPartition`; ``variables`` and ``coords`` are of all cells).

    In memory: the rows of this rank's cells only (:meth:`CellArrays.gathered` joins them on
    rank 0). In zarr: rank 0 creates the store at its ``zarr_path`` and every other rank attaches
    to it after a barrier, so each writes its own cells' chunks (whole chunks of ``chunk_cells``,
    the partition's unit, so no two ranks touch one chunk). Outside a launch: a plain
    :class:`CellArrays`.
    """
    if zarr_path is None:
        cells = partition.cells
        shard = {name: (dims, (partition.n_local, *shape[1:])) for name, (dims, shape) in variables.items()}
        return CellArrays(shard, coords, fill_value=fill_value, first=cells.start)
    zarr_path = partition.broadcast(zarr_path)  # rank 0's
    sink = None
    if partition.is_main:
        sink = CellArrays(variables, coords, zarr_path=zarr_path, chunk_cells=chunk_cells, fill_value=fill_value)
    partition.barrier()
    return sink if sink is not None else CellArrays.attach(zarr_path, variables, coords)


def open_store(path: str | os.PathLike, *, dask: bool = True):
    """Open a zarr store of per-cell outputs lazily (any zarr format, so older stores open too).

    ``dask=True`` gives dask arrays when dask is installed; otherwise (or with ``dask=False``)
    xarray's lazily indexed arrays, which read only the chunks a selection touches.
    """
    import xarray as xr

    chunks = None
    if dask:
        try:
            import dask as _  # noqa: F401

            chunks = {}
        except ImportError:
            chunks = None
    return xr.open_dataset(os.fspath(path), engine="zarr", chunks=chunks, consolidated=False, cache=False)
