"""Simulated multi-sample single-cell counts with a planted, documented ground truth.

:func:`simulate` draws raw UMI-like counts for cells from several samples (donors), each sample
measured in exactly one batch, with effects of known size planted at the sample level. It is
small and fast enough for tests and tutorials, and it scales to a few hundred thousand cells
(``sparse=True``).

Design
------
Samples :math:`s = 0, \\dots, S-1` belong to batch :math:`b(s) = s \\bmod B`. Every sample
carries three sample-level covariates:

- ``disease`` in {healthy, disease}: half the samples each, balanced within every batch up to
  one sample (so it is not confounded with batch);
- ``hidden_group`` in {A, B}: half the samples each, balanced up to one sample within every
  disease level, every batch and every (batch, disease) stratum (so it is as independent of
  disease and batch as the sample count allows); it is never given to a model and stands for an
  unknown sample stratification;
- ``age``: uniform on [20, 80] and without any effect (the null covariate).

Generative model
----------------
Cell :math:`n` comes from sample :math:`s_n`, has cell type :math:`k_n` and batch
:math:`b_n = b(s_n)`. Its log expression over genes :math:`g` is

.. math::

    \\eta_{ng} = \\beta_g + 2\\,M_{k_n g} + \\sum_{l=1}^{2} u_{nl} W_{k_n l g} + \\gamma_{b_n g}
        + \\delta_g\\,[k_n = 0,\\ s_n \\in \\text{disease}]
        + \\epsilon_g\\,[k_n = 1,\\ s_n \\in \\text{B}],

with baseline log-means :math:`\\beta_g \\sim N(0, 1)`, marker indicators
:math:`M_{kg} \\in \\{0, 1\\}` (:math:`\\max(1, \\lfloor G / \\max(10, 2K) \\rfloor)` disjoint
marker genes per cell type for :math:`G` genes and :math:`K` cell types, i.e. 10% of the genes
each, or together half of them for more than 5 types; up by 2 natural-log units), a small
within-type latent factor :math:`u_{nl} \\sim N(0, 1)` with loadings
:math:`W_{klg} \\sim N(0, 0.25^2)`, a per-gene batch effect
:math:`\\gamma_{bg} \\sim N(0, 0.4^2)`, and the planted sample-level effects
:math:`\\delta_g` (DE) and :math:`\\epsilon_g` (hidden grouping), :math:`\\pm`
``de_log_fold_change`` and :math:`\\pm` ``group_log_fold_change`` on their own genes and 0
elsewhere. Counts are negative binomial,

.. math::

    x_{ng} \\sim \\mathrm{NB}\\big(\\text{mean} = \\ell_n\\,\\mathrm{softmax}(\\eta_{n})_g,\\
        \\text{inverse dispersion} = \\theta_g\\big),
    \\qquad \\theta_g \\sim \\mathrm{LogNormal}(\\log 7, 0.5^2),

drawn as a gamma-Poisson mixture, with library size
:math:`\\ell_n = L\\,m_{b_n}\\exp(\\xi_n - 0.045)`, :math:`\\xi_n \\sim N(0, 0.3^2)` (so that
:math:`E[\\ell_n] = L\\,m_{b_n}`), :math:`L` = ``mean_library_size`` and batch library
multipliers :math:`m_b` spaced geometrically from 1 (``batch_0``) to :math:`1.6^c` (last batch).
The batch strength :math:`c` = ``batch_effect_scale`` (default 1) scales both batch effects on the
log scale: :math:`\\gamma_{bg} \\sim N(0, (0.4 c)^2)` and :math:`\\log m_b` are multiplied by
:math:`c`, so :math:`c = 0` gives batch-independent means. A cell
whose counts are all zero gets one count on a uniformly chosen gene, so every cell has a total
count of at least 1.

Cell numbers and composition: every sample first gets 5 cells and the remaining
``n_cells - 5 S`` cells are spread multinomially with equal probabilities. Within a sample,
cell types are multinomial with proportions
:math:`p_s \\sim \\mathrm{Dirichlet}(50\\,\\bar p_s)`, where :math:`\\bar p_s` is uniform over
cell types, except that in disease samples the weight of ``type_2`` is multiplied by
``da_fold_change`` before renormalising. If a cell type were absent from the whole data set
(only possible for tiny ``n_cells``), one cell of the largest (sample, type) group is moved to
it. Cells are shuffled, so their order carries no information.

Planted truth
-------------
1. Cell types ``type_0`` ... are separated by their marker genes.
2. Differential expression (DE): in ``type_0`` only, disease samples have ``n_de_genes`` genes
   shifted by :math:`\\pm` ``de_log_fold_change`` (natural log, half up, half down).
3. Hidden grouping: in ``type_1`` only, samples of ``hidden_group`` B have ``n_group_genes``
   other genes shifted by :math:`\\pm` ``group_log_fold_change`` (half up, half down).
4. Differential abundance (DA): ``type_2`` has ``da_fold_change`` times the expected proportion
   (before renormalising) in disease samples.
5. Batch nuisance: per-gene batch log effects and batch library-size multipliers, both scaled
   on the log scale by ``batch_effect_scale``.
6. ``age`` has no effect at all.

DE genes, grouping genes and marker genes are pairwise disjoint. The planted log fold changes
act on :math:`\\eta` before the softmax, so the fold changes of normalised expression differ
from them by the change of the log normaliser, which is small because the signs are balanced.
Log fold changes are oriented disease versus healthy and B versus A.

The truth is stored in ``adata.uns["simulation"]`` (only str, int, float, lists and dicts, so
it survives ``write_h5ad``):

- ``description`` (str): a short text of the above; ``seed`` (int): the seed used.
- ``marker_genes`` (dict of cell type to list of str) and ``marker_log_fold_change`` (float).
- DE: ``de_cell_type`` (``"type_0"``), ``de_covariate`` (``"disease"``), ``de_genes`` (list
  of str) and ``de_log_fold_changes`` (list of float, in the order of ``de_genes``).
- Hidden grouping: ``grouping_cell_type`` (``"type_1"``), ``grouping_covariate``
  (``"hidden_group"``), ``grouping_genes`` and ``grouping_log_fold_changes``.
- DA: ``da_cell_type`` (``"type_2"``), ``da_covariate`` (``"disease"``), ``da_fold_change``.
- Batch nuisance: ``batch_library_multipliers`` (list of float, one per batch),
  ``batch_gene_effect_sd`` (float) and ``batch_effect_scale`` (float).
- ``preset`` (str): the effect-size preset the unset effect sizes were taken from.

Effect-size presets
-------------------
``preset`` fills in every effect-size argument left at ``None``:

========================  ==========  ========
argument                  ``strong``  ``weak``
========================  ==========  ========
``de_log_fold_change``    1.5         0.5
``n_de_genes``            20          30
``group_log_fold_change`` 1.5         0.5
``n_group_genes``         20          30
``da_fold_change``        3.0         1.8
``batch_effect_scale``    1.0         1.5
========================  ==========  ========

``strong`` (the default) is the data every earlier version simulated, bit for bit. ``weak`` has
effects of the size a real cohort shows (a fold change of about 1.65 on 30 genes, 1.8x the
abundance) under a stronger batch effect (per-gene log sd 0.6, library multipliers up to 2.0).
- ``null_covariate`` (``"age"``).
"""

