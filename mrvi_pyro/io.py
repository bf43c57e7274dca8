"""Saving and loading models safely.

A saved model is a directory with

- ``model.pt`` -- the module's ``state_dict`` (tensors only; read back with
  ``torch.load(..., weights_only=True)``, so no code is ever unpickled);
- ``model.json`` -- a format tag, the package version, the names of the module class and the
  guide (as registered, :mod:`mrvi_pyro.components`), the constructor arguments (which name the
  likelihood, sample mapper and prior), the registry (keys, category orders, genes), the
  training history and the training split (:func:`split_to_json`);
- ``adata.h5ad`` -- the AnnData, when ``save_anndata=True``.

Saving is atomic: the files are written into a temporary sibling directory that then replaces
``dir_path`` (:mod:`mrvi_pyro._safe_io`), so a kill at any moment leaves either the previous
save or the new one, and files of an earlier save (an old ``adata.h5ad``) never survive beside
a new model.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ._safe_io import staged_directory

FORMAT = "mrvi_pyro"
FORMAT_VERSION = 2
"""2: the prior on ``u`` is a component (state-dict keys ``u_prior.*``, see
:data:`mrvi_pyro.module.LEGACY_KEYS`), ``model.json`` names the module class and the guide.
1: files of earlier versions (still read)."""
WEIGHTS_FILE = "model.pt"
METADATA_FILE = "model.json"
ADATA_FILE = "adata.h5ad"


def saved_model_rule(path: Path) -> str | None:
    """``replaceable`` rule of model directories: only a mrvi_pyro save may be replaced."""
    names = {p.name for p in path.iterdir()}
    foreign = sorted(names - {WEIGHTS_FILE, METADATA_FILE, ADATA_FILE})
    if foreign:
        return f"holds files a mrvi_pyro save does not write ({foreign[:5]})"
    try:
        tagged = json.loads((path / METADATA_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        tagged = False
    return None if tagged else f"has no {METADATA_FILE} written by mrvi_pyro"


def write_model(dir_path: str | os.PathLike, state_dict: dict, metadata: dict, *, overwrite: bool = False,
                adata=None) -> Path:
    """Write weights, JSON metadata and optionally the AnnData to ``dir_path``, atomically.

    An existing non-empty ``dir_path`` is refused unless ``overwrite``, and even then unless it
    is an earlier mrvi_pyro save; it is replaced as a whole.
    """
    path = Path(dir_path)
    with staged_directory(path, overwrite=overwrite, what="dir_path", replaceable=saved_model_rule) as staging:
        torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, staging / WEIGHTS_FILE)
        metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, **metadata}
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=1))
        if adata is not None:
            adata.write_h5ad(staging / ADATA_FILE)
    return path


def read_model(dir_path: str | os.PathLike) -> tuple[dict, dict, Path | None]:
    """Read ``(state_dict, metadata, adata_path_or_None)``; ``ValueError`` if not ours."""
    path = Path(dir_path)
    if not path.is_dir():
        raise ValueError(f"No saved model at {path}: the directory does not exist.")
    meta_file, weights_file = path / METADATA_FILE, path / WEIGHTS_FILE
    if not meta_file.is_file() or not weights_file.is_file():
        raise ValueError(f"{path} is not a mrvi_pyro model directory (expected {METADATA_FILE} and {WEIGHTS_FILE}).")
    try:
        metadata = json.loads(meta_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{meta_file} is not valid JSON; this is not a mrvi_pyro model ({err}).") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ValueError(f"{meta_file} was not written by mrvi_pyro (no format tag {FORMAT!r}).")
    if metadata.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path} was saved by a newer mrvi_pyro (format {metadata['format_version']}); upgrade the package."
        )
    try:
        state_dict = torch.load(weights_file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for foreign or unsafe files
        raise ValueError(f"{weights_file} is not a mrvi_pyro weights file that can be loaded safely ({err}).") from None
    adata_path = path / ADATA_FILE
    return state_dict, metadata, adata_path if adata_path.is_file() else None


def history_to_json(history: pd.DataFrame | None):
    """History as JSON-able records (``None`` stays ``None``)."""
    return None if history is None else history.reset_index().to_dict(orient="list")


def history_from_json(records) -> pd.DataFrame | None:
    """Inverse of :func:`history_to_json`."""
    return None if records is None else pd.DataFrame(records).set_index("epoch")


def split_to_json(train_indices: np.ndarray | None, validation_indices: np.ndarray | None) -> dict | None:
    """The training split as JSON: ``{"n_obs": N, "validation_mask": base64 of the packed bits
    of a boolean mask over the N cells}`` (every cell is in exactly one of the two sets; about
    N / 6 characters). ``None`` stays ``None`` (an untrained model)."""
    if train_indices is None or validation_indices is None:
        return None
    n_obs = len(train_indices) + len(validation_indices)
    mask = np.zeros(n_obs, dtype=bool)
    mask[np.asarray(validation_indices, dtype=np.int64)] = True
    return {"n_obs": int(n_obs), "validation_mask": base64.b64encode(np.packbits(mask).tobytes()).decode("ascii")}


def split_from_json(record, where: str = "model.json") -> tuple[np.ndarray, np.ndarray] | None:
    """Inverse of :func:`split_to_json`: ``(train_indices, validation_indices)``, sorted; None for
    ``None`` (an untrained model, or a save written before the split was kept). ``ValueError``
    naming ``where`` for a record that is not one :func:`split_to_json` wrote."""
    if record is None:
        return None
    try:
        n_obs = record["n_obs"]
        packed = np.frombuffer(base64.b64decode(record["validation_mask"], validate=True), dtype=np.uint8)
        valid = (isinstance(n_obs, int) and not isinstance(n_obs, bool) and n_obs >= 0
                 and len(packed) == (n_obs + 7) // 8)
    except (KeyError, TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError(f"{where} has a malformed training split ('split'); the file was changed after it was "
                         "saved. Remove the 'split' entry to load the model without its split.")
    mask = np.unpackbits(packed, count=n_obs).astype(bool)
    return np.flatnonzero(~mask), np.flatnonzero(mask)
