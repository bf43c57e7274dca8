"""Print pip constraints pinning every direct dependency of pyproject.toml to its floor.

Used by .ci/run to install the lowest allowed versions (``pip install -c FILE -e ".[dev]"``).
torch is left out: CI installs the one CPU build it tests with, and older torch wheels for
Linux pull in gigabytes of CUDA libraries.
"""

import re
import sys
import tomllib
from pathlib import Path

LEFT_OUT = {"torch"}

pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
for requirement in pyproject["project"]["dependencies"]:
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][A-Za-z0-9.]*)", requirement)
    if match is None:
        sys.exit(f"{requirement!r} is not of the form 'name>=floor'; give every dependency a floor.")
    name, floor = match.groups()
    if name not in LEFT_OUT:
        print(f"{name}=={floor}")