from __future__ import annotations

from dataclasses import dataclass

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

MIN_CELLS_PER_SAMPLE = 5
"""Every sample gets at least this many cells."""

MARKER_LOG_FOLD_CHANGE = 2.0
"""Natural-log shift of a cell type's marker genes."""

N_LATENT_FACTORS = 2
"""Number of continuous within-type latent factors."""

LATENT_LOADING_SD = 0.25
"""Standard deviation of the within-type latent-factor loadings."""

BASELINE_LOG_MEAN_SD = 1.0
"""Standard deviation of the baseline gene log-means."""

BATCH_GENE_EFFECT_SD = 0.4
"""Standard deviation of the per-gene, per-batch log effects."""

MAX_BATCH_LIBRARY_MULTIPLIER = 1.6
"""Library-size multiplier of the last batch relative to ``batch_0``."""

LIBRARY_SIZE_LOG_SD = 0.3
"""Standard deviation of a cell's log library size around its batch mean."""

INVERSE_DISPERSION_LOG_MEAN = float(np.log(7.0))
INVERSE_DISPERSION_LOG_SD = 0.5
"""Gene inverse dispersions are log-normal with these log-scale mean and sd."""

PROPORTION_CONCENTRATION = 50.0
"""Total Dirichlet concentration of the per-sample cell-type proportions."""

AGE_RANGE = (20.0, 80.0)
"""Range of the uniform null covariate ``age``."""

CHUNK_ENTRIES = 2**21
"""Cells are generated in chunks of about this many (cell, gene) entries."""

PRESETS = {
    "strong": {
        "de_log_fold_change": 1.5,
        "n_de_genes": 20,
        "group_log_fold_change": 1.5,
        "n_group_genes": 20,
        "da_fold_change": 3.0,
        "batch_effect_scale": 1.0,
    },
    "weak": {
        "de_log_fold_change": 0.5,
        "n_de_genes": 30,
        "group_log_fold_change": 0.5,
        "n_group_genes": 30,
        "da_fold_change": 1.8,
        "batch_effect_scale": 1.5,
    },
}
"""Effect sizes of the presets; ``simulate(preset=...)`` fills unset arguments from these."""

