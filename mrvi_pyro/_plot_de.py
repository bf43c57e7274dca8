"""Figures of differential expression. Each function reads documented outputs (the Dataset of
:meth:`mrvi_pyro.MRVI.differential_expression` or the table of
:meth:`mrvi_pyro.MRVI.differential_expression_summary`) and returns the matplotlib figure."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from .plotting import embedding, plt


def _pick_covariate(values: Sequence[str], covariate: str | None) -> str:
    values = [str(v) for v in values]
    if covariate is None:
        return values[0]
    if covariate not in values:
        raise ValueError(f"covariate {covariate!r} not among {values}.")
    return covariate


def effect_size_embedding(de, coords: np.ndarray, covariate: str | None = None, *, obs: pd.DataFrame | None = None,
                          color: str | Sequence[str] | None = None, point_size: float = 4.0):
    """Per-cell effect size and significance of one covariate on a 2-d embedding.

    Panels: ``log10(1 + effect_size)``, ``-log10(padj)``, then the ``obs`` columns ``color``
    (e.g. cell type) for reference.

    Parameters
    ----------
    de
        Result of ``differential_expression`` (needs ``effect_size`` and ``padj``).
    coords
        (n_cells, 2) embedding of the same cells (e.g. ``pca_2d`` of the latent u).
    covariate
        Covariate column (default: the first).
    obs, color
        Extra panels coloured by these obs columns (``obs`` rows aligned with the cells).
    """
    covariate = _pick_covariate(de["covariate"].values, covariate)
    effect = np.asarray(de["effect_size"].sel(covariate=covariate).values, dtype=float)
    padj = np.asarray(de["padj"].sel(covariate=covariate).values, dtype=float)
    table = pd.DataFrame({
        f"log10(1 + effect size) {covariate}": np.log10(1 + effect),
        "-log10 padj": -np.log10(np.clip(padj, 1e-300, 1)),
    })
    keys = list(table.columns)
    if color is not None:
        extra = [color] if isinstance(color, str) else list(color)
        if obs is None:
            raise ValueError("Pass obs= (aligned with the cells) to colour by obs columns.")
        for key in extra:
            if key not in obs:
                raise ValueError(f"color key {key!r} not in obs (columns: {list(obs.columns)}).")
            table[key] = obs[key].to_numpy()
            keys.append(key)
    return embedding(np.asarray(coords), table, keys, title=f"Differential expression: {covariate}",
                     point_size=point_size)


def top_genes_heatmap(summary: pd.DataFrame, covariate: str | None = None, *, n_genes: int = 5,
                      value: str = "lfc_mean"):
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
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(groups), 1.0 + 0.28 * len(genes)))
    image = ax.imshow(matrix.to_numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(len(groups)), [str(g) for g in groups], rotation=45, ha="right")
    ax.set_yticks(range(len(genes)), genes, fontsize=7)
    fig.colorbar(image, ax=ax, shrink=0.8, label=f"{value} (log2)")
    ax.set_title(f"Top {n_genes} genes per group: {covariate}")
    fig.tight_layout()
    return fig


def volcano(summary: pd.DataFrame, covariate: str | None = None, *, groups: Sequence | None = None,
            highlight: Sequence[str] | None = None, n_label: int = 5, x: str = "lfc_mean", y: str = "pde_mean"):
    """Volcano plot per group: mean LFC against the mean posterior DE probability.

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
        The top ``n_label`` genes of each group (by ``rank``) get their names written.
    x, y
        Columns on the axes (``y`` may also be e.g. ``lfc_std_mean``).
    """
    if "gene" not in summary:
        raise ValueError("summary has no gene columns: run differential_expression with store_lfc=True.")
    if y not in summary:
        raise ValueError(f"Column {y!r} not in the summary (pde needs delta); columns: {list(summary.columns)}.")
    covariate = _pick_covariate(summary["covariate"].unique(), covariate)
    table = summary[summary["covariate"] == covariate]
    names = list(pd.unique(table["group"])) if groups is None else list(groups)
    marked = set() if highlight is None else {str(g) for g in highlight}
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.4), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], names):
        part = table[table["group"] == name]
        hit = part["gene"].isin(marked).to_numpy()
        ax.scatter(part[x][~hit], part[y][~hit], s=6, color="0.6", label="other")
        if hit.any():
            ax.scatter(part[x][hit], part[y][hit], s=10, color="tab:red", label="highlighted")
        for _, row in part[part["rank"] <= n_label].iterrows():
            ax.annotate(row["gene"], (row[x], row[y]), fontsize=6, xytext=(2, 2), textcoords="offset points")
        ax.axvline(0, color="0.8", lw=0.8)
        ax.set_title(str(name))
        ax.set_xlabel(f"{x} (log2)")
    axes[0, 0].set_ylabel(y)
    if marked:
        axes[0, 0].legend(frameon=False, fontsize=7)
    fig.suptitle(f"Volcano: {covariate}")
    fig.tight_layout()
    return fig
