r"""Exploratory analysis: counterfactual sample representations, local sample distances, stratification.

Everything here works through the analysis protocol of :mod:`mrvi_pyro.module`
(``encode_u`` via :func:`mrvi_pyro.posterior.iter_posterior_u`, ``counterfactual_z``) and a
:class:`mrvi_pyro.data.CellData`; nothing takes an AnnData or the facade.

Counterfactual representations
------------------------------
For cell :math:`n` with posterior :math:`q(u_n \mid x_n, s_n)`, the counterfactual state under
sample :math:`s` is :math:`z_n^{(s)} = z_{\text{base}}(u_n) + f_\phi(u_n, s)`. All
:math:`S` samples are one tensor dimension (``counterfactual_z(u)`` maps ``(..., L_u)`` to
``(..., S, L)``) and every sample of a cell shares the same :math:`u_n` (paired): the posterior
mean by default, or the same posterior draw :math:`u_n^{(m)}` for all samples (the reference
re-draws ``u`` per sample, which adds posterior noise to every sample difference).

Local sample distances
----------------------
:math:`D^{(n)}_{ss'} = \lVert z_n^{(s)} - z_n^{(s')} \rVert` with the ``l2``, ``l1`` or ``linf``
norm (``torch.cdist`` in its direct mode, so the diagonal is exactly 0 and the matrix exactly
symmetric). With posterior draws (``use_mean=False``) the distance is averaged over
:math:`M` paired draws, :math:`D^{(n)} = \frac1M \sum_m D^{(n, m)}`.

*Normalised distances* z-score each cell's distances against the spread of its own-sample
posterior: with :math:`M` = ``mc_samples`` independent pairs of draws
:math:`u^{(a)}_m, u^{(b)}_m \sim q(u_n \mid x_n, s_n)`, let
:math:`b_m = \lVert z(u^{(a)}_m, s_n) - z(u^{(b)}_m, s_n) \rVert` (same norm),
:math:`\mu_n = \operatorname{mean}_m b_m` and :math:`\sigma_n = \operatorname{sd}_m b_m`
(``ddof=1``). Then :math:`\tilde D^{(n)}_{ss'} = (D^{(n)}_{ss'} - \mu_n) / \sigma_n`: how many
standard deviations a sample difference lies above the distance between two posterior draws of
the cell itself. Values below 0 mean "within posterior noise"; the diagonal is
:math:`-\mu_n / \sigma_n`, not 0.

Streaming and memory
--------------------
Distances are produced chunk by chunk (:func:`iter_local_sample_distances`). Group means are
accumulated as float64 sums with ``index_add_`` (:class:`GroupedMean`), so memory is
O(chunk x S^2 + groups x S^2). Float64 sums of float32 values are exact for any realistic
number of cells, so group means do not depend on the chunk order or size of the summation. The
per-cell tensor goes either to a preallocated array or, chunk by chunk, to a zarr store
(:class:`mrvi_pyro._storage.CellArrays`) that is opened lazily; it is never assembled in RAM in that case.

Stratification
--------------
Cells are clustered by their distance matrices: each matrix is reduced to its condensed upper
triangle (``S(S-1)/2`` values), sketched by a seeded Gaussian random projection when that is
longer than ``sketch_dim`` (Johnson-Lindenstrauss: Euclidean distances between cells are
preserved up to a small relative error), then PCA and k-means (scikit-learn). Samples are
clustered per cell cluster by hierarchical clustering of the averaged matrix (scipy, with
optimal leaf ordering).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ._storage import CellArrays, open_store
from .distributed import CellPartition
from .posterior import iter_posterior_u

NORMS = {"l2": 2.0, "l1": 1.0, "linf": float("inf")}
"""Supported norms and their ``p`` for :func:`torch.cdist`."""

BYTES_PER_PAIR_WORKSPACE = 1024
"""Approximate transient bytes per (cell, sample) pair inside ``counterfactual_z`` (the sample
mapper's MLP activations and output; its attention scores are computed in blocks of
``AttentionBlock.block_pairs()`` pairs and do not grow with the chunk); used to check
that one chunk fits the memory budget."""


def check_positive(name: str, value) -> int:
    """``value`` as an int; ``ValueError`` naming ``name`` unless it is a positive integer."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def check_memory_budget(max_in_memory_gb) -> float:
    """``max_in_memory_gb`` as a float; ``ValueError`` unless it is a positive number (inf: no
    limit)."""
    if (isinstance(max_in_memory_gb, bool) or not isinstance(max_in_memory_gb, (int, float, np.integer, np.floating))
            or not max_in_memory_gb > 0):
        raise ValueError(f"max_in_memory_gb must be a positive number of GB, got {max_in_memory_gb!r}.")
    return float(max_in_memory_gb)


