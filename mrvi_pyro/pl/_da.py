"""Differential-abundance figures. Each function reads documented outputs and returns the figure
(``show=True`` displays it instead).

Inputs are the Datasets of :meth:`mrvi_pyro.MRVI.differential_abundance` (per-cell
``"<key>_log_probs"``) and :meth:`mrvi_pyro.MRVI.differential_abundance_summary`
(``log_ratio``, ``log_ratio_lower``/``_upper``, ``prob_positive`` and the per-group
``"<groupby>_..."`` variables).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import xarray as xr
from matplotlib.colors import TwoSlopeNorm

from ._base import axes_or_new, cell_coords, finish, is_anndata


def da_log_ratio(da_result: xr.Dataset, key: str, group1, group2) -> np.ndarray:
    """Per-cell ``log q_{group1} - log q_{group2}`` from a :meth:`differential_abundance` result."""
    name = f"{key}_log_probs"
    if name not in da_result:
        raise ValueError(f"{name!r} is not in the result; run differential_abundance(sample_cov_keys=[{key!r}]).")
    values = da_result[name]
    levels = [str(v) for v in values[key].values]
    for level in (group1, group2):
        if str(level) not in levels:
            raise ValueError(f"{level!r} is not a level of {key!r} in the result (levels: {levels}).")
    return (values.sel({key: group1}) - values.sel({key: group2})).values


def log_ratio_embedding(log_ratio, adata, *, basis: str | None = None, latent: np.ndarray | None = None,
                        title: str = "DA log-ratio", ax=None, point_size: float = 4.0, basis_name: str | None = None,
                        show: bool | None = None):
    """Cells on a 2-d embedding coloured by their DA log-ratio (diverging colours centred at 0 and
    clipped at the 99th percentile of |log-ratio|; NaN cells in grey).

    Parameters
    ----------
    log_ratio
        Per-cell values (n_cells,), e.g. ``summary["log_ratio"]`` of
        :meth:`~mrvi_pyro.MRVI.differential_abundance_summary` or :func:`da_log_ratio`.
    adata
        The same cells: an AnnData (drawn on ``obsm[basis]`` or the PCA of ``latent``) or their
        (n_cells, 2) coordinates.
    basis, latent, basis_name
        Where to draw the cells of an AnnData (see :func:`mrvi_pyro.pl.basis_coords`); axis
        name for coordinates.
    title, ax, point_size
        Appearance; ``ax``: Axes to draw into (default: a new figure).
    show
        True: display the figure and return None.
    """
    values = np.asarray(log_ratio, dtype=float)
    coords, _, axis_name = cell_coords(adata, basis, latent, basis_name)
    if coords.shape != (len(values), 2):
        raise ValueError(f"coords must have shape ({len(values)}, 2); got {coords.shape}.")
    fig, ax = axes_or_new(ax, (4.8, 4))
    finite = np.isfinite(values)
    ax.scatter(coords[~finite, 0], coords[~finite, 1], s=point_size, color="lightgrey")
    span = float(np.quantile(np.abs(values[finite]), 0.99)) if finite.any() else 1.0  # robust to a few extremes
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-span or -1.0, vmax=span or 1.0)
    order = np.argsort(np.abs(np.where(finite, values, 0.0)))
    order = order[finite[order]]
    points = ax.scatter(coords[order, 0], coords[order, 1], s=point_size, c=values[order], cmap="RdBu_r", norm=norm)
    fig.colorbar(points, ax=ax, shrink=0.8, label="log-ratio")
    ax.set_title(title)
    ax.set_xlabel(f"{axis_name}1")
    ax.set_ylabel(f"{axis_name}2")
    ax.set_xticks([])
    ax.set_yticks([])
    return finish(fig, show)


def log_ratio_by_group(summary: xr.Dataset, groups, *, groupby: str | None = None, ax=None,
                       clip_quantiles: tuple[float, float] | None = (0.01, 0.99), show: bool | None = None):
    """Per-group distributions of the per-cell mean log-ratio (violins), with each group's
    mean log-ratio and its highest-density interval (from ``"<groupby>_log_ratio"``,
    ``"_lower"``, ``"_upper"`` when present) and ``prob_positive`` written above.

    The y range spans the ``clip_quantiles`` of all cells' log-ratios (widened to show every
    group mean and interval), so a few extreme cells do not squash the groups; cells beyond it
    are drawn as triangles on the edge they pass, with their count.

    Parameters
    ----------
    summary
        Result of :meth:`differential_abundance_summary`.
    groups
        The AnnData of the cells (then the groups are ``obs[groupby]``), or per-cell group labels
        (length n_cells), e.g. ``adata.obs["cell_type"]``.
    groupby
        The name used for ``groupby`` in the summary (for the per-group interval); needed with
        an AnnData.
    ax
        Axes to draw into (default: a new figure).
    clip_quantiles
        Lower and upper quantile of the y range; ``None`` shows every cell.
    show
        True: display the figure and return None.
    """
    values = np.asarray(summary["log_ratio"].values, dtype=float)
    if is_anndata(groups):
        if groupby is None or groupby not in groups.obs:
            raise ValueError(f"With an AnnData, groupby must name one of its obs columns; got {groupby!r}.")
        groups = groups.obs[groupby].to_numpy()
    labels = pd.Categorical(np.asarray(groups))
    if len(labels) != len(values):
        raise ValueError(f"groups has {len(labels)} entries for {len(values)} cells.")
    names = list(labels.categories)
    data = [values[(labels == g) & np.isfinite(values)] for g in names]
    fig, ax = axes_or_new(ax, (1.1 * len(names) + 2.5, 3.8))
    positions = np.arange(len(names))
    table = None
    if groupby is not None and f"{groupby}_log_ratio" in summary:
        table = summary[[f"{groupby}_log_ratio", f"{groupby}_log_ratio_lower", f"{groupby}_log_ratio_upper",
                         f"{groupby}_prob_positive"]].to_dataframe().reindex(names)
    low_limit, high_limit = _y_range(values, clip_quantiles, None if table is None else table.iloc[:, :3].to_numpy())
    for i, d in enumerate(data):
        inside = (d >= low_limit) & (d <= high_limit)
        for edge, outside, marker in ((low_limit, d < low_limit, "v"), (high_limit, d > high_limit, "^")):
            if outside.any():
                ax.scatter([positions[i]], [edge], marker=marker, color="tab:red", s=18, zorder=3,
                           label="cells beyond the range")
                ax.annotate(f"{outside.sum()}", (positions[i], edge), xytext=(5, 0), textcoords="offset points",
                            fontsize=6, va="center", color="tab:red")
        data[i] = d[inside]
    usable = [i for i, d in enumerate(data) if len(d) > 1]
    if usable:
        ax.violinplot([data[i] for i in usable], positions=positions[usable], showextrema=False, widths=0.8)
    ax.axhline(0.0, color="grey", lw=0.8, ls="--")
    pad = 0.05 * (high_limit - low_limit or 1.0)
    ax.set_ylim(low_limit - pad, high_limit + pad)
    if table is not None:
        mean = table[f"{groupby}_log_ratio"].to_numpy()
        low, high = table[f"{groupby}_log_ratio_lower"].to_numpy(), table[f"{groupby}_log_ratio_upper"].to_numpy()
        ax.errorbar(positions, mean, yerr=[mean - low, high - mean], fmt="o", color="black", capsize=4,
                    label=f"group mean, {100 * summary.attrs.get('hdi_prob', 0.95):.0f}% HDI")
        top = ax.get_ylim()[1]
        for x, p in zip(positions, table[f"{groupby}_prob_positive"].to_numpy()):
            ax.text(x, top, f"P>0: {p:.2f}", ha="center", va="bottom", fontsize=7)
    handles, tags = ax.get_legend_handles_labels()
    if handles:
        unique = dict(zip(tags, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=7, frameon=False, loc="lower right")
    ax.set_xticks(positions)
    ax.set_xticklabels(names, rotation=45, ha="right")
    g1, g2 = summary.attrs.get("group1", "group1"), summary.attrs.get("group2", "group2")
    ax.set_ylabel(f"log q({g1}) - log q({g2})")
    fig.tight_layout()
    return finish(fig, show)


def _y_range(values: np.ndarray, quantiles, must_show) -> tuple[float, float]:
    """Y range of the violins: the ``quantiles`` of the finite ``values``, widened to the finite
    entries of ``must_show``; everything when ``quantiles`` is None."""
    finite = values[np.isfinite(values)]
    if not finite.size:
        return -1.0, 1.0
    if quantiles is None:
        low, high = float(finite.min()), float(finite.max())
    else:
        q_low, q_high = quantiles
        if not 0 <= q_low < q_high <= 1:
            raise ValueError(f"clip_quantiles must be (low, high) with 0 <= low < high <= 1; got {quantiles!r}.")
        low, high = (float(v) for v in np.quantile(finite, [q_low, q_high]))
    if must_show is not None:
        shown = must_show[np.isfinite(must_show)]
        if shown.size:
            low, high = min(low, float(shown.min())), max(high, float(shown.max()))
    return low, high


def log_ratio_summary(summary: xr.Dataset, adata, obs: pd.DataFrame | None = None, groupby: str | None = None, *,
                      basis: str | None = None, latent: np.ndarray | None = None, basis_name: str | None = None,
                      show: bool | None = None):
    """Two panels: the per-cell log-ratio on an embedding, and its per-group distributions with
    intervals (see :func:`log_ratio_embedding` and :func:`log_ratio_by_group`).

    Parameters
    ----------
    summary
        Result of :meth:`~mrvi_pyro.MRVI.differential_abundance_summary`.
    adata
        The same cells: an AnnData (drawn on ``obsm[basis]`` or the PCA of ``latent``; groups
        from its ``obs``) or their (n_cells, 2) coordinates together with ``obs``.
    obs, groupby
        Per-cell table (default: ``adata.obs``) and its column grouping the cells.
    basis, latent, basis_name
        Where to draw the cells (see :func:`mrvi_pyro.pl.basis_coords`).
    show
        True: display the figure and return None.
    """
    coords, cell_obs, axis_name = cell_coords(adata, basis, latent, basis_name)
    obs = cell_obs if obs is None else obs
    if obs is None or groupby is None or groupby not in obs:
        columns = None if obs is None else list(obs.columns)
        raise ValueError(f"groupby {groupby!r} is not a column of obs (columns: {columns}).")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3), gridspec_kw={"width_ratios": [1, 1.2]})
    g1, g2 = summary.attrs.get("group1", "group1"), summary.attrs.get("group2", "group2")
    log_ratio_embedding(summary["log_ratio"].values, coords, ax=axes[0], title=f"DA log-ratio, {g1} vs {g2}",
                        basis_name=axis_name)
    log_ratio_by_group(summary, obs[groupby].to_numpy(), groupby=groupby, ax=axes[1])
    fig.tight_layout()
    return finish(fig, show)
