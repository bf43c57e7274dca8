"""Figure of a posterior predictive check (:meth:`mrvi_pyro.MRVI.posterior_predictive_check`)."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ._base import finish

_COLUMNS = ("statistic", "gene", "observed", "replicated", "low", "high", "inside")
_LOG_SCALE = ("mean", "variance", "cv")


def posterior_predictive_check(summary: pd.DataFrame, statistics: Sequence[str] | None = None, *,
                               show: bool | None = None):
    """Observed against replicated per-gene statistics, one panel per statistic.

    Each point is a gene: the observed statistic (x) against the median of its replicated
    values (y), with a bar over the central interval of the draws; the diagonal is a perfect
    fit. Each panel's title gives the share of genes whose observed value lies inside its bar,
    near the interval (e.g. 90%) for a model that fits. Means, variances and coefficients of
    variation are drawn on log axes.

    Parameters
    ----------
    summary
        The table of :meth:`mrvi_pyro.MRVI.posterior_predictive_check`.
    statistics
        Which statistics to draw, in this order (default: every one in ``summary``).
    show
        True displays the figure and returns None.
    """
    if not isinstance(summary, pd.DataFrame) or not set(_COLUMNS) <= set(summary.columns):
        raise ValueError("summary must be the DataFrame of model.posterior_predictive_check() (columns "
                         f"{list(_COLUMNS)}).")
    present = list(pd.unique(summary["statistic"].astype(str)))
    statistics = present if statistics is None else [statistics] if isinstance(statistics, str) else list(statistics)
    unknown = [s for s in statistics if s not in present]
    if unknown or not statistics:
        raise ValueError(f"statistics {unknown or statistics} not in the table (it has {present}).")
    interval = summary.attrs.get("interval")
    fig, axes = plt.subplots(1, len(statistics), figsize=(4.2 * len(statistics), 3.8), squeeze=False)
    for ax, name in zip(axes[0], statistics):
        part = summary[summary["statistic"].astype(str) == name]
        part = part[np.isfinite(part["observed"]) & np.isfinite(part["replicated"])]
        if name in _LOG_SCALE:
            part = part[(part["observed"] > 0) & (part["low"] > 0)]
        mid = part["replicated"].to_numpy()
        error = [np.maximum(mid - part["low"].to_numpy(), 0), np.maximum(part["high"].to_numpy() - mid, 0)]
        ax.errorbar(part["observed"], mid, yerr=error, fmt="o", ms=2, lw=0.5, alpha=0.6)
        if len(part):
            low = min(part["observed"].min(), part["low"].min())
            high = max(part["observed"].max(), part["high"].max())
            ax.plot([low, high], [low, high], color="black", lw=0.8)
        if name in _LOG_SCALE:
            ax.set_xscale("log")
            ax.set_yscale("log")
        label = name.replace("_", " ")
        ax.set(xlabel=f"observed {label}", ylabel=f"replicated {label}")
        inside = f"{part['inside'].mean():.0%}" if len(part) else "no genes"
        band = f" of the {interval:.0%} band" if interval is not None else ""
        ax.set_title(f"{label}: {inside} inside{band}")
    fig.tight_layout()
    return finish(fig, show)