_DESCRIPTION = (
    "Simulated negative binomial counts from {n_samples} samples in {n_batches} batches "
    "(sample i in batch i % n_batches) and {n_cell_types} cell types separated by marker genes "
    "(+{marker_lfc} natural log). DE: in {de_type} only, disease samples have {n_de} genes "
    "shifted by +/-{lfc} (natural log, disease vs healthy). Hidden grouping: in {group_type} "
    "only, hidden_group B samples have {n_group} other genes shifted by +/-{group_lfc} (B vs A). "
    "DA: {da_type} has {da_fc}x the expected proportion in disease samples. Batch nuisance: "
    "per-gene log effects (sd {batch_sd}) and library multipliers {multipliers}. "
    "Null covariate: age (no effect). Cells with zero total count get one count on a random "
    "gene."
)


def simulate(
    n_cells: int = 2000,
    n_genes: int = 200,
    n_samples: int = 12,
    n_batches: int = 2,
    n_cell_types: int = 4,
    *,
    seed: int = 0,
    sparse: bool = False,
    preset: str = "strong",
    de_log_fold_change: float | None = None,
    n_de_genes: int | None = None,
    group_log_fold_change: float | None = None,
    n_group_genes: int | None = None,
    da_fold_change: float | None = None,
    batch_effect_scale: float | None = None,
    mean_library_size: float = 1500.0,
) -> anndata.AnnData:
    """Simulate multi-sample single-cell counts with planted sample-level effects.

    See the module docstring for the generative model and the planted truth.

    Parameters
    ----------
    n_cells
        Total number of cells; at least 5 per sample.
    n_genes
        Number of genes; must hold ``max(1, n_genes // max(10, 2 * n_cell_types))`` marker genes
        per cell type plus the DE and grouping genes.
    n_samples
        Number of samples; even and at least ``max(4, 2 * n_batches)``.
    n_batches
        Number of batches; sample ``i`` is in batch ``i % n_batches``.
    n_cell_types
        Number of cell types, at least 3 (``type_0`` carries DE, ``type_1`` the hidden
        grouping, ``type_2`` DA).
    seed
        Seed of :func:`numpy.random.default_rng`; equal seeds give identical data.
    sparse
        Return ``X`` as a :class:`scipy.sparse.csr_matrix` instead of a dense array (same
        values for the same seed).
    preset
        ``"strong"`` or ``"weak"``: where every effect-size argument left at ``None`` takes its
        value from (see :data:`PRESETS` and the module docstring).
    de_log_fold_change
        Magnitude (natural log) of the DE shifts; ``None``: the preset's (strong 1.5, weak 0.5).
    n_de_genes
        Number of DE genes in ``type_0``; ``None``: the preset's (strong 20, weak 30).
    group_log_fold_change
        Magnitude (natural log) of the hidden-grouping shifts; ``None``: the preset's (strong
        1.5, weak 0.5), except that when only ``de_log_fold_change`` is given it is used here
        too (as before this argument existed).
    n_group_genes
        Number of hidden-grouping genes in ``type_1``; ``None``: the preset's (strong 20,
        weak 30).
    da_fold_change
        Multiplier of the expected ``type_2`` proportion in disease samples; ``None``: the
        preset's (strong 3.0, weak 1.8).
    batch_effect_scale
        Batch strength :math:`c \\ge 0`: the per-gene batch log effects have sd :math:`0.4 c`
        and the last batch's library multiplier is :math:`1.6^c`; 0 makes the expected counts
        independent of the batch. ``None``: the preset's (strong 1.0, weak 1.5).
    mean_library_size
        Mean total count of a ``batch_0`` cell.

    Returns
    -------
    anndata.AnnData
        Raw counts in ``X`` (float32), ``var_names`` ``gene_000``..., ``obs_names``
        ``cell_0000``..., categorical ``obs`` columns ``sample``, ``batch``, ``cell_type``,
        ``disease``, ``hidden_group``, a float column ``age``, and the ground truth in
        ``uns["simulation"]``.

    Raises
    ------
    ValueError
        If an argument is out of range or the genes cannot hold markers, DE and grouping genes.
    """
    return _simulate(
        n_cells, n_genes, n_samples, n_batches, n_cell_types, seed=seed, sparse=sparse, preset=preset,
        de_log_fold_change=de_log_fold_change, n_de_genes=n_de_genes, group_log_fold_change=group_log_fold_change,
        n_group_genes=n_group_genes, da_fold_change=da_fold_change, batch_effect_scale=batch_effect_scale,
        mean_library_size=mean_library_size,
    )


