"""Every tutorial notebook executes without error (small settings) and is stored with its outputs.

Each ``tutorials/*.ipynb`` is run top to bottom with :mod:`nbclient` in a fresh kernel, with
``MRVI_TUTORIAL_FAST=1`` (see ``tutorials/_settings.py``) so that it finishes in seconds; a cell
that raises fails the test and names the notebook and the cell. New notebooks are picked up
automatically.

The kernel is this interpreter (``sys.executable``): the test writes a ``python3`` kernelspec
pointing at it into a temporary directory placed first on ``JUPYTER_PATH``, so a user-level or
system kernelspec of another Python can never be picked up, and checks it from inside the kernel.
"""

import json
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
KERNEL_NAME = "python3"
CELL_TIMEOUT = 300
"""Seconds one cell may run in the fast settings before the test fails."""

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
CHECK_KERNEL = "import os, sys\nprint(sys.executable)\nprint(os.environ.get('MRVI_TUTORIAL_FAST'))"


@pytest.fixture(scope="module")
def kernel_path(tmp_path_factory) -> Path:
    """A Jupyter data directory whose ``python3`` kernel runs this interpreter."""
    root = tmp_path_factory.mktemp("jupyter")
    spec_dir = root / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "mrvi_pyro tests",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return root


def test_tutorials_exist():
    assert (TUTORIALS / "01_mrvi_model_in_pyro.ipynb") in NOTEBOOKS
    assert (TUTORIALS / "_settings.py").is_file()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, kernel_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_path))
    monkeypatch.setenv("MRVI_TUTORIAL_FAST", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny models; avoids oversubscribing shared CI cores
    notebook = nbformat.read(path, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(CHECK_KERNEL))
    client = nbclient.NotebookClient(
        notebook, kernel_name=KERNEL_NAME, timeout=CELL_TIMEOUT, resources={"metadata": {"path": str(TUTORIALS)}}
    )
    error = None
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:
        error = ANSI_ESCAPE.sub("", str(err))
    if error is not None:
        pytest.fail(f"{path.name} failed in the fast settings:\n{error}", pytrace=False)
    printed = "".join(out.get("text", "") for out in notebook.cells[-1].outputs).split()
    assert printed == [sys.executable, "1"], f"kernel ran {printed}, expected {sys.executable} in fast mode"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_stored_with_outputs(path):
    """The repository copy was executed top to bottom, without errors, and shows its figures."""
    notebook = nbformat.read(path, as_version=4)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    counts = [cell.execution_count for cell in code_cells]
    assert counts == list(range(1, len(code_cells) + 1)), f"{path.name}: re-run all cells in order and save"
    outputs = [out for cell in code_cells for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"], f"{path.name} is stored with an error"
    assert any("image/png" in out.get("data", {}) for out in outputs), f"{path.name} is stored without figures"
