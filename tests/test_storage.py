"""``_storage.CellArrays``: one abstraction, in memory or one zarr format, and older stores still open."""

import numpy as np
import pytest
import xarray as xr

from mrvi_pyro import explore
from mrvi_pyro._storage import CellArrays, open_store

DIMS = ("cell_name", "covariate", "gene")
COORDS = {"cell_name": [f"c{i}" for i in range(5)], "covariate": ["disease"], "gene": ["g0", "g1", "g2"]}


def _fill(sink):
    rng = np.random.default_rng(0)
    values = rng.normal(size=(5, 1, 3)).astype(np.float32)
    for start in range(0, 5, 2):  # blocks as the writers produce them
        sink.write("lfc", slice(start, start + 2), values[start : start + 2])
    return values


def test_memory_and_zarr_hold_the_same_values(tmp_path):
    variables = {"lfc": (DIMS, (5, 1, 3)), "baseline": (("cell_name", "gene"), (5, 3))}
    in_memory = CellArrays(variables, COORDS)
    on_disk = CellArrays(variables, COORDS, zarr_path=tmp_path / "s.zarr", chunk_cells=2)
    assert not in_memory.on_disk and on_disk.on_disk
    values = _fill(in_memory)
    _fill(on_disk)
    on_disk.add_variables(xr.Dataset({"extra": ("covariate", [1.5])}, coords={"covariate": ["disease"]}))
    assert (tmp_path / "s.zarr" / "zarr.json").is_file()  # zarr format 3
    memory, disk = in_memory.to_dataset(), on_disk.to_dataset(dask=False)
    np.testing.assert_array_equal(memory["lfc"].values, values)
    np.testing.assert_array_equal(disk["lfc"].values, values)
    assert np.isnan(memory["baseline"].values).all() and np.isnan(disk["baseline"].values).all()  # unwritten
    assert list(disk["gene"].values) == COORDS["gene"] and float(disk["extra"].values[0]) == 1.5
    with pytest.raises(ValueError, match="already exists"):
        CellArrays(variables, COORDS, zarr_path=tmp_path / "s.zarr")
    with pytest.raises(ValueError, match="needs a zarr store"):
        in_memory.add_variables(xr.Dataset())


def test_stores_written_in_zarr_format_2_still_open(tmp_path):
    """DE outputs were written in zarr format 2 before: open_store (and the distance reader) read them."""
    old = xr.Dataset({"lfc": (DIMS, np.arange(15, dtype=np.float32).reshape(5, 1, 3))}, coords=COORDS)
    old.to_zarr(tmp_path / "old.zarr", zarr_format=2, consolidated=False)
    assert (tmp_path / "old.zarr" / ".zgroup").is_file()
    for reopened in (open_store(tmp_path / "old.zarr", dask=False), explore.open_distance_store(tmp_path / "old.zarr")):
        np.testing.assert_array_equal(reopened["lfc"].values, old["lfc"].values)
        assert list(reopened["gene"].values) == COORDS["gene"]