def check_use_vmap(use_vmap) -> None:
    """scvi-tools' ``use_vmap`` is accepted and ignored (samples are always a tensor dimension
    here); ``ValueError`` unless it is one of the reference's values."""
    if use_vmap not in ("auto", True, False) or isinstance(use_vmap, (int, float)) and not isinstance(use_vmap, bool):
        raise ValueError(f"use_vmap must be 'auto', True or False (it is accepted and ignored); got {use_vmap!r}.")


def check_norm(norm: str) -> float:
    """``p`` of ``norm``; ``ValueError`` naming the allowed norms otherwise."""
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r} is not supported; use one of {list(NORMS)}.")
    return NORMS[norm]


# ----- counterfactuals and distances --------------------------------------------------------
def sample_distances(reps: torch.Tensor, norm: str = "l2") -> torch.Tensor:
    """Pairwise distances between the sample representations of each cell.

    Parameters
    ----------
    reps
        Counterfactual representations (..., S, L).
    norm
        ``"l2"``, ``"l1"`` or ``"linf"``.

    Returns
    -------
    Tensor (..., S, S): exactly symmetric with an exactly zero diagonal (direct computation,
    not the ``|a|^2 + |b|^2 - 2ab`` shortcut, which loses both and all precision for close
    samples).
    """
    p = check_norm(norm)
    lead, (n_samples, n_latent) = reps.shape[:-2], reps.shape[-2:]
    flat = reps.reshape(-1, n_samples, n_latent)
    dist = torch.cdist(flat, flat, p=p, compute_mode="donot_use_mm_for_euclid_dist")
    return dist.reshape(*lead, n_samples, n_samples)


