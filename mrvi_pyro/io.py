"""Saving and loading models safely.

A saved model is a directory with

- ``model.pt`` -- the module's ``state_dict`` (tensors only; read back with
  ``torch.load(..., weights_only=True)``, so no code is ever unpickled);
- ``model.json`` -- a format tag, the package version, the constructor arguments, the
  registry (keys, category orders, genes) and the training history;
- ``adata.h5ad`` -- the AnnData, when ``save_anndata=True``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import torch

FORMAT = "mrvi_pyro"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.pt"
METADATA_FILE = "model.json"
ADATA_FILE = "adata.h5ad"


def write_model(dir_path: str | os.PathLike, state_dict: dict, metadata: dict, *, overwrite: bool = False,
                adata=None) -> Path:
    """Write weights, JSON metadata and optionally the AnnData to ``dir_path``."""
    path = Path(dir_path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise ValueError(f"{path} already exists and is not empty; pass overwrite=True to replace it.")
    path.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, path / WEIGHTS_FILE)
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, **metadata}
    (path / METADATA_FILE).write_text(json.dumps(metadata, indent=1))
    if adata is not None:
        adata.write_h5ad(path / ADATA_FILE)
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
