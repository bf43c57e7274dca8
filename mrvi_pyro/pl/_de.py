"""Figures of differential expression. Each function reads documented outputs (the Dataset of
:meth:`mrvi_pyro.MRVI.differential_expression` or the table of
:meth:`mrvi_pyro.MRVI.differential_expression_summary`) and returns the matplotlib figure
(``show=True`` displays it instead)."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ._base import axes_or_new, cell_coords, finish
from ._embedding import embedding

P_VALUE_FLOOR = 1e-7
"""Smallest p-value shown: the per-cell p-values are computed to an absolute accuracy of about
1e-7 (:mod:`mrvi_pyro.de`), so smaller ones are not resolved and are drawn at this floor."""


def _pick_covariate(values: Sequence[str], covariate: str | None) -> str:
    values = [str(v) for v in values]
    if covariate is None:
        return values[0]
    if covariate not in values:
        raise ValueError(f"covariate {covariate!r} not among {values}.")
    return covariate


def effect_size_embedding(de, adata, covariate: str | None = None, *, basis: str | None = None,
                          latent: np.ndarray | None = None, obs: pd.DataFrame | None = None,
                          color: str | Sequence[str] | None = None, point_size: float = 4.0,
                          basis_name: str | None = None, show: bool | None = None):
    """Per-cell effect size and significance of one covariate on a 2-d embedding.

    Panels: ``log10(1 + effect_size)``, ``-log10(padj)``, then the ``obs`` columns ``color``
    (e.g. cell type) for reference. ``padj`` is clipped below at ``P_VALUE_FLOOR`` (1e-7, the
    absolute accuracy of the p-value computation), so ``-log10 padj`` tops out at 7: smaller
    values are not resolved and would otherwise show as an arbitrary ~300.

    Parameters
    ----------
    de
        Result of ``differential_expression`` (needs ``effect_size`` and ``padj``).
    adata
        The same cells: an AnnData (drawn on ``obsm[basis]`` or the PCA of ``latent``; ``color``
        columns from its ``obs``), or their (n_cells, 2) coordinates (then ``color`` columns
        come from ``obs``).
    covariate
        Covariate column (default: the first).
    basis, latent
        Where to draw the cells of an AnnData (see :func:`mrvi_pyro.pl.basis_coords`).
    obs, color
        Extra panels coloured by these obs columns.
    point_size, basis_name
        Appearance (``basis_name`` names the axes when ``adata`` is an array of coordinates).
    show
        True: display the figure and return None.
    """
    coords, cell_obs, axis_name = cell_coords(adata, basis, latent, basis_name)
    obs = cell_obs if obs is None else obs
    covariate = _pick_covariate(de["covariate"].values, covariate)
    effect = np.asarray(de["effect_size"].sel(covariate=covariate).values, dtype=float)
    padj = np.asarray(de["padj"].sel(covariate=covariate).values, dtype=float)
    if len(effect) != len(coords):
        raise ValueError(f"The DE result has {len(effect)} cells but {len(coords)} are drawn; pass the same cells.")
    table = pd.DataFrame({
        f"log10(1 + effect size) {covariate}": np.log10(1 + effect),
        f"-log10 padj (clipped at {P_VALUE_FLOOR:g})": -np.log10(np.clip(padj, P_VALUE_FLOOR, 1)),
    })
    keys = list(table.columns)
    if color is not None:
        extra = [color] if isinstance(color, str) else list(color)
        if obs is None:
            raise ValueError("Pass an AnnData as adata (or obs= aligned with the cells) to colour by obs columns.")
        for key in extra:
            if key not in obs:
                raise ValueError(f"color key {key!r} not in obs (columns: {list(obs.columns)}).")
            table[key] = obs[key].to_numpy()
            keys.append(key)
    return embedding(coords, obs=table, color=keys, title=f"Differential expression: {covariate}",
                     point_size=point_size, basis_name=axis_name, show=show)


def top_genes_heatmap(summary: pd.DataFrame, covariate: str | None = None, *, n_genes: int = 5,
                      value: str = "lfc_mean", ax=None, show: bool | None = None):
    """Heatmap of the mean LFC of each group's top genes (rows: genes, columns: groups).

    Parameters
    ----------
    summary
        Table of ``differential_expression_summary`` with all genes (``n_top_genes=None``) or
        at least the top ``n_genes`` of each group.
    covariate
        Covariate column (default: the first in the table).
    n_genes
        Top genes per group (by ``rank``); the rows are their union, grouped by the group in
        which they rank best.
    value
        Column shown (default ``lfc_mean``).
    ax, show
        Axes to draw into (default: a new figure); True displays the figure and returns None.
    """
    if "gene" not in summary:
        raise ValueError("summary has no gene columns: run differential_expression with store_lfc=True.")
    covariate = _pick_covariate(summary["covariate"].unique(), covariate)
    table = summary[summary["covariate"] == covariate]
    groups = list(pd.unique(table["group"]))
    top = table[table["rank"] <= n_genes].sort_values(["group", "rank"])
    genes = list(dict.fromkeys(top["gene"]))
    matrix = table.pivot_table(index="gene", columns="group", values=value, observed=False).reindex(
        index=genes, columns=groups)
    limit = float(np.nanmax(np.abs(matrix.to_numpy()))) if matrix.size else 1.0
    fig, ax = axes_or_new(ax, (1.2 + 0.7 * len(groups), 1.0 + 0.28 * len(genes)))
    image = ax.imshow(matrix.to_numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(len(groups)), [str(g) for g in groups], rotation=45, ha="right")
    ax.set_yticks(range(len(genes)), genes, fontsize=7)
    fig.colorbar(image, ax=ax, shrink=0.8, label=f"{value} (log2)")
    ax.set_title(f"Top {n_genes} genes per group: {covariate}")
    fig.tight_layout()
    return finish(fig, show)


def _significance(part: pd.DataFrame, y: str) -> tuple[np.ndarray, str]:
    """(-log10 of an error probability, axis label) for the volcano's y axis."""
    if y == "pde_mean":
        error = 1.0 - part[y].to_numpy(dtype=float)
        return error, "-log10(1 - mean P(|lfc| >= delta))"
    return part[y].to_numpy(dtype=float), f"-log10 {y}"