def iter_local_sample_representations(
    module,
    data,
    indices: np.ndarray | None = None,
    *,
    batch_size: int = 256,
    use_mean: bool = True,
    mc_samples: int = 10,
    seed: int | None = 0,
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Yield ``(chunk_indices, z)`` with ``z`` of shape (n, S, L), or (mc_samples, n, S, L)
    with paired posterior draws when ``use_mean`` is False."""
    check_positive("batch_size", batch_size)
    n_draws = None if use_mean else check_positive("mc_samples", mc_samples)
    for chunk, _, loc, _, draws in iter_posterior_u(
        module, data, indices, batch_size=batch_size, n_draws=n_draws, seed=seed
    ):
        with torch.no_grad():
            z = module.counterfactual_z(loc if use_mean else draws)
        yield chunk, z


def own_sample_baseline(
    module, draws_a: torch.Tensor, draws_b: torch.Tensor, sample_index: torch.Tensor, norm: str = "l2"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and sd (ddof=1) over pairs of the distance between two posterior draws of a cell's
    ``z`` under its own sample.

    ``draws_a`` and ``draws_b`` are independent draws (M, n, L_u); returns two (n,) tensors.
    """
    za = module.counterfactual_z(draws_a, sample_index)
    zb = module.counterfactual_z(draws_b, sample_index)
    dist = torch.linalg.vector_norm(za - zb, ord=check_norm(norm), dim=-1)  # (M, n)
    return dist.mean(0), dist.std(0, correction=1)


def iter_local_sample_distances(
    module,
    data,
    indices: np.ndarray | None = None,
    *,
    batch_size: int = 256,
    use_mean: bool = True,
    mc_samples: int = 10,
    normalize: bool = False,
    norm: str = "l2",
    seed: int | None = 0,
    draws_offset: int = 0,
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Yield ``(chunk_indices, D)`` with ``D`` (n, S, S) float32, the local sample distances.

    See the module docstring for the formulas (paired draws averaged over ``mc_samples`` when
    ``use_mean`` is False; z-scored against the own-sample baseline when ``normalize``). Draws
    come from one generator seeded by ``seed`` and are taken chunk by chunk, so sampled results
    are reproducible for a given ``batch_size`` (``draws_offset``: see
    :func:`mrvi_pyro.posterior.iter_posterior_u`). Posterior draws are looped over (not stacked),
    so the working memory is that of one (n, S, S) tensor.
    """
    check_norm(norm)
    check_positive("batch_size", batch_size)
    if normalize or not use_mean:
        check_positive("mc_samples", mc_samples)
    if normalize and mc_samples < 2:
        raise ValueError("normalize_distances needs mc_samples >= 2 to estimate the spread of the baseline.")
    n_sampled = 0 if use_mean else mc_samples
    n_draws = n_sampled + (2 * mc_samples if normalize else 0)
    for chunk, batch, loc, _, draws in iter_posterior_u(
        module, data, indices, batch_size=batch_size, n_draws=n_draws or None, seed=seed, draws_offset=draws_offset
    ):
        with torch.no_grad():
            if use_mean:
                dist = sample_distances(module.counterfactual_z(loc), norm)
            else:
                total = torch.zeros((loc.shape[0], module.n_samples, module.n_samples), dtype=torch.float64,
                                    device=loc.device)
                for m in range(mc_samples):
                    total += sample_distances(module.counterfactual_z(draws[m]), norm)
                dist = (total / mc_samples).float()
            if normalize:
                base = draws[n_sampled:]
                mu, sd = own_sample_baseline(module, base[:mc_samples], base[mc_samples:], batch["sample_index"], norm)
                sd = sd.clamp_min(torch.finfo(sd.dtype).tiny)
                dist = (dist - mu[:, None, None]) / sd[:, None, None]
        yield chunk, dist


def chunk_bytes(batch_size: int, n_samples: int, n_latent: int, n_groups: int = 0) -> int:
    """Approximate peak working bytes of one chunk of distances, plus group accumulators.

    Counts the representations (float32), the distance tensor with its float64 copies
    (20 bytes per entry), the transient attention workspace of ``counterfactual_z`` and
    ``n_groups`` float64 (S, S) group sums (the number of groups over all keys).
    """
    per_cell = n_samples * (20 * n_samples + 8 * n_latent + BYTES_PER_PAIR_WORKSPACE)
    return int(batch_size * per_cell + 8 * n_groups * n_samples**2)


# ----- group reductions --------------------------------------------------------------------
class GroupedMean:
    """Mean (S, S) matrix per group, accumulated chunk by chunk.

    Parameters
    ----------
    codes
        Group code (0..n_groups-1) of every cell of the data (indexed like the data's cells).
    n_groups, n_samples
        Sizes.

    Sums are float64 (``index_add_``), so the result does not depend on chunking.
    """

    def __init__(self, codes: np.ndarray, n_groups: int, n_samples: int):
        self.codes = torch.as_tensor(np.asarray(codes, dtype=np.int64))
        self.sums = torch.zeros((n_groups, n_samples, n_samples), dtype=torch.float64)
        self.counts = torch.zeros(n_groups, dtype=torch.float64)

    def add(self, cell_indices: np.ndarray, dist: torch.Tensor) -> None:
        """Add the distances ``dist`` (n, S, S) of the cells ``cell_indices``."""
        codes = self.codes[torch.as_tensor(np.asarray(cell_indices, dtype=np.int64))]
        self.sums.index_add_(0, codes, dist.detach().to("cpu", torch.float64))
        self.counts.index_add_(0, codes, torch.ones(len(codes), dtype=torch.float64))

    def mean(self) -> np.ndarray:
        """(n_groups, S, S) float32 means (NaN for a group without cells)."""
        return (self.sums / self.counts[:, None, None]).float().numpy()


# ----- per-cell storage ---------------------------------------------------------------------
def open_distance_store(path: str | os.PathLike):
    """Open a store of per-cell distances lazily (:func:`mrvi_pyro._storage.open_store`: dask
    arrays when dask is installed, else lazily indexed arrays that read only the selected chunks)."""
    return open_store(path)


# ----- streamed distances with reductions ---------------------------------------------------
@dataclass
class LocalDistances:
    """Result of :func:`local_sample_distances`.

    Attributes
    ----------
    cell
        The per-cell storage (:class:`mrvi_pyro._storage.CellArrays` with the variable ``cell``), or None.
    groups
        Group key -> (n_groups, S, S) float32 mean matrices.
    group_counts
        Group key -> (n_groups,) number of cells.
    """

    cell: CellArrays | None
    groups: dict[str, np.ndarray]
    group_counts: dict[str, np.ndarray]


def local_sample_distances(
    module,
    data,
    indices: np.ndarray | None = None,
    *,
    groupings: dict[str, tuple[np.ndarray, int]] | None = None,
    cell_sink: CellArrays | None = None,
    batch_size: int = 256,
    use_mean: bool = True,
    mc_samples: int = 10,
    normalize: bool = False,
    norm: str = "l2",
    seed: int | None = 0,
    partition=None,
) -> LocalDistances:
    """Stream the local sample distances of ``indices`` into group means and a per-cell sink.

    Parameters
    ----------
    groupings
        Key -> (codes, n_groups): codes (0..n_groups-1) for every cell of ``data``.
    cell_sink
        Receives each chunk's (n, S, S) block in its variable ``cell``, at the chunk's position in
        ``indices`` (None: not kept).
    batch_size, use_mean, mc_samples, normalize, norm, seed
        See :func:`iter_local_sample_distances`.
    partition
        A :class:`mrvi_pyro.distributed.CellPartition` of ``indices`` (None: all of them, in
        this process): only its cells are computed (with the draws one process gives them),
        the sink receives their blocks, and the group sums are summed over the ranks, so every
        rank gets the group means of all cells.
    """
    indices = np.arange(len(data)) if indices is None else np.asarray(indices)
    partition = CellPartition.whole(len(indices)) if partition is None else partition
    groupings = groupings or {}
    accumulators = {key: GroupedMean(codes, n, module.n_samples) for key, (codes, n) in groupings.items()}
    start = partition.cells.start
    for chunk, dist in iter_local_sample_distances(
        module, data, indices[partition.cells], batch_size=batch_size, use_mean=use_mean, mc_samples=mc_samples,
        normalize=normalize, norm=norm, seed=seed, draws_offset=start,
    ):
        for acc in accumulators.values():
            acc.add(chunk, dist)
        if cell_sink is not None:
            cell_sink.write("cell", slice(start, start + len(chunk)), dist.cpu().numpy())
        start += len(chunk)
    partition.all_reduce_([t for acc in accumulators.values() for t in (acc.sums, acc.counts)])
    return LocalDistances(
        cell=cell_sink,
        groups={key: acc.mean() for key, acc in accumulators.items()},
        group_counts={key: acc.counts.numpy().astype(np.int64) for key, acc in accumulators.items()},
    )


def plan_cell_storage(
    n_cells: int,
    n_samples: int,
    n_latent: int,
    *,
    batch_size: int,
    n_groups: int,
    keep_cell: bool,
    max_in_memory_gb: float,
    zarr_path: str | os.PathLike | None,
) -> str | None:
    """Where the per-cell tensor goes: ``None`` (not kept), ``"memory"`` or ``"zarr"``.

    ``"zarr"`` when ``zarr_path`` is given or the (n_cells, S, S) float32 tensor plus one
    chunk's working set exceeds ``max_in_memory_gb``. ``ValueError`` when one chunk (and the
    group accumulators) alone does not fit the budget.
    """
    budget = check_memory_budget(max_in_memory_gb) * 1e9
    working = chunk_bytes(min(batch_size, max(n_cells, 1)), n_samples, n_latent, n_groups)
    if working > budget:
        raise ValueError(
            f"max_in_memory_gb={max_in_memory_gb} is too small for one chunk of batch_size={batch_size} cells "
            f"x {n_samples}^2 sample pairs (about {working / 1e9:.3g} GB with the group accumulators); "
            "lower batch_size or raise max_in_memory_gb."
        )
    if not keep_cell:
        return None
    if zarr_path is not None:
        return "zarr"
    return "memory" if working + 4 * n_cells * n_samples**2 <= budget else "zarr"


def iter_cell_blocks(cell, chunk_cells: int = 1024) -> Iterator[tuple[slice, np.ndarray]]:
    """Read a per-cell distance array (numpy, xarray, lazily loaded or not) in blocks of cells."""
    n_cells = cell.shape[0]
    for start in range(0, n_cells, chunk_cells):
        rows = slice(start, min(start + chunk_cells, n_cells))
        block = cell[rows]
        yield rows, np.asarray(getattr(block, "values", block))


def cell_distance_summary(cell, stat: str = "mean", chunk_cells: int = 1024) -> np.ndarray:
    """Per-cell summary of its distance matrix over the off-diagonal entries, read in blocks.

    ``stat``: ``"mean"`` (average distance between two different samples) or ``"max"``.
    """
    if stat not in ("mean", "max"):
        raise ValueError(f"stat={stat!r} is not supported; use 'mean' or 'max'.")
    out = []
    for _, block in iter_cell_blocks(cell, chunk_cells):
        n_samples = block.shape[-1]
        off = ~np.eye(n_samples, dtype=bool)
        values = block[:, off]
        out.append(values.mean(1) if stat == "mean" else values.max(1))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


# ----- stratification -----------------------------------------------------------------------
def condensed_upper_triangle(dist: np.ndarray | torch.Tensor) -> np.ndarray:
    """(n, S, S) -> (n, S(S-1)/2): the entries above the diagonal, row by row (scipy's
    ``squareform`` order)."""
    dist = np.asarray(dist)
    rows, cols = np.triu_indices(dist.shape[-1], k=1)
    return dist[:, rows, cols]


def random_projection(n_features: int, sketch_dim: int, seed: int | None = 0) -> np.ndarray | None:
    """Seeded Gaussian projection (n_features, sketch_dim) / sqrt(sketch_dim); None when
    ``n_features <= sketch_dim`` (no sketch needed)."""
    if n_features <= sketch_dim:
        return None
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n_features, sketch_dim)) / np.sqrt(sketch_dim)).astype(np.float32)


def distance_features(blocks: Iterable[np.ndarray], n_samples: int, *, sketch_dim: int = 128,
                      seed: int | None = 0) -> np.ndarray:
    """Reduced features (N, <= sketch_dim) of the cells' distance matrices, block by block."""
    projection = random_projection(n_samples * (n_samples - 1) // 2, sketch_dim, seed)
    out = []
    for block in blocks:
        flat = condensed_upper_triangle(block).astype(np.float32)
        out.append(flat if projection is None else flat @ projection)
    return np.concatenate(out)


def cluster_cells(features: np.ndarray, n_clusters: int, *, n_components: int = 10,
                  seed: int | None = 0, n_init: int = 10) -> np.ndarray:
    """k-means labels (N,) of cells on the first ``n_components`` principal components of
    their distance features (``scipy.cluster.vq.kmeans2`` with k-means++ starts, the best of
    ``n_init`` seeded runs by within-cluster sum of squares)."""
    from scipy.cluster.vq import kmeans2

    if n_clusters < 1 or n_clusters > len(features):
        raise ValueError(f"n_clusters must lie in [1, {len(features)}] (the number of cells), got {n_clusters}.")
    features = np.asarray(features, dtype=np.float64)
    n_comp = min(n_components, features.shape[1], len(features))
    reduced = features
    if n_comp < features.shape[1]:
        centered = features - features.mean(0)
        _, _, vt = np.linalg.svd(centered, full_matrices=False)
        reduced = centered @ vt[:n_comp].T
    rng = np.random.default_rng(0 if seed is None else int(seed))
    best, best_inertia = None, np.inf
    for _ in range(n_init):
        centroids, labels = kmeans2(reduced, n_clusters, minit="++", seed=rng)
        inertia = float(((reduced - centroids[labels]) ** 2).sum())
        if inertia < best_inertia:
            best, best_inertia = labels, inertia
    return best.astype(np.int64)


LINKAGE_METHODS = ("average", "complete", "single", "weighted")


def sample_linkage(matrix: np.ndarray, method: str = "average", optimal_ordering: bool = True) -> np.ndarray:
    """Hierarchical clustering of samples from their (S, S) distance matrix (scipy linkage).

    Only the off-diagonal entries are used (symmetrised). Normalised distances may be
    negative; they are shifted by a constant first, which changes no merge of these
    linkage methods (each merges by an average, maximum or minimum of distances).
    ``optimal_ordering`` reorders leaves so neighbouring samples are the most similar.
    """
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import squareform

    if method not in LINKAGE_METHODS:
        raise ValueError(f"method={method!r} is not supported; use one of {list(LINKAGE_METHODS)}.")
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 2:
        raise ValueError(f"Expected a square (S, S) distance matrix with S >= 2, got shape {matrix.shape}.")
    if not np.all(np.isfinite(matrix)):
        raise ValueError("The distance matrix has NaN or infinite entries (a group without cells?).")
    sym = (matrix + matrix.T) / 2
    np.fill_diagonal(sym, 0.0)
    condensed = squareform(sym, checks=False)
    if condensed.min() < 0:
        condensed = condensed - condensed.min()
    return linkage(condensed, method=method, optimal_ordering=optimal_ordering)


def sample_groups(linkage_matrix: np.ndarray, n_clusters: int) -> np.ndarray:
    """Sample cluster labels (1..n_clusters) from a linkage, cutting the tree into at most
    ``n_clusters`` groups."""
    from scipy.cluster.hierarchy import fcluster

    n_samples = linkage_matrix.shape[0] + 1
    if not 1 <= n_clusters <= n_samples:
        raise ValueError(f"n_sample_clusters must lie in [1, {n_samples}] (the number of samples), got {n_clusters}.")
    return fcluster(linkage_matrix, n_clusters, criterion="maxclust").astype(np.int64)


def leaf_order(linkage_matrix: np.ndarray) -> np.ndarray:
    """Sample indices in the dendrogram's left-to-right order."""
    from scipy.cluster.hierarchy import leaves_list

    return leaves_list(linkage_matrix).astype(np.int64)


def stratify_samples(group_means: np.ndarray, n_sample_clusters: int = 2, method: str = "average"):
    """Linkages (k, S-1, 4), sample groups (k, S) and leaf orders (k, S) of each group's mean
    matrix (k, S, S)."""
    linkages = np.stack([sample_linkage(m, method) for m in group_means])
    groups = np.stack([sample_groups(z, n_sample_clusters) for z in linkages])
    orders = np.stack([leaf_order(z) for z in linkages])
    return linkages, groups, orders


def centred_projection(columns: np.ndarray) -> np.ndarray:
    """(S, S) orthogonal projection onto the span of ``columns`` (S, p) centred over the samples.

    Applied to a cell's sample effects centred over samples, it keeps the part that a regression
    on these columns (with an intercept) explains; an empty ``columns`` gives zero.
    """
    columns = np.asarray(columns, dtype=np.float64)
    if columns.ndim != 2 or columns.shape[1] == 0:
        return np.zeros((columns.shape[0], columns.shape[0]))
    centred = columns - columns.mean(axis=0, keepdims=True)
    return centred @ np.linalg.pinv(centred)


def centred_rank(columns: np.ndarray) -> int:
    """Rank of ``columns`` (S, p) centred over the samples: the number of design columns ``p`` of
    a covariate in ``p / (S - 1)``, the share of unstructured sample effects it explains."""
    columns = np.asarray(columns, dtype=np.float64)
    return int(np.linalg.matrix_rank(columns - columns.mean(axis=0, keepdims=True)))


def effect_sums(z: torch.Tensor, projections: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per cell, the total and the explained sums of squares of its sample effects.

    ``z`` (n, S, L) holds a cell's counterfactual ``z`` under every sample; its sample effects are
    ``z`` centred over the samples. Returns ``total`` (n,) = sum of their squares and
    ``explained`` (n, K) = sum of squares of ``P_k`` applied to them for each of the K (S, S)
    ``projections`` (:func:`centred_projection`).
    """
    effects = z - z.mean(dim=-2, keepdim=True)
    total = effects.square().sum(dim=(-2, -1))
    projected = torch.einsum("kst,ntl->nksl", projections.to(effects.dtype), effects)
    return total, projected.square().sum(dim=(-2, -1))


__all__ = [
    "GroupedMean", "LINKAGE_METHODS", "LocalDistances", "NORMS",
    "cell_distance_summary", "centred_projection", "centred_rank", "check_norm", "check_positive", "chunk_bytes",
    "cluster_cells",
    "condensed_upper_triangle", "distance_features", "effect_sums", "iter_cell_blocks", "iter_local_sample_distances",
    "iter_local_sample_representations", "leaf_order", "local_sample_distances", "open_distance_store",
    "own_sample_baseline", "plan_cell_storage", "random_projection", "sample_distances", "sample_groups",
    "sample_linkage", "stratify_samples",
]


def nearest_neighbours(coords: np.ndarray, k: int) -> np.ndarray:
    """Leave-one-out ``k`` nearest neighbours (Euclidean) of every row of ``coords`` (n, d).

    Returns (n, k) row indices, nearest first, never the row itself (also when rows repeat:
    a duplicate of a row counts as its neighbour, the row does not). Needs ``n > k``.
    """
    from scipy.spatial import cKDTree

    coords = np.asarray(coords, dtype=np.float64)
    n = len(coords)
    if not 0 < k < n:
        raise ValueError(f"k nearest neighbours need 0 < k < the number of points; got k={k} for {n} points.")
    _, found = cKDTree(coords).query(coords, k=k + 1)
    found = np.asarray(found).reshape(n, k + 1)
    own = found == np.arange(n)[:, None]
    # A row whose own index was not returned (exact duplicates tie at distance 0) drops its farthest.
    own[~own.any(axis=1), -1] = True
    return found[~own].reshape(n, k)


def label_agreement(neighbours: np.ndarray, labels: np.ndarray) -> float:
    """Mean share of each point's neighbours (rows of ``neighbours``) that have its label."""
    labels = np.asarray(labels)
    return float(np.mean(labels[neighbours] == labels[:, None]))


def chance_agreement(labels: np.ndarray) -> float:
    """:func:`label_agreement` expected when the labels are shuffled: with ``n_c`` points of
    label ``c`` among ``n``, ``sum_c n_c (n_c - 1) / (n (n - 1))`` (a point's neighbours are
    drawn from the other points)."""
    _, counts = np.unique(np.asarray(labels), return_counts=True)
    n = counts.sum()
    return float((counts * (counts - 1.0)).sum() / (n * (n - 1.0))) if n > 1 else float("nan")
