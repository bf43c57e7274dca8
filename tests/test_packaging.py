"""Package metadata: a floor for every dependency (CI installs them), the license shipped, the
notebook tooling in its own extra."""

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_every_direct_dependency_is_pinned_to_its_floor_for_the_lowest_versions_run():
    result = subprocess.run([sys.executable, str(ROOT / ".ci" / "lowest_constraints.py")], capture_output=True,
                            text=True, check=True)
    pins = dict(line.split("==") for line in result.stdout.split())
    floors = dict(dep.split(">=") for dep in PROJECT["dependencies"])
    assert pins == {name: floor for name, floor in floors.items() if name != "torch"}
    assert floors["zarr"].startswith("3.") and PROJECT["requires-python"] == ">=3.11"


def test_license_file_is_bsd_3_clause_and_graphviz_is_not_a_core_dependency():
    assert PROJECT["license"] == "BSD-3-Clause" and PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License") and "mrvi_pyro developers" in text
    names = {dep.split(">=")[0] for dep in PROJECT["dependencies"]}
    assert "graphviz" not in names
    tutorials = {dep.split(">=")[0] for dep in PROJECT["optional-dependencies"]["tutorials"]}
    assert {"graphviz", "nbclient", "ipykernel", "scikit-learn"} <= tutorials
