"""Matplotlib figures. Every function reads documented outputs and returns the figure."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd


def pca_2d(values: np.ndarray) -> np.ndarray:
    """First two principal components of ``values`` (n, d) (a cheap 2-d embedding)."""
    centered = values - values.mean(0)
    _, _, vt = np.linalg.svd(centered, full_matrices=False)
    return centered @ vt[:2].T


def embedding(coords: np.ndarray, obs: pd.DataFrame, color: str | list[str], *, title: str | None = None,
              point_size: float = 4.0, basis_name: str = "PC"):
    """Scatter of a 2-d embedding, one panel per obs column in ``color``.

    Categorical columns get a legend, numeric ones a colour bar.
    """
    keys = [color] if isinstance(color, str) else list(color)
    missing = [k for k in keys if k not in obs]
    if missing:
        raise ValueError(f"color key(s) {missing} not in obs (columns: {list(obs.columns)}).")
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        values = obs[key]
        if isinstance(values.dtype, pd.CategoricalDtype) or values.dtype == object or values.dtype == bool:
            cats = pd.Categorical(values)
            cmap = plt.get_cmap("tab20" if len(cats.categories) > 10 else "tab10")
            for i, cat in enumerate(cats.categories):
                mask = np.asarray(cats == cat)
                ax.scatter(coords[mask, 0], coords[mask, 1], s=point_size, color=cmap(i % cmap.N), label=str(cat))
            if len(cats.categories) <= 20:
                ax.legend(markerscale=3, fontsize=7, frameon=False, loc="best")
        else:
            points = ax.scatter(coords[:, 0], coords[:, 1], s=point_size, c=values.to_numpy(), cmap="viridis")
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
    "da_log_ratio", "effect_size_embedding", "embedding", "local_distance_embedding", "log_ratio_by_group", "log_ratio_embedding",
    "log_ratio_summary", "pca_2d", "sample_distance_heatmap", "top_genes_heatmap", "training_history", "volcano",
]
