"""What every figure of :mod:`mrvi_pyro.pl` shares: where the cells are drawn (an ``obsm`` key of
an AnnData, the principal components of a latent, or given coordinates), a fresh figure or the
caller's Axes, and how the figure is handed back (``show``)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np


def pca_2d(values: np.ndarray) -> np.ndarray:
    """First two principal components of ``values`` (n, d) (a cheap 2-d embedding)."""
    centered = values - values.mean(0)
    _, _, vt = np.linalg.svd(centered, full_matrices=False)
    return centered @ vt[:2].T


def is_anndata(value) -> bool:
    """True for an AnnData (duck-typed: ``obs`` and ``obsm``; no anndata import needed)."""
    return hasattr(value, "obsm") and hasattr(value, "obs")


def basis_coords(adata, basis: str | None = None, *, latent: np.ndarray | None = None) -> tuple[np.ndarray, str]:
    """(n_cells, 2) coordinates of a 2-d embedding and the name of its axes.

    Parameters
    ----------
    adata
        The AnnData whose ``obsm`` holds the embedding.
    basis
        Any ``obsm`` key (e.g. ``"X_umap"`` from scanpy, ``"X_mrvi_u"``): its first two columns,
        axes named after the key (``"X_umap"`` -> ``UMAP1``, ``UMAP2``). None: the first two
        principal components of ``latent`` (:func:`pca_2d`), axes ``PC1``, ``PC2``.
    latent
        (n_cells, d) values to project when ``basis`` is None (e.g. the latent u).
    """
    if basis is None:
        if latent is None:
            raise ValueError("Pass basis= (an obsm key such as 'X_umap') or latent= (values to project on PCA).")
        return pca_2d(np.asarray(latent, dtype=float)), "PC"
    if basis not in adata.obsm:
        raise ValueError(f"basis {basis!r} is not a key of adata.obsm (keys: {list(adata.obsm.keys())}); "
                         "compute it first (e.g. sc.tl.umap) or leave basis=None for PCA of u.")
    coords = np.asarray(adata.obsm[basis])
    if coords.ndim != 2 or coords.shape[1] < 2:
        raise ValueError(f"adata.obsm[{basis!r}] must have at least 2 columns; got shape {coords.shape}.")
    name = basis[2:] if basis.startswith("X_") else basis
    return coords[:, :2].astype(float), name.upper() if name.islower() and len(name) <= 5 else name


def cell_coords(where, basis: str | None = None, latent=None, basis_name: str | None = None):
    """(coords (n, 2), obs or None, axis name) of the cells to draw.

    ``where`` is an AnnData (coordinates from ``basis`` or the PCA of ``latent``, see
    :func:`basis_coords`; ``obs`` from it) or an (n, 2) array of coordinates (then ``obs`` is
    None and the axes are named ``basis_name``, default ``"PC"``).
    """
    if is_anndata(where):
        coords, name = basis_coords(where, basis, latent=latent)
        if len(coords) != where.n_obs:
            raise ValueError(f"latent has {len(coords)} rows for the {where.n_obs} cells of adata.")
        return coords, where.obs, basis_name or name
    if basis is not None or latent is not None:
        raise ValueError("basis= and latent= select coordinates of an AnnData; pass the AnnData (not an array) "
                         "as the cells to draw, or pass the (n_cells, 2) coordinates alone.")
    coords = np.asarray(where, dtype=float)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"The cells to draw must be an AnnData or (n_cells, 2) coordinates; got shape {coords.shape}.")
    return coords, None, basis_name or "PC"


def axes_or_new(ax, figsize: tuple[float, float]):
    """(figure, Axes): the caller's ``ax`` and its figure, or a new figure of ``figsize``."""
    if ax is None:
        return plt.subplots(figsize=figsize)
    return ax.figure, ax


def finish(fig, show: bool | None):
    """scanpy's convention: ``show=True`` displays the figure (:func:`matplotlib.pyplot.show`) and
    returns None; otherwise the figure is returned (not displayed, so it can be edited or saved)."""
    if show:
        plt.show()
        return None
    return fig
