"""arviz's highest-density intervals, imported without arviz's once-a-day FutureWarning.

Recent arviz releases warn at import time (once a day per user) that a refactor is coming; the
message says nothing about our results, so the warning is filtered around our import only (other
warnings, and arviz imported by the user's own code, are untouched).
"""

from __future__ import annotations

import warnings

import numpy as np

_REFACTOR_NOTICE = r"\s*ArviZ is undergoing a major refactor"


def hdi(values: np.ndarray, hdi_prob: float) -> np.ndarray:
    """:func:`arviz.hdi` of ``values`` (chain, draw, ...) as an array (..., 2)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_REFACTOR_NOTICE, category=FutureWarning)
        import arviz

    return np.asarray(arviz.hdi(values, hdi_prob=hdi_prob))
