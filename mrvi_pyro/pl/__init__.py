"""Plotting, scanpy-style: ``import mrvi_pyro.pl as pl`` (``mrvi_pyro.plotting`` is the same module's
functions under its earlier name).

Every function takes the AnnData or the result it draws first, reads only documented outputs,
and returns the matplotlib Figure (``show=True`` displays it and returns None instead, as in
scanpy). Cells are drawn on ``adata.obsm[basis]`` (any key, e.g. scanpy's ``"X_umap"``) or on
the first two principal components of ``latent=`` (e.g. the latent u); single-panel figures
also draw into a given ``ax=``.

Cells: :func:`embedding` (obs columns, e.g. DE/DA columns written with ``key_added``),
:func:`effect_size_embedding`, :func:`log_ratio_embedding`, :func:`local_distance_embedding`.
Results: :func:`sample_distance_heatmap`, :func:`sample_mixing_heatmap`, :func:`volcano`,
:func:`top_genes_heatmap`, :func:`log_ratio_by_group`, :func:`log_ratio_summary`, :func:`training_history`,
:func:`posterior_predictive_check`.
Helpers: :func:`basis_coords`, :func:`pca_2d`, :func:`da_log_ratio`.

Modules depend one way: ``_base`` (coordinates, figure hand-back) <- ``_embedding`` <- ``_de``,
``_da``, ``_explore``, ``_criticism`` <- this package.
"""

from ._base import basis_coords, pca_2d
from ._criticism import posterior_predictive_check
from ._da import da_log_ratio, log_ratio_by_group, log_ratio_embedding, log_ratio_summary
from ._de import P_VALUE_FLOOR, effect_size_embedding, top_genes_heatmap, volcano
from ._embedding import embedding, training_history
from ._explore import local_distance_embedding, sample_distance_heatmap, sample_mixing_heatmap

__all__ = [
    "P_VALUE_FLOOR", "basis_coords", "da_log_ratio", "effect_size_embedding", "embedding", "local_distance_embedding",
    "log_ratio_by_group", "log_ratio_embedding", "log_ratio_summary", "pca_2d", "posterior_predictive_check",
    "sample_distance_heatmap",
    "sample_mixing_heatmap", "top_genes_heatmap", "training_history", "volcano",
]
