"""Facade methods of :class:`mrvi_pyro.MRVI` for differential abundance.

The methods marshal arguments and wrap results (xarray/pandas); the maths lives in the analysis
modules. They rely on the facade's ``module``, ``registry``, ``sample_info``,
``_cell_data(adata)`` and ``_indices(data, indices)``.
"""

from __future__ import annotations


class DAMixin:
    """Methods of :class:`mrvi_pyro.MRVI` for differential abundance."""
