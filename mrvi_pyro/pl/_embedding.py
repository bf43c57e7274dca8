"""Cells on a 2-d embedding coloured by ``obs`` columns, and the training curves."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from ._base import axes_or_new, cell_coords, finish, is_anndata


def embedding(
    adata,
    basis: str | None = None,
    color: str | Sequence[str] | None = None,
    *,
    latent: np.ndarray | None = None,
    obs: pd.DataFrame | None = None,
    title: str | None = None,
    point_size: float = 4.0,
    seed: int = 0,
    basis_name: str | None = None,
    ax=None,
    show: bool | None = None,
):
    """Cells on a 2-d embedding, one panel per ``obs`` column in ``color``.

    Categorical columns get a legend outside the panel, numeric ones a colour bar. Cells are
    drawn in a random order (seeded by ``seed``), so no category is painted over all others.

    Parameters
    ----------
    adata
        The cells: an AnnData (e.g. ``pl.embedding(adata, "X_umap", color="cell_type")``), or
        their (n_cells, 2) coordinates together with ``obs`` (the earlier form
        ``embedding(coords, obs, color)`` also works).
    basis
        ``obsm`` key of the embedding (its first two columns, e.g. ``"X_umap"``); None: the
        first two principal components of ``latent``.
    color
        ``obs`` column(s) to colour by, one panel each (None: one grey panel).
    latent
        (n_cells, d) values projected on their first two principal components when ``basis``
        is None (e.g. ``model.get_latent_representation()``).
    obs
        Per-cell table of the colour columns when ``adata`` is an array of coordinates.
    title, point_size, seed
        Appearance (``seed`` fixes the draw order).
    basis_name
        Axis name (``"UMAP"`` gives ``UMAP1``, ``UMAP2``); default: from ``basis``, or ``"PC"``.
    ax
        Axes to draw into (one ``color`` column only); default: a new figure.
    show
        True: display the figure and return None (scanpy's convention); default: return it.

    Returns
    -------
    matplotlib.figure.Figure, or None with ``show=True``.
    """
    if not is_anndata(adata) and isinstance(basis, pd.DataFrame):  # earlier form (coords, obs, color)
        obs, basis = basis, None
    coords, cell_obs, axis_name = cell_coords(adata, basis, latent, basis_name)
    obs = cell_obs if obs is None else obs
    keys = [] if color is None else ([color] if isinstance(color, str) else list(color))
    if keys and obs is None:
        raise ValueError("color names obs columns: pass an AnnData as adata, or obs= with the coordinates.")
    missing = [k for k in keys if k not in obs]
    if missing:
        raise ValueError(f"color key(s) {missing} not in obs (columns: {list(obs.columns)}).")
    if obs is not None and len(coords) != len(obs):
        raise ValueError(f"coords must have shape ({len(obs)}, 2) (one row per obs row); got {coords.shape}.")
    if ax is not None and len(keys) > 1:
        raise ValueError(f"ax= holds one panel, but color names {len(keys)} columns; pass one column or no ax.")
    order = np.random.default_rng(seed).permutation(len(coords))
    if ax is None:
        fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(5.8 * max(len(keys), 1), 4), squeeze=False)
        axes = list(axes[0])
    else:
        fig, axes = ax.figure, [ax]
    for ax, key in zip(axes, keys or [None]):
        if key is None:
            ax.scatter(coords[order, 0], coords[order, 1], s=point_size, color="0.5", linewidths=0)
        else:
            _scatter_column(fig, ax, coords, obs[key], order, point_size)
            ax.set_title(key)
        ax.set_xlabel(f"{axis_name}1")
        ax.set_ylabel(f"{axis_name}2")
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return finish(fig, show)


def _scatter_column(fig, ax, coords: np.ndarray, values: pd.Series, order: np.ndarray, point_size: float) -> None:
    """Cells coloured by one obs column: a legend beside the panel (categories) or a colour bar."""
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


def training_history(history, *, ax=None, show: bool | None = None):
    """ELBO curves (train and validation) per epoch, and the sample spread.

    With a ``sample_spread`` column (the size of the learned sample effects, see
    :meth:`mrvi_pyro.MRVI.train`) it is drawn dashed on a second y axis at the right: weak sample
    effects are learned late, so a spread still rising at the last epoch means more epochs are
    needed before the sample-level results settle. With a ``batch_share`` column (the share of
    those effects that follows the samples' batch) it is drawn dotted on a third axis (0 to 1),
    with its chance level as a thin line: early in training the batch often passes through the
    sample effects, and until it falls to near chance the sample distances group samples by batch.

    Parameters
    ----------
    history
        ``model.history`` (a DataFrame indexed by epoch with ``elbo_train`` and, with a
        validation split, ``elbo_validation``), or the trained model itself.
    ax, show
        Axes to draw into (default: a new figure); True displays the figure and returns None.
    """
    history = getattr(history, "history", history)
    if not isinstance(history, pd.DataFrame):
        raise ValueError("history must be model.history (a DataFrame) or a trained model; "
                         f"got {type(history).__name__} (an untrained model has no history).")
    columns = [c for c in history.columns if c.startswith("elbo")]
    if not columns:
        raise ValueError(f"history has no 'elbo_*' column (columns: {list(history.columns)}).")
    fig, ax = axes_or_new(ax, (5, 3.5))
    for column in columns:
        ax.plot(history.index, history[column], label=column.replace("elbo_", ""))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("-ELBO per cell")
    ax.legend(frameon=False)
    if "sample_spread" in history and history["sample_spread"].notna().any():
        right = ax.twinx()
        right.plot(history.index, history["sample_spread"], color="0.35", ls="--", lw=1)
        right.set_ylabel("sample spread (dashed)")
    if "batch_share" in history and history["batch_share"].notna().any():
        share = ax.twinx()
        if len(fig.axes) > 2:  # beside the spread's axis
            share.spines["right"].set_position(("axes", 1.18))
        share.plot(history.index, history["batch_share"], color="tab:red", ls=":", lw=1.2)
        if "batch_share_chance" in history:
            share.axhline(float(history["batch_share_chance"].iloc[-1]), color="tab:red", lw=0.6, alpha=0.5)
        share.set_ylim(0, 1)
        share.set_ylabel("batch share of sample effects (dotted)", color="tab:red")
    fig.tight_layout()
    return finish(fig, show)
