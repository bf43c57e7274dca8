r"""Differential abundance: aggregated posteriors of samples, evaluated in bounded memory.

Maths
-----
The *aggregated posterior* of sample :math:`s` is the equal-weight mixture of the posteriors of
its cells,

.. math::

    q_s(u) = \frac{1}{M_s} \sum_{m \in \mathcal{C}_s} \mathcal{N}(u;\, \mu_m, \operatorname{diag}\sigma_m^2),

with :math:`\mathcal{C}_s` the *component cells* of sample :math:`s` (all its cells by default,
or a seeded random subset of at most ``max_components_per_sample`` of them) and
:math:`(\mu_m, \sigma_m)` the parameters of :math:`q(u \mid x_m, s_m)`. For each query cell
:math:`n` we evaluate ``log_probs[n, s]`` :math:`= \log q_s(u_n)` at the cell's posterior mean
:math:`u_n` (or at posterior draws of :math:`u_n`).

A group :math:`A` of samples (one level of a sample covariate) has
:math:`q_A = |A|^{-1} \sum_{s \in A} q_s` (samples weighted equally, whatever their cell
counts), so :math:`\log q_A(u_n) = \operatorname{logsumexp}_{s\in A} \log q_s(u_n) - \log|A|`.
With ``omit_original_sample`` the cell's own sample :math:`s_n` is left out of :math:`A`
(a cell trivially lies where its own sample's posterior mass is); a cell whose own sample is
the only member of :math:`A` then has no estimate (NaN, with a warning). The differential
abundance log-ratio of two groups is :math:`r_n = \log q_{A_1}(u_n) - \log q_{A_2}(u_n)`; the
log *enrichment* of a level is its log-probability against all other levels pooled.

Kernel bandwidth
----------------
Trained posteriors are much narrower than the spacing of the cells in u (posterior scales
about 0.16-0.34 against a median nearest-neighbour distance of about 0.5 in 10 dimensions on the accuracy
benchmark), so :math:`q_s(u_n)` at a cell is carried by its few nearest components: a
nearest-neighbour density estimate, whose log-ratio is noisy and biased away from 0. With a
``bandwidth`` every component is convolved with a Gaussian kernel,
:math:`\mathcal{N}(u;\, \mu_m, \operatorname{diag}(\sigma_m^2 + h^2))`, a kernel density estimate of
each sample's cells in u; :func:`kernel_bandwidth` gives ``h`` (Scott's rule by default in
:meth:`mrvi_pyro.MRVI.differential_abundance`; ``bandwidth=0`` is the exact aggregated posterior,
the reference's estimator). :func:`aggregated_posterior` and the admissibility rules always use
the exact posteriors.

Bounded memory
--------------
A diagonal Gaussian log density is an inner product of features,

.. math::

    \log\mathcal{N}(u; \mu, \sigma^2) = \sum_l \Big[-\tfrac{u_l^2}{2\sigma_l^2}
    + \tfrac{u_l \mu_l}{\sigma_l^2}\Big] - \sum_l\Big[\tfrac{\mu_l^2}{2\sigma_l^2} + \log\sigma_l\Big]
    - \tfrac{L}{2}\log 2\pi
    = \phi(u)^\top \psi(\mu, \sigma),

with :math:`\phi(u) = (u^2, u, 1)`, so a block of query cells x component cells is one matrix
product. Components are packed, sorted by sample, into rows of ``row_size`` cells (padding
entries contribute :math:`-\infty`); each block gives a log-sum-exp per row and the rows of a
sample are merged by a segmented log-sum-exp. Memory is
O(``query_chunk`` x ``component_chunk``) for the blocks plus O(n_query x n_samples) for the
output, never O(N^2). The computation is exact (no approximation besides floating point) unless
``max_components_per_sample`` is set; its error is measured in ``benchmarks/da.py`` (it is small
when posteriors overlap, e.g. a mean absolute error of 0.05 on a log-ratio of sd 0.5 with 100 of
500 cells per sample, and large when posteriors are very narrow, because then a density is
carried by the few nearest components). The block products are float32 by default, on points
and components centred on the components' mean: float32 loses digits to the cancellation in
:math:`u^2/\sigma^2 - 2u\mu/\sigma^2 + \mu^2/\sigma^2` (about 1e-3 in log density for
scales of 0.1 a few units from the centre); ``dtype=torch.float64`` in :func:`pack_components`
removes it at about twice the cost.

Uncertainty
-----------
:func:`log_ratio_summary` propagates two sources of uncertainty into :math:`r_n`: posterior
draws of :math:`u_n` (``n_draws``) and a Bayesian bootstrap over the samples of each group
(``n_bootstrap`` weight vectors :math:`w \sim \operatorname{Dirichlet}(1, \ldots, 1)` over the
samples of a group, replacing the equal weights of :math:`q_A`; one weight vector is shared by
all cells, because it represents a resampled cohort). Every (draw, weight vector) pair gives one
replicate of :math:`r_n`; their mean, sd, highest-density interval (:func:`arviz.hdi`) and
the fraction of positive replicates (``prob_positive``) summarise it. When a single donor
carries a shift, the replicates that down-weight that donor lose the signal, so the interval
widens and ``prob_positive`` drops; when all donors share it, reweighting changes little.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .distributed import CellPartition
from .posterior import iter_posterior_u, make_generator

QUERY_CHUNK = 512
"""Default number of query cells per block."""

COMPONENT_CHUNK = 8192
"""Default number of component cells (packed entries) per block."""

GROUP_CHUNK = 16384
"""Cells per step when pooling per-sample log densities into groups."""

EXP_FLOOR = 80.0
"""Log-sum-exp terms more than this below the maximum are clamped there (negligible change)."""

_LOG_2PI = math.log(2.0 * math.pi)


# ---------------------------------------------------------------------------------------------
# posterior parameters and component selection
# ---------------------------------------------------------------------------------------------
def posterior_parameters(module, data, indices: np.ndarray | None = None, *, batch_size: int = 256,
                         partition: CellPartition | None = None):
    """Posterior ``q(u | x, s)`` parameters of the given cells.

    With a ``partition`` (of ``indices``) each rank encodes its own cells and the parameters of
    all cells are gathered on every rank.

    Returns
    -------
    loc, scale
        Tensors (n, L_u) on the module's device.
    sample_index
        Integer tensor (n,) of sample codes.
    """
    indices = np.arange(len(data)) if indices is None else np.asarray(indices)
    if not len(indices):
        raise ValueError("No cells to evaluate: `indices` is empty.")
    mine = indices if partition is None else indices[partition.cells]
    locs, scales, samples = [], [], []
    for _, batch, loc, scale, _ in iter_posterior_u(module, data, mine, batch_size=batch_size):
        locs.append(loc)
        scales.append(scale)
        samples.append(batch["sample_index"])
    if locs:
        parts = (torch.cat(locs), torch.cat(scales), torch.cat(samples))
    else:  # a rank without cells (fewer chunks than ranks) still joins the gathers
        param = next(module.parameters())
        empty = torch.zeros((0, int(module.config["n_latent_u"])), dtype=param.dtype, device=param.device)
        parts = (empty, empty, torch.zeros(0, dtype=torch.int64, device=param.device))
    if partition is None:
        return parts
    return tuple(partition.all_gather(t) for t in parts)


BANDWIDTH_RULES = ("scott",)
"""Named rules for the kernel ``bandwidth`` of the aggregated posteriors (:func:`kernel_bandwidth`)."""


def check_bandwidth(bandwidth) -> None:
    """``ValueError`` unless ``bandwidth`` is a finite number >= 0 or a name in :data:`BANDWIDTH_RULES`."""
    if isinstance(bandwidth, str):
        ok = bandwidth in BANDWIDTH_RULES
    else:
        number = isinstance(bandwidth, (int, float, np.integer, np.floating))
        ok = (number and not isinstance(bandwidth, (bool, np.bool_))
              and math.isfinite(float(bandwidth)) and float(bandwidth) >= 0)
    if not ok:
        raise ValueError(f"bandwidth must be a number >= 0 or one of {list(BANDWIDTH_RULES)}; got {bandwidth!r}.")


def kernel_bandwidth(loc: torch.Tensor, sample_index: torch.Tensor, bandwidth,
                     components: np.ndarray | None = None) -> torch.Tensor | None:
    """Per-dimension kernel width ``h`` (L_u,) added in quadrature to every component's scale, or
    None for ``bandwidth=0`` (the exact aggregated posteriors, the reference's estimator).

    ``"scott"``: Scott's rule for a kernel density estimate in ``L`` dimensions from ``n``
    points, :math:`h_l = \\hat\\sigma_l\\, n^{-1/(L+4)}`, with :math:`\\hat\\sigma_l` the standard
    deviation of the components' posterior means in dimension ``l`` and ``n`` the median number
    of components per sample (each sample's density is the one estimated). A number >= 0 is an
    isotropic width in units of u. ``components``: positions of the component cells (default
    all).
    """
    check_bandwidth(bandwidth)
    if isinstance(bandwidth, str):
        comp = np.arange(loc.shape[0]) if components is None else np.asarray(components, dtype=np.int64)
        if len(comp) < 2:
            return None
        codes = sample_index.cpu().numpy().astype(np.int64)[comp]
        counts = np.bincount(codes)
        n = float(np.median(counts[counts > 0]))
        spread = loc[torch.as_tensor(comp, device=loc.device)].to(torch.float64).std(0)
        return (spread * n ** (-1.0 / (loc.shape[-1] + 4))).to(loc.dtype)
    if float(bandwidth) == 0:
        return None
    return torch.full((loc.shape[-1],), float(bandwidth), dtype=loc.dtype, device=loc.device)


def widen(scale: torch.Tensor, width: torch.Tensor | None) -> torch.Tensor:
    """``sqrt(scale**2 + width**2)``: each component convolved with a Gaussian kernel of ``width``
    (``scale`` itself when ``width`` is None)."""
    return scale if width is None else torch.sqrt(scale * scale + width * width)


def kernel_components(loc: torch.Tensor, scale: torch.Tensor, sample_index: torch.Tensor, n_samples: int,
                      max_per_sample: int | None, seed: int | None, bandwidth) -> ComponentTable:
    """The packed components of the aggregated posteriors (:func:`select_components` with
    ``max_per_sample`` and ``seed``), each widened by the kernel ``bandwidth``
    (:func:`kernel_bandwidth`)."""
    components = select_components(sample_index, max_per_sample, seed=seed)
    width = kernel_bandwidth(loc, sample_index, bandwidth, components)
    return pack_components(loc, widen(scale, width), sample_index, n_samples, components)


def select_components(
    sample_index: np.ndarray | torch.Tensor,
    max_per_sample: int | None = None,
    *,
    seed: int | None = 0,
) -> np.ndarray:
    """Positions of the component cells, sorted by sample (stable within a sample).

    With ``max_per_sample=None`` every cell is a component. Otherwise each sample keeps a
    uniformly random subset of ``min(M_s, max_per_sample)`` of its cells, drawn with a
    ``torch.Generator`` seeded by ``seed`` (one random key per cell, ranked within its sample;
    no loop over samples).
    """
    codes = np.asarray(torch.as_tensor(sample_index).cpu().numpy(), dtype=np.int64)
    n = len(codes)
    if max_per_sample is None:
        return np.argsort(codes, kind="stable")
    if int(max_per_sample) < 1:
        raise ValueError(f"max_components_per_sample must be a positive integer or None; got {max_per_sample}.")
    keys = torch.rand(n, generator=make_generator(seed), dtype=torch.float64).numpy()
    order = np.lexsort((keys, codes))  # by sample, then random key
    sorted_codes = codes[order]
    starts = np.searchsorted(sorted_codes, sorted_codes, side="left")
    rank = np.arange(n) - starts
    keep = order[rank < int(max_per_sample)]
    return keep[np.argsort(codes[keep], kind="stable")]


# ---------------------------------------------------------------------------------------------
# packed component table
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ComponentTable:
    """Mixture components of the per-sample aggregated posteriors, packed for block evaluation.

    Attributes
    ----------
    features
        (n_rows * row_size, 2 L + 1) component features :math:`\\psi(\\mu - c, \\sigma)`;
        padding entries have a constant of :math:`-\\infty`.
    row_sample
        (n_rows,) sample code of each row (rows sorted by sample).
    counts
        (n_samples,) number of components of each sample.
    position
        (n_cells,) flat position in ``features`` of each cell used as a component, -1 for
        cells that are not components (positions refer to the cells passed to
        :func:`pack_components`).
    row_size
        Entries per row.
    center
        (L,) the shift :math:`c` applied to components and queries alike (it leaves the
        densities unchanged and reduces floating-point cancellation).
    """

    features: torch.Tensor
    row_sample: torch.Tensor
    counts: torch.Tensor
    position: torch.Tensor
    row_size: int
    center: torch.Tensor

    @property
    def n_samples(self) -> int:
        return int(self.counts.shape[0])

    @property
    def n_rows(self) -> int:
        return int(self.row_sample.shape[0])


def _choose_row_size(counts: np.ndarray, max_row: int = 512) -> int:
    """Row size that keeps padding small: minimises padded entries plus a per-row overhead."""
    counts = counts[counts > 0]
    best, best_cost = 1, None
    for row in (8, 16, 32, 64, 96, 128, 192, 256, 384, 512):
        if row > max_row:
            break
        rows = np.ceil(counts / row)
        cost = float((rows * row).sum() + 16.0 * rows.sum())
        if best_cost is None or cost < best_cost:
            best, best_cost = row, cost
    return best


def query_features(u: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """:math:`\\phi(u) = (u^2, u, 1)`, shape (..., 2 L + 1)."""
    u = u.to(dtype)
    return torch.cat([u * u, u, torch.ones_like(u[..., :1])], dim=-1)


def component_features(loc: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """:math:`\\psi(\\mu, \\sigma)` with :math:`\\phi(u)^\\top\\psi = \\log\\mathcal{N}(u; \\mu, \\sigma^2)`
    (computed in float64, returned as ``dtype``)."""
    loc, scale = loc.to(torch.float64), scale.to(torch.float64)
    precision = scale.pow(-2)
    const = -0.5 * (loc * loc * precision).sum(-1) - scale.log().sum(-1) - 0.5 * loc.shape[-1] * _LOG_2PI
    return torch.cat([-0.5 * precision, loc * precision, const.unsqueeze(-1)], dim=-1).to(dtype)


def pack_components(
    loc: torch.Tensor,
    scale: torch.Tensor,
    sample_index: torch.Tensor,
    n_samples: int,
    components: np.ndarray | None = None,
    *,
    row_size: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> ComponentTable:
    """Pack the component cells (``components``: positions into ``loc``, default all) by sample.

    Each sample's components fill ``ceil(M_s / row_size)`` rows; the last row of a sample is
    padded with entries whose log density is :math:`-\\infty`. ``dtype`` is the precision of
    the block products: float32 (default) is about twice as fast as float64 and, thanks to
    the centring, accurate to about 1e-3 in log density for posterior scales down to about 0.1
    (tested against float64); pass ``torch.float64`` for narrower posteriors.
    """
    n_cells = loc.shape[0]
    codes = sample_index.cpu().numpy().astype(np.int64)
    comp = np.argsort(codes, kind="stable") if components is None else np.asarray(components, dtype=np.int64)
    comp = comp[np.argsort(codes[comp], kind="stable")]
    comp_codes = codes[comp]
    counts = np.bincount(comp_codes, minlength=n_samples)
    if row_size is None:
        row_size = _choose_row_size(counts)
    rows_per_sample = np.ceil(counts / row_size).astype(np.int64)
    first_row = np.concatenate([[0], np.cumsum(rows_per_sample)[:-1]])
    first_comp = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(len(comp)) - first_comp[comp_codes]
    flat = first_row[comp_codes] * row_size + rank
    n_rows = int(rows_per_sample.sum())
    device = loc.device
    width = 2 * loc.shape[-1] + 1
    comp_t = torch.as_tensor(comp, device=device)
    center = loc[comp_t].to(torch.float64).mean(0) if len(comp) else torch.zeros(loc.shape[-1], dtype=torch.float64)
    features = torch.zeros((n_rows * row_size, width), dtype=dtype, device=device)
    features[:, -1] = -math.inf
    flat_t = torch.as_tensor(flat, device=device)
    features[flat_t] = component_features(loc[comp_t].to(torch.float64) - center, scale[comp_t], dtype)
    position = torch.full((n_cells,), -1, dtype=torch.int64, device=device)
    position[comp_t] = flat_t
    row_sample = torch.as_tensor(np.repeat(np.arange(n_samples), rows_per_sample), device=device)
    return ComponentTable(
        features, row_sample, torch.as_tensor(counts, device=device), position, int(row_size), center
    )


# ---------------------------------------------------------------------------------------------
# chunked evaluation
# ---------------------------------------------------------------------------------------------
def segment_logsumexp(values: torch.Tensor, segment: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Log-sum-exp of the columns of ``values`` (Q, R) grouped by ``segment`` (R,) -> (Q, n_segments).

    Empty segments give :math:`-\\infty`. Stable: each segment is shifted by its own maximum.
    """
    q = values.shape[0]
    index = segment.unsqueeze(0).expand(q, -1)
    peak = torch.full((q, n_segments), -math.inf, dtype=values.dtype, device=values.device)
    peak = peak.scatter_reduce(1, index, values, reduce="amax", include_self=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = torch.zeros_like(peak).scatter_add_(1, index, (values - peak.gather(1, index)).exp())
    return peak + total.log()


def _logsumexp_rows_(block: torch.Tensor) -> torch.Tensor:
    """Log-sum-exp over the last dim of ``block`` (q, rows, R), overwriting ``block``.

    Terms more than ``EXP_FLOOR`` below their row's maximum are raised to ``-EXP_FLOOR``
    before exponentiating: it changes the sum by a relative ``R * exp(-EXP_FLOOR)`` (about
    1e-32) at most, and avoids exp's slow path for underflowing inputs (about 10x slower on
    CPU). Rows without any finite term give :math:`-\\infty`.
    """
    peak = block.amax(-1, keepdim=True)
    finite = torch.isfinite(peak)
    peak = torch.where(finite, peak, torch.zeros_like(peak))
    lse = block.sub_(peak).clamp_(min=-EXP_FLOOR).exp_().sum(-1).log_().add_(peak.squeeze(-1))
    return torch.where(finite.squeeze(-1), lse, torch.full_like(lse, -math.inf))


def aggregated_log_density(
    u: torch.Tensor,
    table: ComponentTable,
    *,
    own_position: torch.Tensor | None = None,
    query_chunk: int = QUERY_CHUNK,
    component_chunk: int = COMPONENT_CHUNK,
) -> torch.Tensor:
    """``log q_s(u_n)`` for every query point and sample, chunk by chunk.

    Parameters
    ----------
    u
        Query points (n, L_u).
    table
        Packed components from :func:`pack_components`.
    own_position
        Optional (n,) flat position of each query point's *own* component in ``table`` (-1 for
        none). That component is left out of its sample's mixture (a leave-one-out density,
        normalised by ``M_s - 1``); a sample whose only component is left out gives NaN.
    query_chunk, component_chunk
        Block sizes; peak memory of a block is about ``query_chunk * component_chunk`` values
        of ``table``'s dtype (times a small constant). Results do not depend on them (up to
        floating-point rounding).

    Returns
    -------
    Tensor (n, n_samples) of float32 on ``u``'s device. Samples without components give
    :math:`-\\infty`.
    """
    n = u.shape[0]
    dtype = table.features.dtype
    rows_per_block = max(1, component_chunk // table.row_size)
    block_entries = rows_per_block * table.row_size
    log_counts = table.counts.to(torch.float64).log()
    no_components = table.counts == 0
    center = table.center.to(u.device)
    out = torch.empty((n, table.n_samples), dtype=torch.float32, device=u.device)
    for q0 in range(0, n, query_chunk):
        phi = query_features(u[q0 : q0 + query_chunk].to(torch.float64) - center, dtype)
        q = phi.shape[0]
        own = None if own_position is None else own_position[q0 : q0 + query_chunk]
        row_lse = []
        for e0 in range(0, table.features.shape[0], block_entries):
            dens = phi @ table.features[e0 : e0 + block_entries].T  # (q, entries)
            if own is not None:
                hit = (own >= e0) & (own < e0 + dens.shape[1])
                if hit.any():
                    rows = torch.nonzero(hit).squeeze(-1)
                    dens[rows, own[rows] - e0] = -math.inf
            row_lse.append(_logsumexp_rows_(dens.view(q, -1, table.row_size)).to(torch.float64))
        per_sample = segment_logsumexp(torch.cat(row_lse, dim=1), table.row_sample, table.n_samples)
        result = per_sample - log_counts
        if own is not None and bool((own >= 0).any()):
            rows = torch.nonzero(own >= 0).squeeze(-1)
            own_sample = table.row_sample[own[rows] // table.row_size]
            reduced = (table.counts[own_sample] - 1).to(torch.float64)
            loo = per_sample[rows, own_sample] - reduced.log()
            result[rows, own_sample] = torch.where(reduced > 0, loo, torch.full_like(loo, math.nan))
        result[:, no_components] = -math.inf
        out[q0 : q0 + q] = result.to(torch.float32)
    return out


def sample_log_probs(
    module,
    data,
    indices: np.ndarray | None = None,
    *,
    max_components_per_sample: int | None = None,
    leave_one_out: bool = False,
    batch_size: int = 128,
    query_chunk: int = QUERY_CHUNK,
    component_chunk: int = COMPONENT_CHUNK,
    seed: int | None = 0,
    partition: CellPartition | None = None,
    bandwidth=0.0,
) -> np.ndarray | None:
    """``log_probs[n, s] = log q_s(u_n)`` for the cells ``indices`` (default all) of ``data``.

    The aggregated posteriors are built from the same cells (all of them, or at most
    ``max_components_per_sample`` per sample, chosen with ``seed``); ``u_n`` is the
    posterior mean. Columns are all ``module.n_samples`` sample codes; samples without cells
    give :math:`-\\infty`. ``leave_one_out`` drops each cell's own component from its own
    sample's mixture (see :func:`aggregated_log_density`). ``bandwidth`` widens every component
    by a kernel (:func:`kernel_bandwidth`; 0: the exact aggregated posteriors).

    With a ``partition`` (:class:`mrvi_pyro.distributed.CellPartition` of ``indices``) every rank
    encodes its cells, the posterior parameters are gathered (every rank builds the same
    components) and each rank evaluates its own cells; rank 0 returns all rows, the others None.

    Returns
    -------
    ndarray (n_cells, n_samples), float32.
    """
    loc, scale, samples = posterior_parameters(module, data, indices, batch_size=batch_size, partition=partition)
    partition = CellPartition.whole(len(loc)) if partition is None else partition
    table = kernel_components(loc, scale, samples, module.n_samples, max_components_per_sample, seed, bandwidth)
    mine = partition.cells
    own = table.position[mine] if leave_one_out else None
    return partition.gather(aggregated_log_density(
        loc[mine], table, own_position=own, query_chunk=query_chunk, component_chunk=component_chunk
    ).cpu().numpy())


# ---------------------------------------------------------------------------------------------
# groups of samples
# ---------------------------------------------------------------------------------------------
def _own_sample_warning(n_nan: int, level_names, what: str) -> None:
    level_names = [v.item() if isinstance(v, np.generic) else v for v in level_names]
    if len(level_names) > 10:
        level_names = [*level_names[:10], "..."]
    warnings.warn(
        f"{n_nan} cell(s) get NaN {what}: with omit_original_sample=True a cell's own sample is "
        f"left out of its group, and for level(s) {level_names} the cell's own sample is the "
        "only sample of the group, so no other sample is left to estimate the density. Add samples "
        "to those levels (or to sample_subset) or pass omit_original_sample=False.",
        UserWarning,
        stacklevel=3,
    )


def group_log_probs(
    log_probs: np.ndarray,
    cell_sample: np.ndarray,
    membership: np.ndarray,
    *,
    omit_original_sample: bool = True,
    weights: np.ndarray | None = None,
    level_names=None,
    warn: bool = True,
) -> np.ndarray:
    """``log q_A(u_n)`` for each group ``A`` of samples (equally weighted samples).

    Parameters
    ----------
    log_probs
        (..., n, S) per-sample log densities (leading dims, e.g. posterior draws).
    cell_sample
        (n,) sample code of each cell (-1 or any code outside ``[0, S)`` for none).
    membership
        (S, V) boolean: sample s belongs to group v.
    omit_original_sample
        Leave each cell's own sample out of every group containing it.
    weights
        Optional (B, S) non-negative sample weights, B weight vectors replacing the equal
        weights (e.g. Bayesian-bootstrap draws); they are renormalised within each group after
        the cell's own sample is dropped.
    level_names
        Names of the V groups (for the warning).
    warn
        Warn when cells get NaN because their own sample is their group's only member.

    Returns
    -------
    ndarray (..., n, V), or (B, ..., n, V) with ``weights``:
    ``log(sum_s w_s q_s(u_n) / sum_s w_s)`` over the members s of the group kept for cell n;
    NaN where no member is left. Each group is shifted by its own maximum before
    exponentiating, so nothing underflows and nothing is subtracted (no cancellation).
    """
    log_probs = np.asarray(log_probs)
    cell_sample = np.asarray(cell_sample, dtype=np.int64)
    n = cell_sample.shape[0]
    parts, empty_cells, empty_levels = [], 0, np.zeros(np.shape(membership)[1], bool)
    for c0 in range(0, max(n, 1), GROUP_CHUNK):  # bounded memory: O(GROUP_CHUNK x S x V) per step
        out, empty = _group_log_probs_chunk(
            log_probs[..., c0 : c0 + GROUP_CHUNK, :], cell_sample[c0 : c0 + GROUP_CHUNK], membership,
            omit_original_sample, weights,
        )
        parts.append(out)
        flat = empty.reshape(-1, empty.shape[-1])
        empty_cells += int(flat.any(-1).sum())
        empty_levels |= flat.any(0)
    if warn and empty_cells:
        names = np.arange(len(empty_levels)) if level_names is None else np.asarray(level_names, dtype=object)
        _own_sample_warning(empty_cells, names[empty_levels], "group log-probabilities")
    return np.concatenate(parts, axis=-2)


def _group_log_probs_chunk(log_probs, cell_sample, membership, omit_original_sample, weights):
    """:func:`group_log_probs` on one chunk of cells; also returns the (…, n, V) mask of cells
    left without any member."""
    lp = torch.as_tensor(log_probs, dtype=torch.float64)
    member = torch.as_tensor(np.asarray(membership, dtype=bool))
    s = member.shape[0]
    cell_sample = torch.as_tensor(cell_sample)
    keep = member.unsqueeze(0).expand(cell_sample.shape[0], -1, -1)  # (n, S, V)
    if omit_original_sample:
        valid = (cell_sample >= 0) & (cell_sample < s)
        own = torch.nn.functional.one_hot(cell_sample.clamp(0, s - 1), s).to(torch.bool) & valid.unsqueeze(-1)
        keep = keep & ~own.unsqueeze(-1)
    masked = torch.where(keep, lp.unsqueeze(-1), torch.full((), -math.inf, dtype=lp.dtype))  # (..., n, S, V)
    peak = masked.amax(-2, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    scaled = torch.where(keep, (masked - peak).clamp(min=-EXP_FLOOR).exp(), torch.zeros((), dtype=lp.dtype))
    peak = peak.squeeze(-2)
    keep_f = keep.to(lp.dtype)
    if weights is None:
        num = scaled.sum(-2)
        total = keep_f.sum(-2)
    else:
        w = torch.as_tensor(np.asarray(weights), dtype=torch.float64)  # (B, S)
        num = torch.einsum("...nsv,bs->b...nv", scaled, w)
        total = torch.einsum("nsv,bs->bnv", keep_f, w)
        total = total.view(total.shape[0], *([1] * (lp.ndim - 2)), *total.shape[1:])
    with np.errstate(divide="ignore"):
        out = num.log() + peak - total.log()
    out = torch.where(total > 0, out, torch.full_like(out, math.nan))
    empty = ~keep.any(-2) & member.any(0)  # (n, V): the group has members, none left for this cell
    return out.numpy(), empty.numpy()


def log_enrichment(
    log_probs: np.ndarray,
    cell_sample: np.ndarray,
    membership: np.ndarray,
    *,
    omit_original_sample: bool = True,
    eligible: np.ndarray | None = None,
    level_names=None,
    covariate: str = "the covariate",
) -> np.ndarray:
    """Log enrichment of each group against all other eligible samples pooled:
    ``log q_{A_v}(u_n) - log q_{E \\ A_v}(u_n)``, (n, V).

    ``eligible`` (S,) marks the samples that may form the complement (default: all; the facade's
    ``sample_subset``). A level that holds every eligible sample has no complement: its column is
    NaN, with a warning naming ``covariate`` and the level.
    """
    membership = np.asarray(membership, dtype=bool)
    eligible = np.ones(membership.shape[0], dtype=bool) if eligible is None else np.asarray(eligible, dtype=bool)
    outside = ~membership & eligible[:, None]
    for v in np.flatnonzero(~outside.any(0)):
        level = level_names[v] if level_names is not None else v
        warnings.warn(f"All samples have {covariate}={level!r}; its log enrichment is NaN.", UserWarning, stacklevel=3)
    inside = group_log_probs(log_probs, cell_sample, membership, omit_original_sample=omit_original_sample,
                             warn=False)
    rest = group_log_probs(log_probs, cell_sample, outside, omit_original_sample=omit_original_sample, warn=False)
    return inside - rest


# ---------------------------------------------------------------------------------------------
# uncertainty
# ---------------------------------------------------------------------------------------------
def dirichlet_weights(membership: np.ndarray, n_bootstrap: int, generator: torch.Generator) -> np.ndarray:
    """Bayesian-bootstrap weights (n_bootstrap, S): for each group (column of ``membership``,
    groups disjoint) an independent flat Dirichlet over its samples; zero for other samples."""
    membership = np.asarray(membership, dtype=bool)
    uniform = torch.rand((n_bootstrap, membership.shape[0]), generator=generator, dtype=torch.float64)
    gamma = -torch.log1p(-uniform)  # Exponential(1) = Gamma(1): normalised, a flat Dirichlet
    gamma = gamma.numpy() * membership.any(1)
    # normalising within each group is optional (group_log_probs renormalises); do it for clarity
    totals = gamma @ membership.astype(np.float64)  # (B, V)
    return gamma / np.maximum(totals @ membership.T.astype(np.float64), 1e-300)


def summarize_replicates(replicates: np.ndarray, hdi_prob: float = 0.95) -> dict:
    """Mean, sd, highest-density interval (arviz) and P(r > 0) over axis 0 of ``replicates``.

    NaN replicates of a cell (cells without an estimate) give NaN summaries.
    """
    from ._arviz import hdi

    r = np.asarray(replicates, dtype=np.float64)
    finite = np.isfinite(r).all(0)
    safe = np.where(finite, r, 0.0)
    if r.shape[0] > 1:
        interval = hdi(safe[None], hdi_prob)
        interval = interval.reshape(*r.shape[1:], 2)
    else:
        interval = np.stack([safe[0], safe[0]], -1)
    nan = np.where(finite, 0.0, np.nan)
    return {
        "log_ratio": safe.mean(0) + nan,
        "log_ratio_sd": (safe.std(0, ddof=1) if r.shape[0] > 1 else np.zeros(r.shape[1:])) + nan,
        "log_ratio_lower": interval[..., 0] + nan,
        "log_ratio_upper": interval[..., 1] + nan,
        "prob_positive": (safe > 0).mean(0) + nan,
    }


def log_ratio_replicates(
    log_probs_draws: np.ndarray,
    cell_sample: np.ndarray,
    members1: np.ndarray,
    members2: np.ndarray,
    weights: np.ndarray,
    *,
    omit_original_sample: bool = True,
) -> np.ndarray:
    """Replicates of ``r_n = log q_{A1}(u_n) - log q_{A2}(u_n)``.

    Parameters
    ----------
    log_probs_draws
        (D, n, S) per-sample log densities at D posterior draws of each cell's u.
    members1, members2
        (S,) boolean membership of the two groups.
    weights
        (B, S) bootstrap weights (:func:`dirichlet_weights`).

    Returns
    -------
    ndarray (B * D, n): every (weight vector, draw) pair.
    """
    membership = np.stack([members1, members2], axis=1)
    groups = group_log_probs(log_probs_draws, cell_sample, membership, omit_original_sample=omit_original_sample,
                             weights=weights, warn=False)  # (B, D, n, 2)
    r = groups[..., 0] - groups[..., 1]
    return r.reshape(-1, r.shape[-1])


@dataclass
class LogRatioSummary:
    """Per-cell and per-group summaries of a two-group DA log-ratio (see :func:`log_ratio_summary`).

    ``cells``: dict of (n,) arrays ``log_ratio``, ``log_ratio_sd``, ``log_ratio_lower``,
    ``log_ratio_upper``, ``prob_positive``. ``groups``: the same keys with (G,) arrays, for
    the mean log-ratio over each group's cells (plus ``n_cells``), or None.
    """

    cells: dict
    groups: dict | None


def log_ratio_summary(
    module,
    data,
    members1: np.ndarray,
    members2: np.ndarray,
    indices: np.ndarray | None = None,
    *,
    cell_groups: np.ndarray | None = None,
    n_groups: int | None = None,
    omit_original_sample: bool = True,
    n_draws: int = 10,
    n_bootstrap: int = 100,
    hdi_prob: float = 0.95,
    max_components_per_sample: int | None = None,
    batch_size: int = 128,
    query_chunk: int = QUERY_CHUNK,
    component_chunk: int = COMPONENT_CHUNK,
    seed: int | None = 0,
    level_names=("group1", "group2"),
    bandwidth=0.0,
) -> LogRatioSummary:
    """Uncertainty of ``r_n = log q_{A1}(u_n) - log q_{A2}(u_n)`` for the cells ``indices``.

    Replicates combine ``n_draws`` posterior draws of each cell's u (the aggregated posteriors
    keep their components at the posterior parameters) with ``n_bootstrap`` Bayesian-bootstrap
    weight vectors over the samples of each group (shared by all cells), giving
    ``n_draws * n_bootstrap`` replicates per cell; see the module docstring. ``cell_groups``
    (n,) integer codes in ``[0, n_groups)`` add a per-group table: the mean of ``r_n`` over a
    group's cells, replicate by replicate (cells without an estimate are skipped), summarised
    the same way. Streams over query chunks: memory is O(chunk x D x B + n_groups x D x B).
    ``bandwidth`` widens the components as in :func:`sample_log_probs`; the draws of u keep
    the posterior scales.
    """
    gen = make_generator(seed)
    loc, scale, samples = posterior_parameters(module, data, indices, batch_size=batch_size)
    table = kernel_components(loc, scale, samples, module.n_samples, max_components_per_sample, seed, bandwidth)
    membership = np.stack([np.asarray(members1, bool), np.asarray(members2, bool)], axis=1)
    weights = dirichlet_weights(membership, n_bootstrap, gen)
    n = loc.shape[0]
    codes = samples.cpu().numpy()
    keys = ("log_ratio", "log_ratio_sd", "log_ratio_lower", "log_ratio_upper", "prob_positive")
    cells = {k: np.empty(n) for k in keys}
    n_rep = n_draws * n_bootstrap
    if cell_groups is not None:
        cell_groups = np.asarray(cell_groups, dtype=np.int64)
        n_groups = int(cell_groups.max()) + 1 if n_groups is None else int(n_groups)
        group_sum = np.zeros((n_rep, n_groups))
        group_count = np.zeros((n_rep, n_groups))
    chunk = max(1, query_chunk // max(1, n_draws))
    for q0 in range(0, n, chunk):
        q1 = min(n, q0 + chunk)
        noise = torch.randn((n_draws, q1 - q0, loc.shape[1]), generator=gen, dtype=loc.dtype).to(loc.device)
        draws = loc[q0:q1] + scale[q0:q1] * noise
        lp = aggregated_log_density(draws.reshape(-1, loc.shape[1]), table, query_chunk=query_chunk,
                                    component_chunk=component_chunk)
        lp = lp.cpu().numpy().reshape(n_draws, q1 - q0, -1)
        r = log_ratio_replicates(lp, codes[q0:q1], membership[:, 0], membership[:, 1], weights,
                                 omit_original_sample=omit_original_sample)
        for k, v in summarize_replicates(r, hdi_prob).items():
            cells[k][q0:q1] = v
        if cell_groups is not None:
            finite = np.isfinite(r)
            onehot = np.eye(n_groups)[cell_groups[q0:q1]]  # (q, G)
            group_sum += np.where(finite, r, 0.0) @ onehot
            group_count += finite.astype(np.float64) @ onehot
    if not np.all(np.isfinite(cells["log_ratio"])):
        _own_sample_warning(int((~np.isfinite(cells["log_ratio"])).sum()),
                            [level_names[i] for i in range(2) if membership[:, i].sum() == 1], "log-ratios")
    groups = None
    if cell_groups is not None:
        with np.errstate(invalid="ignore", divide="ignore"):
            means = group_sum / group_count
        groups = summarize_replicates(means, hdi_prob)
        groups["n_cells"] = np.bincount(cell_groups, minlength=n_groups)
    return LogRatioSummary(cells, groups)


# ---------------------------------------------------------------------------------------------
# aggregated posterior object
# ---------------------------------------------------------------------------------------------
def aggregated_posterior(loc: torch.Tensor, scale: torch.Tensor):
    """The equal-weight mixture of ``Normal(loc_m, scale_m)`` (diagonal) as a Pyro distribution.

    Returns
    -------
    ``pyro.distributions.MixtureSameFamily`` with event shape (L_u,): ``.log_prob(u)`` and
    ``.sample()`` work as for any Pyro distribution (``log_prob`` materialises
    (batch, M) values; use :func:`aggregated_log_density` for many points).
    """
    import pyro.distributions as dist

    if loc.ndim != 2 or loc.shape[0] == 0:
        raise ValueError("The aggregated posterior needs at least one cell (loc of shape (M, L_u)).")
    mixing = dist.Categorical(logits=torch.zeros(loc.shape[0], dtype=loc.dtype, device=loc.device))
    return dist.MixtureSameFamily(mixing, dist.Normal(loc, scale).to_event(1))
