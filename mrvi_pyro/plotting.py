"""Matplotlib figures. Every function reads documented outputs and returns the figure."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D


def pca_2d(values: np.ndarray) -> np.ndarray:
    """First two principal components of ``values`` (n, d) (a cheap 2-d embedding)."""
    centered = values - values.mean(0)
    _, _, vt = np.linalg.svd(centered, full_matrices=False)
    return centered @ vt[:2].T


def basis_coords(adata, basis: str | None = None, *, latent: np.ndarray | None = None) -> tuple[np.ndarray, str]:
    """(n_cells, 2) coordinates of a 2-d embedding and the name of its axes.

    Parameters
    ----------
    adata
        The AnnData whose ``obsm`` holds the embedding.
    basis
        Any ``obsm`` key (e.g. ``"X_umap"`` from scanpy, ``"X_mrvi_u"``): its first two columns,
        axes named after the key (``"X_umap"`` -> ``UMAP1``, ``UMAP2``). None: the first two
        principal components of ``latent`` (:func:`pca_2d`), axes ``PC1``, ``PC2``.
    latent
        (n_cells, d) values to project when ``basis`` is None (e.g. the latent u).
    """
    if basis is None:
        if latent is None:
            raise ValueError("Pass basis= (an obsm key such as 'X_umap') or latent= (values to project on PCA).")
        return pca_2d(np.asarray(latent, dtype=float)), "PC"
    if basis not in adata.obsm:
        raise ValueError(f"basis {basis!r} is not a key of adata.obsm (keys: {list(adata.obsm.keys())}); "
                         "compute it first (e.g. sc.tl.umap) or leave basis=None for PCA of u.")
    coords = np.asarray(adata.obsm[basis])
    if coords.ndim != 2 or coords.shape[1] < 2:
        raise ValueError(f"adata.obsm[{basis!r}] must have at least 2 columns; got shape {coords.shape}.")
    name = basis[2:] if basis.startswith("X_") else basis
    return coords[:, :2].astype(float), name.upper() if name.islower() and len(name) <= 5 else name


def embedding(coords: np.ndarray, obs: pd.DataFrame, color: str | list[str], *, title: str | None = None,
              point_size: float = 4.0, basis_name: str = "PC", seed: int = 0):
    """Scatter of a 2-d embedding, one panel per obs column in ``color``.

    Categorical columns get a legend outside the panel, numeric ones a colour bar. Cells are
    drawn in a random order (seeded by ``seed``), so no category is painted over all others.
    """
    keys = [color] if isinstance(color, str) else list(color)
    missing = [k for k in keys if k not in obs]
    if missing:
        raise ValueError(f"color key(s) {missing} not in obs (columns: {list(obs.columns)}).")
    coords = np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] != 2 or len(coords) != len(obs):
        raise ValueError(f"coords must have shape ({len(obs)}, 2) (one row per obs row); got {coords.shape}.")
    order = np.random.default_rng(seed).permutation(len(coords))
    fig, axes = plt.subplots(1, len(keys), figsize=(5.8 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        values = obs[key]
        if isinstance(values.dtype, pd.CategoricalDtype) or values.dtype == object or values.dtype == bool:
            cats = pd.Categorical(values)
            cmap = plt.get_cmap("tab20" if len(cats.categories) > 10 else "tab10")
            palette = np.array([cmap(i % cmap.N) for i in range(len(cats.categories))] + [(0.8, 0.8, 0.8, 1.0)])
            codes = np.asarray(cats.codes)[order]
            ax.scatter(coords[order, 0], coords[order, 1], s=point_size, c=palette[codes], linewidths=0)
            if len(cats.categories) <= 20:
                handles = [Line2D([], [], ls="", marker="o", markersize=4, color=palette[i], label=str(cat))
                           for i, cat in enumerate(cats.categories)]
                ax.legend(handles=handles, fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                          borderaxespad=0.0)
        else:
            points = ax.scatter(coords[order, 0], coords[order, 1], s=point_size, c=values.to_numpy()[order],
                                cmap="viridis", linewidths=0)
            fig.colorbar(points, ax=ax, shrink=0.8)
        ax.set_title(key)
        ax.set_xlabel(f"{basis_name}1")
        ax.set_ylabel(f"{basis_name}2")
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def training_history(history: pd.DataFrame):
    """ELBO curves (train and validation) per epoch."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for column in [c for c in history.columns if c.startswith("elbo")]:
        ax.plot(history.index, history[column], label=column)
    ax.set_xlabel("epoch")
    ax.set_ylabel("-ELBO per cell")
    ax.legend(frameon=False)
    fig.tight_layout()
    return fig


from ._plot_da import da_log_ratio, log_ratio_by_group, log_ratio_embedding, log_ratio_summary  # noqa: E402
from ._plot_de import effect_size_embedding, top_genes_heatmap, volcano  # noqa: E402
from ._plot_explore import local_distance_embedding, sample_distance_heatmap  # noqa: E402

__all__ = [
    "basis_coords", "da_log_ratio", "effect_size_embedding", "embedding", "local_distance_embedding", "log_ratio_by_group", "log_ratio_embedding",
    "log_ratio_summary", "pca_2d", "sample_distance_heatmap", "top_genes_heatmap", "training_history", "volcano",
]