def write_simulated_h5ad(path, n_cells: int = 2000, n_genes: int = 200, *, block_entries: int = 2**16,
                         **simulate_kwargs) -> None:
    """:func:`simulate` straight to an .h5ad file, block by block (for cohorts larger than memory).

    The file holds what ``simulate(n_cells, n_genes, sparse=True, **simulate_kwargs)
    .write_h5ad(path)`` would write -- the same counts (CSR), ``obs``, ``var`` and
    ``uns["simulation"]`` for the same arguments -- but the count matrix is never held in
    memory: each block of cells (about ``CHUNK_ENTRIES`` counts) is appended to the file as it is
    drawn. Memory is that of the per-cell annotations (tens of bytes per cell) and one block.
    Read it with ``anndata.read_h5ad(path, backed="r")`` to keep the counts on disk.

    Parameters
    ----------
    path
        The .h5ad file to create (an existing file is refused).
    n_cells, n_genes, **simulate_kwargs
        As in :func:`simulate` (``sparse`` is implied).
    block_entries
        HDF5 chunk length of the stored ``data`` and ``indices`` arrays.
    """
    import inspect
    import os

    import h5py
    from anndata.io import write_elem

    if os.path.exists(path):
        raise ValueError(f"{path} already exists; write_simulated_h5ad creates a new file (choose another path).")
    defaults = {name: p.default for name, p in inspect.signature(simulate).parameters.items()
                if name not in ("n_cells", "n_genes")}
    unknown = sorted(set(simulate_kwargs) - set(defaults))
    if unknown:
        raise ValueError(f"Unknown argument(s) {unknown} of simulate; known: {sorted(defaults)}.")
    try:
        with h5py.File(path, "w-") as file:
            group = file.create_group("X")
            arrays = {name: group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype,
                                                 chunks=(int(block_entries),))
                      for name, dtype in (("data", "float32"), ("indices", "int32"))}
            offsets = [np.zeros(1, dtype=np.int64)]

            def append(block: np.ndarray) -> None:
                csr = sp.csr_matrix(block)
                first = arrays["data"].shape[0]
                for name, values in (("data", csr.data), ("indices", csr.indices)):
                    arrays[name].resize((first + csr.nnz,))
                    arrays[name][first:] = values
                offsets.append(csr.indptr[1:].astype(np.int64) + first)

            adata = _simulate(n_cells, n_genes, write_counts=append, **{**defaults, **simulate_kwargs, "sparse": True})
            group.create_dataset("indptr", data=np.concatenate(offsets))
            group.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0",
                                "shape": np.array([adata.n_obs, adata.n_vars])})
            file.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
            for key in ("obs", "var", "uns", "obsm", "varm", "obsp", "varp", "layers"):
                write_elem(file, key, getattr(adata, key) if key in ("obs", "var") else dict(getattr(adata, key)))
    except BaseException:
        if os.path.exists(path):
            os.remove(path)  # ours: created above, left incomplete
        raise


