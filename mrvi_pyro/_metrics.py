"""Small evaluation metrics used to check results against planted truth (demo, tutorials)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats
from scipy.special import comb


def auroc(labels, scores) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (Mann-Whitney U / n1 n2)."""
    labels = np.asarray(labels, dtype=bool)
    ranks = stats.rankdata(np.asarray(scores, dtype=float))
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        raise ValueError("auroc needs both positive and negative labels.")
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def adjusted_rand_index(labels_a, labels_b) -> float:
    """Adjusted Rand index between two labelings (Hubert and Arabie)."""
    table = pd.crosstab(np.asarray(labels_a), np.asarray(labels_b)).to_numpy()
    n = table.sum()
    sum_cells = comb(table, 2).sum()
    sum_rows, sum_cols = comb(table.sum(1), 2).sum(), comb(table.sum(0), 2).sum()
    expected = sum_rows * sum_cols / comb(n, 2)
    maximum = (sum_rows + sum_cols) / 2
    return float(1.0 if maximum == expected else (sum_cells - expected) / (maximum - expected))
