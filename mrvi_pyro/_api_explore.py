"""Facade methods of :class:`mrvi_pyro.MRVI` for exploratory analysis: counterfactual sample representations, local sample distances, stratification, admissibility.

The methods marshal arguments and wrap results (xarray/pandas); the maths lives in the analysis
modules. They rely on the facade's ``module``, ``registry``, ``sample_info``,
``_cell_data(adata)`` and ``_indices(data, indices)``.
"""

from __future__ import annotations


class ExploreMixin:
    """Methods of :class:`mrvi_pyro.MRVI` for exploratory analysis: counterfactual sample representations, local sample distances, stratification, admissibility."""
