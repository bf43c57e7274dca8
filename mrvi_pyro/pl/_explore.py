"""Figures of the exploratory analysis. Each function reads documented outputs and returns the figure
(``show=True`` displays it instead).

- :func:`sample_distance_heatmap`: a group's sample x sample distance matrix, reordered by a
  hierarchical clustering (optimal leaf ordering), with its dendrogram and colour bars for
  chosen ``sample_info`` columns.
- :func:`local_distance_embedding`: a 2-d embedding of cells coloured by a per-cell summary of
  their local sample distances.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.patches import Patch

from .. import explore
from ._base import axes_or_new, cell_coords, finish
from ._embedding import embedding


def _square_matrix(distances, group):
    """(values, sample names, title) of a 2-d matrix from a 2-d or grouped 3-d DataArray."""
    dims = tuple(distances.dims)
    if dims == ("sample_x", "sample_y"):
        if group is not None:
            raise ValueError("group is only used with a grouped (<key>_name, sample_x, sample_y) DataArray.")
        return distances.values, [str(s) for s in distances["sample_x"].values], None
    if len(dims) == 3 and dims[1:] == ("sample_x", "sample_y"):
        names = [str(g) for g in distances[dims[0]].values]
        if group is None or str(group) not in names:
            raise ValueError(f"group must be one of {names} (the {dims[0]!r} coordinate), got {group!r}.")
        values = distances.isel({dims[0]: names.index(str(group))}).values
        return values, [str(s) for s in distances["sample_x"].values], str(group)
    raise ValueError(
        f"distances must have dims (sample_x, sample_y) or (<key>_name, sample_x, sample_y), got {dims}."
    )


def _colour_limit(distances, values: np.ndarray, vmax) -> float:
    """Upper end of the colour scale: over all groups (``"shared"``), this group's (``"group"``),
    or a number."""
    if isinstance(vmax, str):
        if vmax not in ("shared", "group"):
            raise ValueError(f"vmax must be 'shared', 'group' or a positive number; got {vmax!r}.")
        pool = np.asarray(distances.values if vmax == "shared" else values, dtype=float)
        finite = pool[np.isfinite(pool)]
        return float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    if isinstance(vmax, bool) or not isinstance(vmax, (int, float, np.number)) or not np.isfinite(vmax) or vmax <= 0:
        raise ValueError(f"vmax must be 'shared', 'group' or a positive number; got {vmax!r}.")
    return float(vmax)


PALETTES = ("tab10", "Set2", "Dark2", "Accent", "Pastel1")
"""Qualitative colour maps of successive categorical colour bars (tab20 beyond 8 categories)."""


def _colour_row(values: pd.Series, row: int = 0):
    """RGBA colours (n, 4) of a sample_info column and legend handles (None for numeric)."""
    if isinstance(values.dtype, pd.CategoricalDtype) or values.dtype == object or values.dtype == bool:
        cats = pd.Categorical(values.astype(str))
        cmap = plt.get_cmap("tab20" if len(cats.categories) > 8 else PALETTES[row % len(PALETTES)])
        colours = np.array([cmap(code % cmap.N) for code in cats.codes])
        handles = [Patch(color=cmap(i % cmap.N), label=str(c)) for i, c in enumerate(cats.categories)]
        return colours, handles
    numeric = values.to_numpy(dtype=float)
    span = np.ptp(numeric) or 1.0
    return plt.get_cmap("viridis")((numeric - np.min(numeric)) / span), None


def sample_distance_heatmap(
    distances,
    group=None,
    *,
    sample_info: pd.DataFrame | None = None,
    color_by: str | list[str] | None = None,
    linkage: np.ndarray | None = None,
    linkage_method: str = "average",
    cmap: str = "magma_r",
    vmax: str | float = "shared",
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    show: bool | None = None,
):
    """Clustered heatmap of a sample x sample distance matrix with its dendrogram.

    Parameters
    ----------
    distances
        ``xarray.DataArray`` with dims ``(sample_x, sample_y)``, or a grouped one
        ``("<key>_name", sample_x, sample_y)`` (a ``groupby`` variable of
        ``get_local_sample_distances``, or ``distances`` of ``cluster_cells_by_sample_distances``)
        together with ``group``.
    group
        The group (coordinate value) to draw from a grouped DataArray.
    sample_info
        Per-sample table indexed by sample name (``model.sample_info``).
    color_by
        ``sample_info`` column(s) drawn as colour bars above the heatmap.
    linkage
        A precomputed scipy linkage of the samples; default: computed with ``linkage_method`` and
        optimal leaf ordering (:func:`mrvi_pyro.explore.sample_linkage`).
    linkage_method
        Linkage method when ``linkage`` is None.
    vmax
        Upper end of the colour scale (the lower end is 0). ``"shared"`` (default): the largest
        distance over *all* groups of a grouped DataArray, so that heatmaps of different groups
        are comparable (a group without sample structure looks pale, not as structured as one
        with it); ``"group"``: this group's own largest distance; or a number.
    cmap, title, figsize
        Appearance (a whole figure: dendrogram, colour bars and heatmap; no ``ax``).
    show
        True: display the figure and return None.

    Returns
    -------
    matplotlib.figure.Figure, or None with ``show=True``.
    """
    from scipy.cluster.hierarchy import dendrogram

    values, samples, group_name = _square_matrix(distances, group)
    keys = [] if color_by is None else ([color_by] if isinstance(color_by, str) else list(dict.fromkeys(color_by)))
    limit = _colour_limit(distances, values, vmax)
    if keys:
        if sample_info is None:
            raise ValueError("color_by needs sample_info (e.g. model.sample_info).")
        missing = [k for k in keys if k not in sample_info.columns]
        if missing:
            raise ValueError(f"color_by column(s) {missing} not in sample_info (columns: {list(sample_info.columns)}).")
        absent = [s for s in samples if s not in set(map(str, sample_info.index))]
        if absent:
            raise ValueError(f"sample_info has no row for sample(s) {absent[:5]}.")
    link = explore.sample_linkage(values, linkage_method) if linkage is None else np.asarray(linkage)
    n = len(samples)
    size = max(4.0, min(14.0, 2.5 + 0.28 * n))
    fig = plt.figure(figsize=figsize or (size + 1.8, size + 1.2 + 0.25 * len(keys)))
    heights = [1.3] + [0.22] * len(keys) + [size]
    grid = fig.add_gridspec(len(heights), 2, height_ratios=heights, width_ratios=[size, 0.25],
                            hspace=0.04, wspace=0.04)
    ax_tree = fig.add_subplot(grid[0, 0])
    tree = dendrogram(link, ax=ax_tree, no_labels=True, color_threshold=0, above_threshold_color="0.3")
    order = np.asarray(tree["leaves"])
    ax_tree.axis("off")
    handles = []
    info = None if sample_info is None else sample_info.set_axis(sample_info.index.map(str))
    for row, key in enumerate(keys, start=1):
        ax = fig.add_subplot(grid[row, 0])
        colours, legend = _colour_row(info.loc[[samples[i] for i in order], key], row - 1)
        ax.imshow(colours[None], aspect="auto", interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([0])
        ax.set_yticklabels([key], fontsize=8)
        if legend:
            handles += [Patch(color="none", label=key)] + legend
    ax_heat = fig.add_subplot(grid[-1, 0])
    image = ax_heat.imshow(values[np.ix_(order, order)], cmap=cmap, vmin=0.0, vmax=limit, aspect="auto",
                           interpolation="nearest")
    labels = [samples[i] for i in order]
    fontsize = 8 if n <= 40 else 5
    show_labels = n <= 80
    ax_heat.set_xticks(np.arange(n) if show_labels else [])
    ax_heat.set_yticks(np.arange(n) if show_labels else [])
    if show_labels:
        ax_heat.set_xticklabels(labels, rotation=90, fontsize=fontsize)
        ax_heat.set_yticklabels(labels, fontsize=fontsize)
    ax_bar = fig.add_subplot(grid[-1, 1])
    fig.colorbar(image, cax=ax_bar, label="distance" + (" (scale shared by all groups)" if vmax == "shared"
                                                         and group_name is not None else ""))
    if handles:
        fig.legend(handles=handles, loc="upper right", fontsize=7, frameon=False)
    fig.suptitle(title or (f"Local sample distances: {group_name}" if group_name else "Local sample distances"))
    return finish(fig, show)


def local_distance_embedding(
    adata,
    distances,
    *,
    basis: str | None = None,
    latent: np.ndarray | None = None,
    stat: str = "mean",
    title: str | None = None,
    point_size: float = 4.0,
    basis_name: str | None = None,
    ax=None,
    show: bool | None = None,
):
    """A 2-d embedding of cells coloured by a per-cell summary of their local sample distances.

    Parameters
    ----------
    adata
        The cells: an AnnData (drawn on ``obsm[basis]`` or the PCA of ``latent``) or their
        (n_cells, 2) coordinates (e.g. :func:`mrvi_pyro.pl.pca_2d` of ``u``).
    distances
        The Dataset of ``get_local_sample_distances(keep_cell=True)``, its ``"cell"`` DataArray
        (in memory or lazily on disk; read in blocks), or a precomputed (n_cells,) summary.
    basis, latent
        Where to draw the cells of an AnnData (see :func:`mrvi_pyro.pl.basis_coords`).
    stat
        ``"mean"`` (average distance between two different samples) or ``"max"``.
    title, point_size, basis_name, ax
        Appearance; ``ax``: Axes to draw into (default: a new figure).
    show
        True: display the figure and return None.

    Returns
    -------
    matplotlib.figure.Figure, or None with ``show=True``.
    """
    coords, _, axis_name = cell_coords(adata, basis, latent, basis_name)
    if hasattr(distances, "data_vars"):
        if "cell" not in distances:
            raise ValueError("The distances Dataset has no 'cell' variable; compute it with keep_cell=True.")
        distances = distances["cell"]
    if getattr(distances, "ndim", np.ndim(distances)) == 1:
        summary = np.asarray(distances, dtype=float)
    else:
        summary = explore.cell_distance_summary(distances, stat)
    if len(summary) != len(coords):
        raise ValueError(f"coords has {len(coords)} cells but the distances have {len(summary)}.")
    label = f"{stat} local sample distance"
    return embedding(coords, obs=pd.DataFrame({label: summary}), color=label, title=title, point_size=point_size,
                     basis_name=axis_name, ax=ax, show=show)


def sample_mixing_heatmap(summary: pd.DataFrame, *, ax=None, show: bool | None = None):
    """Heatmap of :meth:`mrvi_pyro.MRVI.get_sample_mixing_in_u`'s ``excess`` (rows: groups,
    columns: covariates), each cell annotated with its value and the ``kept`` ones framed.

    0 (white) means the covariate mixes in u as by chance, 1 (dark) that u separates its levels
    completely; a framed cell is one the method flagged (``excess >= threshold``).

    Parameters
    ----------
    summary
        The method's table (columns ``group``, ``covariate``, ``excess``, ``kept``).
    ax, show
        Axes to draw into (default: a new figure); True displays the figure and returns None.
    """
    missing = {"group", "covariate", "excess", "kept"} - set(summary.columns)
    if missing:
        raise ValueError(f"summary lacks column(s) {sorted(missing)}: pass the table of get_sample_mixing_in_u.")
    groups = list(pd.unique(summary["group"]))
    covariates = list(pd.unique(summary["covariate"]))
    excess = summary.pivot(index="group", columns="covariate", values="excess").reindex(index=groups,
                                                                                       columns=covariates)
    kept = summary.pivot(index="group", columns="covariate", values="kept").reindex(index=groups, columns=covariates)
    fig, ax = axes_or_new(ax, (1.8 + 1.1 * len(covariates), 1.0 + 0.4 * len(groups)))
    image = ax.imshow(excess.to_numpy(dtype=float), cmap="Reds", vmin=0.0, vmax=1.0, aspect="auto")
    for i, group in enumerate(groups):
        for j, covariate in enumerate(covariates):
            value = excess.loc[group, covariate]
            if np.isfinite(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if value > 0.6 else "black")
            flagged = kept.loc[group, covariate]
            if isinstance(flagged, (bool, np.bool_)) and flagged:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2))
    ax.set_xticks(range(len(covariates)), [str(c) for c in covariates], rotation=45, ha="right")
    ax.set_yticks(range(len(groups)), [str(g) for g in groups])
    fig.colorbar(image, ax=ax, shrink=0.8, label="excess kNN agreement in u")
    ax.set_title("Sample structure in u (0: mixed as by chance)")
    fig.tight_layout()
    return finish(fig, show)