def _place_labels(ax, points: pd.DataFrame, x: str, y: str, limit: int) -> list:
    """Write gene names next to ``points`` (best first), skipping any whose text would overlap an
    earlier one, at most ``limit``; returns the texts kept."""
    renderer = ax.figure.canvas.get_renderer()
    panel = ax.get_window_extent(renderer)
    middle = sum(ax.get_xlim()) / 2
    kept, boxes = [], []
    for _, row in points.iterrows():
        if len(kept) >= limit:
            break
        right = row[x] <= middle  # write towards the panel's centre
        text = ax.annotate(str(row["gene"]), (row[x], row[y]), fontsize=6, xytext=(2 if right else -2, 2),
                           textcoords="offset points", ha="left" if right else "right")
        box = text.get_window_extent(renderer).expanded(1.05, 1.15)
        inside = panel.x0 <= box.x0 and box.x1 <= panel.x1 and panel.y0 <= box.y0 and box.y1 <= panel.y1
        if not inside or any(box.overlaps(other) for other in boxes):
            text.remove()
            continue
        kept.append(text)
        boxes.append(box)
    return kept


def volcano(summary: pd.DataFrame, covariate: str | None = None, *, groups: Sequence | None = None,
            highlight: Sequence[str] | None = None, n_label: int = 10, x: str = "lfc_mean", y: str = "pde_mean",
            ax=None, show: bool | None = None):
    """Volcano plot per group: mean LFC against a significance measure on a -log10 scale.

    The panels share both axes, so a group whose genes barely move looks flat next to one whose
    genes move a lot.

    Parameters
    ----------
    summary
        Table of ``differential_expression_summary`` with all genes (``n_top_genes=None``).
    covariate
        Covariate column (default: the first in the table).
    groups
        Groups to draw (default all), one panel each.
    highlight
        Genes drawn in red (e.g. known or planted DE genes).
    n_label
        At most this many genes per panel get their names written: the best-ranked ones (by
        ``rank``) whose labels do not overlap a better-ranked gene's label.
    x
        Column on the x axis (log2 fold change).
    y
        Significance column. ``"pde_mean"`` (default): the y axis is ``-log10(1 - pde_mean)``,
        where ``1 - pde_mean`` is the posterior probability that the gene's |LFC| is below
        ``delta``, averaged over the group's cells (a posterior error probability: 2 means 1%).
        Any other column is read as p-values (e.g. a per-gene ``padj`` from another test) and
        drawn as ``-log10``. Values below ``P_VALUE_FLOOR`` (1e-7, the accuracy of the p-value
        computation; for ``pde_mean``, below the smallest nonzero value in the table, the
        resolution of the posterior draws) are drawn at that floor as triangles.
    ax
        Axes to draw into when one group is drawn (default: a new figure).
    show
        True: display the figure and return None.
    """
    if "gene" not in summary:
        raise ValueError("summary has no gene columns: run differential_expression with store_lfc=True.")
    if y not in summary:
        raise ValueError(f"Column {y!r} not in the summary (pde needs delta); columns: {list(summary.columns)}.")
    covariate = _pick_covariate(summary["covariate"].unique(), covariate)
    table = summary[summary["covariate"] == covariate].copy()
    error, label = _significance(table, y)
    if (error < 0).any() or (error > 1).any():
        raise ValueError(f"Column {y!r} is not a probability (values outside [0, 1]); pass a p-value column as y.")
    positive = error[error > 0]
    floor = P_VALUE_FLOOR if y != "pde_mean" else (positive.min() if positive.size else 1e-3)
    floor = max(floor, P_VALUE_FLOOR)
    table["_saturated"] = error < floor
    table["_y"] = -np.log10(np.clip(error, floor, 1.0))
    names = list(pd.unique(table["group"])) if groups is None else list(groups)
    marked = set() if highlight is None else {str(g) for g in highlight}
    own_figure = ax is None
    if not own_figure:
        if len(names) != 1:
            raise ValueError(f"ax= holds one panel, but {len(names)} groups are drawn; pass groups=[one] or no ax.")
        fig, axes = ax.figure, np.array([[ax]])
    else:
        fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.4), squeeze=False, sharex=True,
                                 sharey=True)
    for panel, name in zip(axes[0], names):
        part = table[table["group"] == name]
        hit = part["gene"].isin(marked).to_numpy()
        saturated = part["_saturated"].to_numpy()
        for mask, colour, size, tag in ((~hit, "0.6", 6, "other"), (hit, "tab:red", 10, "highlighted")):
            panel.scatter(part[x][mask & ~saturated], part["_y"][mask & ~saturated], s=size, color=colour, label=tag)
            if (mask & saturated).any():
                panel.scatter(part[x][mask & saturated], part["_y"][mask & saturated], s=size + 6, color=colour,
                              marker="^", label=f"{tag}, at floor")
        panel.axvline(0, color="0.8", lw=0.8)
        panel.set_title(str(name) if own_figure else f"Volcano: {covariate}, {name}")
        panel.set_xlabel(f"{x} (log2)")
    span = float(np.nanmax(np.abs(table[x].to_numpy(dtype=float)))) if len(table) else 1.0
    axes[0, 0].set_xlim(-1.05 * (span or 1.0), 1.05 * (span or 1.0))
    axes[0, 0].set_ylim(0, 1.08 * max(float(table["_y"].max()), 1.0))
    axes[0, 0].set_ylabel(label)
    if own_figure:
        fig.suptitle(f"Volcano: {covariate}")
    fig.tight_layout()
    for panel, name in zip(axes[0], names):
        part = table[table["group"] == name]
        ranked = part.sort_values("rank") if "rank" in part else part
        _place_labels(panel, ranked, x, "_y", n_label)
    if marked or table["_saturated"].any():
        unique = {}
        for panel in axes[0]:
            handles, tags = panel.get_legend_handles_labels()
            unique.update({t: h for t, h in zip(tags, handles) if t not in unique})
        axes[0, 0].legend(unique.values(), unique.keys(), frameon=False, fontsize=7)
    return finish(fig, show)