def _simulate(n_cells, n_genes, n_samples, n_batches, n_cell_types, *, seed, sparse, preset, de_log_fold_change,
              n_de_genes, group_log_fold_change, n_group_genes, da_fold_change, batch_effect_scale,
              mean_library_size, write_counts=None):
    """The body of :func:`simulate`; ``write_counts`` (if given) receives each block of counts
    (a dense float32 array of consecutive cells) instead of the returned AnnData (``X`` None)."""
    effects = _effect_sizes(
        preset, de_log_fold_change=de_log_fold_change, n_de_genes=n_de_genes,
        group_log_fold_change=group_log_fold_change, n_group_genes=n_group_genes, da_fold_change=da_fold_change,
        batch_effect_scale=batch_effect_scale,
    )
    n_markers_per_type = max(1, n_genes // max(10, 2 * n_cell_types))
    _validate_arguments(
        n_cells=n_cells, n_genes=n_genes, n_samples=n_samples, n_batches=n_batches, n_cell_types=n_cell_types,
        seed=seed, **effects, mean_library_size=mean_library_size, n_markers_per_type=n_markers_per_type,
    )
    # One generator, consumed in this order by the steps: genes, samples, cells, counts.
    rng = np.random.default_rng(seed)
    genes = _draw_genes(rng, n_genes, n_cell_types, n_batches, n_markers_per_type, effects)
    samples = _draw_samples(rng, n_samples, n_batches)
    cells = _draw_cells(rng, n_cells, n_cell_types, samples, genes, effects["da_fold_change"], mean_library_size)
    counts = _draw_counts(rng, genes, cells, n_genes, n_cell_types, sparse, write_counts)
    return _assemble(counts, genes, samples, cells, effects, n_batches=n_batches, n_cell_types=n_cell_types,
                     seed=seed, preset=preset)


def _effect_sizes(preset: str, **given) -> dict:
    """The effect-size arguments, each ``None`` taken from ``PRESETS[preset]`` (a grouping shift
    left unset follows an explicit DE shift, as before it had its own argument)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}.")
    if given["group_log_fold_change"] is None and given["de_log_fold_change"] is not None:
        given["group_log_fold_change"] = given["de_log_fold_change"]
    return {name: PRESETS[preset][name] if value is None else value for name, value in given.items()}


@dataclass
class _Genes:
    """Gene-level draws: markers, planted shifts, log means, batch effects, dispersions."""

    marker_indices: list
    de_indices: np.ndarray
    group_indices: np.ndarray
    de_shifts: np.ndarray
    group_shifts: np.ndarray
    type_log_mean: np.ndarray
    latent_loadings: np.ndarray
    batch_gene_effect_sd: float
    batch_gene_effect: np.ndarray
    batch_library_multipliers: np.ndarray
    inverse_dispersion: np.ndarray


def _draw_genes(rng, n_genes, n_cell_types, n_batches, n_markers_per_type, effects) -> _Genes:
    """Disjoint marker, DE and grouping genes, the planted shifts and every per-gene parameter."""
    gene_order = rng.permutation(n_genes)
    marker_indices = [
        np.sort(gene_order[k * n_markers_per_type : (k + 1) * n_markers_per_type])
        for k in range(n_cell_types)
    ]
    first_free = n_cell_types * n_markers_per_type
    n_de_genes, n_group_genes = effects["n_de_genes"], effects["n_group_genes"]
    de_indices = np.sort(gene_order[first_free : first_free + n_de_genes])
    group_indices = np.sort(
        gene_order[first_free + n_de_genes : first_free + n_de_genes + n_group_genes]
    )
    de_shifts = effects["de_log_fold_change"] * _balanced_signs(n_de_genes, rng)
    group_shifts = effects["group_log_fold_change"] * _balanced_signs(n_group_genes, rng)

    baseline_log_mean = rng.normal(0.0, BASELINE_LOG_MEAN_SD, size=n_genes)
    type_log_mean = np.tile(baseline_log_mean, (n_cell_types, 1))
    for k, markers in enumerate(marker_indices):
        type_log_mean[k, markers] += MARKER_LOG_FOLD_CHANGE
    latent_loadings = rng.normal(
        0.0, LATENT_LOADING_SD, size=(n_cell_types, N_LATENT_FACTORS, n_genes)
    )
    batch_effect_scale = effects["batch_effect_scale"]
    batch_gene_effect_sd = BATCH_GENE_EFFECT_SD * batch_effect_scale
    batch_gene_effect = rng.normal(0.0, batch_gene_effect_sd, size=(n_batches, n_genes))
    batch_library_multipliers = (MAX_BATCH_LIBRARY_MULTIPLIER**batch_effect_scale) ** (
        np.arange(n_batches) / max(n_batches - 1, 1)
    )
    inverse_dispersion = np.exp(
        rng.normal(INVERSE_DISPERSION_LOG_MEAN, INVERSE_DISPERSION_LOG_SD, size=n_genes)
    )
    return _Genes(marker_indices, de_indices, group_indices, de_shifts, group_shifts, type_log_mean,
                  latent_loadings, batch_gene_effect_sd, batch_gene_effect, batch_library_multipliers,
                  inverse_dispersion)


@dataclass
class _Samples:
    """Sample-level draws: batch, disease, hidden group and age of every sample."""

    batch: np.ndarray
    is_disease: np.ndarray
    in_group_b: np.ndarray
    age: np.ndarray


def _draw_samples(rng, n_samples, n_batches) -> _Samples:
    """Batches in turn; disease and hidden group balanced within strata; age uniform."""
    sample_batch = np.arange(n_samples) % n_batches
    sample_is_disease = _alternate_within_strata(sample_batch, rng)
    # Batches run forwards for healthy and backwards for disease samples, so that the odd
    # samples left over in (batch, disease) strata alternate between A and B within batches too.
    sample_in_group_b = _alternate_within_strata(
        np.where(sample_is_disease, 2 * n_batches - 1 - sample_batch, sample_batch), rng
    )
    sample_age = rng.uniform(*AGE_RANGE, size=n_samples)
    return _Samples(sample_batch, sample_is_disease, sample_in_group_b, sample_age)


@dataclass
class _Cells:
    """Cell-level draws, in the final (shuffled) cell order."""

    sample: np.ndarray
    cell_type: np.ndarray
    batch: np.ndarray
    latent: np.ndarray
    library_size: np.ndarray
    has_de: np.ndarray
    has_group_shift: np.ndarray


def _draw_cells(rng, n_cells, n_cell_types, samples: _Samples, genes: _Genes, da_fold_change,
                mean_library_size) -> _Cells:
    """Cells per sample and cell type (DA planted in the proportions), shuffled; latent factors,
    library sizes and which cells carry the DE and grouping shifts."""
    n_samples = len(samples.batch)
    type_weights = np.ones((n_samples, n_cell_types))
    type_weights[samples.is_disease, 2] *= da_fold_change
    expected_proportions = type_weights / type_weights.sum(axis=1, keepdims=True)
    proportions = np.stack(
        [rng.dirichlet(PROPORTION_CONCENTRATION * p) for p in expected_proportions]
    )
    cells_per_sample = MIN_CELLS_PER_SAMPLE + rng.multinomial(
        n_cells - MIN_CELLS_PER_SAMPLE * n_samples, np.full(n_samples, 1.0 / n_samples)
    )
    cells_per_sample_type = np.stack(
        [rng.multinomial(n, p) for n, p in zip(cells_per_sample, proportions)]
    )
    _ensure_every_type_present(cells_per_sample_type)
    cell_sample = np.repeat(np.arange(n_samples), cells_per_sample)
    cell_type = np.repeat(
        np.tile(np.arange(n_cell_types), n_samples), cells_per_sample_type.ravel()
    )
    shuffle = rng.permutation(n_cells)
    cell_sample, cell_type = cell_sample[shuffle], cell_type[shuffle]
    cell_batch = samples.batch[cell_sample]
    cell_latent = rng.normal(size=(n_cells, N_LATENT_FACTORS))
    cell_library_size = (
        mean_library_size
        * genes.batch_library_multipliers[cell_batch]
        * np.exp(rng.normal(-0.5 * LIBRARY_SIZE_LOG_SD**2, LIBRARY_SIZE_LOG_SD, size=n_cells))
    )
    cell_has_de = (cell_type == 0) & samples.is_disease[cell_sample]
    cell_has_group_shift = (cell_type == 1) & samples.in_group_b[cell_sample]
    return _Cells(cell_sample, cell_type, cell_batch, cell_latent, cell_library_size, cell_has_de,
                  cell_has_group_shift)


def _draw_counts(rng, genes: _Genes, cells: _Cells, n_genes, n_cell_types, sparse, write_counts=None):
    """Negative binomial counts (float32), chunk by chunk of cells: dense or CSR; with
    ``write_counts``, each chunk is passed to it instead and None is returned."""
    n_cells = len(cells.sample)
    chunk_size = max(1, CHUNK_ENTRIES // n_genes)
    sparse_chunks = []
    dense_counts = None if sparse or write_counts else np.empty((n_cells, n_genes), dtype=np.float32)
    for start in range(0, n_cells, chunk_size):
        rows = slice(start, min(start + chunk_size, n_cells))
        log_expression = genes.type_log_mean[cells.cell_type[rows]] + genes.batch_gene_effect[cells.batch[rows]]
        for k in range(n_cell_types):
            of_type = cells.cell_type[rows] == k
            log_expression[of_type] += cells.latent[rows][of_type] @ genes.latent_loadings[k]
        log_expression[np.ix_(cells.has_de[rows], genes.de_indices)] += genes.de_shifts
        log_expression[np.ix_(cells.has_group_shift[rows], genes.group_indices)] += genes.group_shifts
        chunk_counts = _sample_counts(
            log_expression, cells.library_size[rows], genes.inverse_dispersion, rng
        ).astype(np.float32)
        if write_counts is not None:
            write_counts(chunk_counts)
        elif sparse:
            sparse_chunks.append(sp.csr_matrix(chunk_counts))
        else:
            dense_counts[rows] = chunk_counts
    if write_counts is not None:
        return None
    return sp.vstack(sparse_chunks, format="csr") if sparse else dense_counts


def _assemble(counts, genes: _Genes, samples: _Samples, cells: _Cells, effects: dict, *, n_batches, n_cell_types,
              seed, preset) -> anndata.AnnData:
    """The AnnData: counts (None: ``X`` None), named genes and cells, categorical obs, and the
    truth in ``uns``."""
    n_cells, n_genes = len(cells.sample), len(genes.inverse_dispersion)
    gene_names = _names("gene", n_genes, min_width=3)
    sample_names = _names("sample", len(samples.batch), min_width=2)
    obs = pd.DataFrame(
        {
            "sample": pd.Categorical.from_codes(cells.sample, categories=sample_names),
            "batch": pd.Categorical.from_codes(
                cells.batch, categories=[f"batch_{b}" for b in range(n_batches)]
            ),
            "cell_type": pd.Categorical.from_codes(
                cells.cell_type, categories=[f"type_{k}" for k in range(n_cell_types)]
            ),
            "disease": pd.Categorical.from_codes(
                samples.is_disease[cells.sample].astype(int), categories=["healthy", "disease"]
            ),
            "hidden_group": pd.Categorical.from_codes(
                samples.in_group_b[cells.sample].astype(int), categories=["A", "B"]
            ),
            "age": samples.age[cells.sample],
        },
        index=_names("cell", n_cells, min_width=4),
    )
    adata = anndata.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=gene_names))
    adata.uns["simulation"] = {
        "description": _DESCRIPTION.format(
            n_samples=len(samples.batch),
            n_batches=n_batches,
            n_cell_types=n_cell_types,
            marker_lfc=MARKER_LOG_FOLD_CHANGE,
            de_type="type_0",
            n_de=effects["n_de_genes"],
            lfc=float(effects["de_log_fold_change"]),
            group_lfc=float(effects["group_log_fold_change"]),
            group_type="type_1",
            n_group=effects["n_group_genes"],
            da_type="type_2",
            da_fc=float(effects["da_fold_change"]),
            batch_sd=genes.batch_gene_effect_sd,
            multipliers=[round(float(m), 3) for m in genes.batch_library_multipliers],
        ),
        "seed": int(seed),
        "marker_genes": {
            f"type_{k}": [gene_names[g] for g in markers]
            for k, markers in enumerate(genes.marker_indices)
        },
        "marker_log_fold_change": MARKER_LOG_FOLD_CHANGE,
        "de_cell_type": "type_0",
        "de_covariate": "disease",
        "de_genes": [gene_names[g] for g in genes.de_indices],
        "de_log_fold_changes": [float(x) for x in genes.de_shifts],
        "grouping_cell_type": "type_1",
        "grouping_covariate": "hidden_group",
        "grouping_genes": [gene_names[g] for g in genes.group_indices],
        "grouping_log_fold_changes": [float(x) for x in genes.group_shifts],
        "da_cell_type": "type_2",
        "da_covariate": "disease",
        "da_fold_change": float(effects["da_fold_change"]),
        "batch_library_multipliers": [float(m) for m in genes.batch_library_multipliers],
        "batch_gene_effect_sd": float(genes.batch_gene_effect_sd),
        "batch_effect_scale": float(effects["batch_effect_scale"]),
        "null_covariate": "age",
        "preset": preset,
    }
    return adata


def _validate_arguments(
    *,
    n_cells,
    n_genes,
    n_samples,
    n_batches,
    n_cell_types,
    seed,
    de_log_fold_change,
    n_de_genes,
    group_log_fold_change,
    n_group_genes,
    da_fold_change,
    batch_effect_scale,
    mean_library_size,
    n_markers_per_type,
) -> None:
    """Raise :class:`ValueError` with a clear message for any invalid :func:`simulate` argument."""
    integers = {
        "n_cells": n_cells,
        "n_genes": n_genes,
        "n_samples": n_samples,
        "n_batches": n_batches,
        "n_cell_types": n_cell_types,
        "seed": seed,
        "n_de_genes": n_de_genes,
        "n_group_genes": n_group_genes,
    }
    for name, value in integers.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, got {value!r}.")
    for name in ("n_de_genes", "n_group_genes", "seed"):
        if integers[name] < 0:
            raise ValueError(f"{name} must be non-negative, got {integers[name]}.")
    if n_batches < 1:
        raise ValueError(f"n_batches must be at least 1, got {n_batches}.")
    if n_samples < 4 or n_samples % 2:
        raise ValueError(f"n_samples must be even and at least 4, got {n_samples}.")
    if n_samples < 2 * n_batches:
        raise ValueError(
            f"n_samples must be at least 2 * n_batches = {2 * n_batches} so that every batch "
            f"holds a healthy and a disease sample, got {n_samples}."
        )
    if n_cell_types < 3:
        raise ValueError(
            f"n_cell_types must be at least 3 (DE, hidden grouping and DA each use one), "
            f"got {n_cell_types}."
        )
    if n_cells < MIN_CELLS_PER_SAMPLE * n_samples:
        raise ValueError(
            f"n_cells must be at least {MIN_CELLS_PER_SAMPLE} * n_samples = "
            f"{MIN_CELLS_PER_SAMPLE * n_samples}, got {n_cells}."
        )
    n_genes_needed = n_cell_types * n_markers_per_type + n_de_genes + n_group_genes
    if n_genes < n_genes_needed:
        raise ValueError(
            f"n_genes = {n_genes} is too small: {n_cell_types} cell types x "
            f"{n_markers_per_type} marker genes + {n_de_genes} DE genes + {n_group_genes} "
            f"grouping genes need {n_genes_needed} distinct genes."
        )
    reals = {
        "de_log_fold_change": de_log_fold_change,
        "group_log_fold_change": group_log_fold_change,
        "da_fold_change": da_fold_change,
        "batch_effect_scale": batch_effect_scale,
        "mean_library_size": mean_library_size,
    }
    for name, value in reals.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(f"{name} must be a real number, got {value!r}.")
        if not np.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}.")
    for name in ("de_log_fold_change", "group_log_fold_change"):
        if reals[name] < 0:
            raise ValueError(
                f"{name} is a magnitude and must be non-negative, got {reals[name]}."
            )
    if batch_effect_scale < 0:
        raise ValueError(
            f"batch_effect_scale must be non-negative (0: no batch effect, 1: the default "
            f"strength), got {batch_effect_scale}."
        )
    if da_fold_change <= 0:
        raise ValueError(f"da_fold_change must be positive, got {da_fold_change}.")
    if mean_library_size <= 0:
        raise ValueError(f"mean_library_size must be positive, got {mean_library_size}.")


def _balanced_signs(n: int, rng: np.random.Generator) -> np.ndarray:
    """Return ``n`` signs in random order, ``ceil(n / 2)`` of them +1 and the rest -1."""
    signs = np.where(np.arange(n) < (n + 1) // 2, 1.0, -1.0)
    return rng.permutation(signs)


def _alternate_within_strata(strata: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Split units into two halves, balanced within every stratum.

    Units are ordered by stratum (randomly within a stratum) and labelled alternately, so each
    stratum's two halves differ by at most one unit and, for an even number of units, the two
    halves overall are equal.

    Parameters
    ----------
    strata
        Integer stratum of every unit.
    rng
        Random generator for the order within strata.

    Returns
    -------
    numpy.ndarray
        Boolean membership of the second half, one per unit.
    """
    order = np.lexsort((rng.permutation(len(strata)), strata))
    in_second_half = np.zeros(len(strata), dtype=bool)
    in_second_half[order] = np.arange(len(strata)) % 2 == 1
    return in_second_half


def _ensure_every_type_present(cells_per_sample_type: np.ndarray) -> None:
    """Move one cell from the largest (sample, type) group into every absent cell type, in place."""
    for missing_type in np.flatnonzero(cells_per_sample_type.sum(axis=0) == 0):
        sample, largest_type = np.unravel_index(
            np.argmax(cells_per_sample_type), cells_per_sample_type.shape
        )
        cells_per_sample_type[sample, largest_type] -= 1
        cells_per_sample_type[sample, missing_type] += 1


def _sample_counts(
    log_expression: np.ndarray,
    library_size: np.ndarray,
    inverse_dispersion: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Draw negative binomial counts with mean ``library_size * softmax(log_expression)``.

    Parameters
    ----------
    log_expression
        Unnormalised log expression, shape ``(cells, genes)``; overwritten.
    library_size
        Expected total count of every cell, shape ``(cells,)``.
    inverse_dispersion
        Gene inverse dispersions, shape ``(genes,)``.
    rng
        Random generator.

    Returns
    -------
    numpy.ndarray
        Integer counts, shape ``(cells, genes)``, with every row total at least 1.
    """
    log_expression -= log_expression.max(axis=1, keepdims=True)
    mean = np.exp(log_expression, out=log_expression)
    mean *= (library_size / mean.sum(axis=1))[:, None]
    rate = rng.gamma(inverse_dispersion, mean / inverse_dispersion)
    counts = rng.poisson(rate)
    empty_cells = np.flatnonzero(counts.sum(axis=1) == 0)
    counts[empty_cells, rng.integers(counts.shape[1], size=len(empty_cells))] = 1
    return counts


def _names(prefix: str, n: int, min_width: int) -> list[str]:
    """Return ``prefix_000``-style names, zero-padded to at least ``min_width`` digits."""
    width = max(min_width, len(str(n - 1)))
    return [f"{prefix}_{i:0{width}d}" for i in range(n)]
