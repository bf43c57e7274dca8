"""A second simulator of multi-sample counts, independent of :mod:`mrvi_pyro.datasets`.

The accuracy benchmark scores both implementations on data from two simulators with different
generative forms, so that a result cannot come from tuning the model to one simulator. This one
differs from ``datasets.simulate`` in every layer:

- **Cell states**: a low-rank log-normal gene-program model. ``n_programs`` programs with sparse
  non-negative gene loadings :math:`W_{pg}` (each gene in a program with probability 0.15,
  loading :math:`\\sim` Gamma(2, 0.5)); cell type :math:`k` has program activities
  :math:`A_{kp} \\sim N(0, 1.2^2)` and every cell adds its own activity noise
  :math:`\\nu_{np} \\sim N(0, 0.35^2)`, so :math:`\\eta_{ng} = \\beta_g + (A_{k_n} + \\nu_n) W_g`
  with :math:`\\beta_g \\sim N(-0.5, 1.2^2)` (no marker-gene blocks).
- **Batch**: per-gene *multiplicative* effects :math:`\\exp(\\gamma_{bg})`,
  :math:`\\gamma_{bg} \\sim N(0, \\sigma_b^2)` (``batch_sd``), and a per-batch log library
  offset :math:`N(0, (\\sigma_b / 2)^2)`.
- **Library sizes**: log-normal, :math:`\\log \\ell_n \\sim N(\\log L + o_{b_n}, 0.4^2)`.
- **Counts**: negative binomial with mean :math:`\\ell_n \\mathrm{softmax}(\\eta_n)_g` and
  gene-wise inverse dispersions :math:`\\theta_g \\sim` Gamma(2, 4) (drawn with numpy's
  ``negative_binomial``, not a gamma-Poisson mixture).
- **Design**: samples are assigned to batches in contiguous blocks (not ``i % B``); cells per
  sample are log-normal (:math:`\\sigma = 0.3`) around ``n_cells / n_samples``; base cell-type
  proportions are Dirichlet(4) (unequal types) and each sample's are Dirichlet(40 p).

Planted truth (which cell types carry it is drawn at random, three distinct types):

- DE: in ``de_cell_type``, disease samples (half of them, balanced within batches) multiply
  ``n_de_genes`` genes (drawn among the genes expressed above the median in that type) by
  :math:`\\exp(\\pm |N(\\lambda, (\\lambda / 4)^2)|)`, :math:`\\lambda` = ``de_log_fold_change``,
  random signs.
- Hidden grouping: in ``grouping_cell_type``, samples of ``hidden_group`` B (half, balanced across
  disease and batch; never shown to a model) shift ``n_group_genes`` other genes likewise by
  ``group_log_fold_change``.
- DA: ``da_cell_type`` has ``da_fold_change`` times its base proportion in disease samples.
- ``null_group`` (X/Y, half the samples, balanced within disease strata) has no effect.

The obs layout is that of ``datasets.simulate`` (``sample``, ``batch``, ``cell_type``,
``disease``, ``hidden_group``, then the null covariate, here the categorical ``null_group``) and
``uns["simulation"]`` holds the same truth keys (``de_cell_type``, ``de_genes``,
``de_log_fold_changes``, ``grouping_cell_type``, ``grouping_genes``, ``da_cell_type``,
``da_fold_change``, ``null_covariate``, ...).
"""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

PRESETS = {
    "strong": {"de_log_fold_change": 1.5, "n_de_genes": 25, "group_log_fold_change": 1.5,
               "n_group_genes": 25, "da_fold_change": 3.0, "batch_sd": 0.3},
    "weak": {"de_log_fold_change": 0.5, "n_de_genes": 30, "group_log_fold_change": 0.5,
             "n_group_genes": 30, "da_fold_change": 1.8, "batch_sd": 0.5},
}
"""Effect sizes of the presets; :func:`simulate_programs` fills unset arguments from these."""

CHUNK_CELLS = 2048
"""Counts are drawn in chunks of this many cells."""


def simulate_programs(
    n_cells: int = 12_000,
    n_genes: int = 1_000,
    n_samples: int = 24,
    n_batches: int = 3,
    n_cell_types: int = 6,
    *,
    seed: int = 0,
    preset: str = "strong",
    n_programs: int = 12,
    mean_library_size: float = 2_000.0,
    sparse: bool = True,
    **effects,
) -> anndata.AnnData:
    """Simulate counts from the gene-program model described in the module docstring.

    Parameters
    ----------
    n_cells, n_genes, n_samples, n_batches, n_cell_types
        Sizes; ``n_samples`` even and at least ``2 * n_batches``, at least 3 cell types.
    seed
        Seed of :func:`numpy.random.default_rng`.
    preset
        ``"strong"`` or ``"weak"`` (see :data:`PRESETS`); any key of a preset passed in
        ``effects`` overrides it.
    n_programs
        Number of gene programs.
    mean_library_size
        Median total count of a cell before batch offsets.
    sparse
        Return ``X`` as CSR (float32) instead of a dense array.
    **effects
        Overrides of ``de_log_fold_change``, ``n_de_genes``, ``group_log_fold_change``,
        ``n_group_genes``, ``da_fold_change``, ``batch_sd``.

    Returns
    -------
    anndata.AnnData
        Raw counts and obs as described in the module docstring; truth in ``uns["simulation"]``.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}.")
    unknown = set(effects) - set(PRESETS[preset])
    if unknown:
        raise ValueError(f"Unknown effect-size arguments {sorted(unknown)}; use {sorted(PRESETS[preset])}.")
    effect = {**PRESETS[preset], **effects}
    if n_samples % 2 or n_samples < 2 * n_batches:
        raise ValueError(f"n_samples must be even and at least 2 * n_batches, got {n_samples}.")
    if n_cell_types < 3:
        raise ValueError(f"n_cell_types must be at least 3 (DE, grouping, DA), got {n_cell_types}.")
    if effect["n_de_genes"] + effect["n_group_genes"] > n_genes // 2:
        raise ValueError(f"n_genes = {n_genes} is too small for {effect['n_de_genes']} DE and "
                         f"{effect['n_group_genes']} grouping genes (at most half the genes).")
    rng = np.random.default_rng([seed, 20240611])

    # Gene programs and cell types.
    in_program = rng.random((n_programs, n_genes)) < 0.15
    loadings = np.where(in_program, rng.gamma(2.0, 0.5, size=(n_programs, n_genes)), 0.0)
    activities = rng.normal(0.0, 1.2, size=(n_cell_types, n_programs))
    baseline = rng.normal(-0.5, 1.2, size=n_genes)
    inverse_dispersion = rng.gamma(2.0, 4.0, size=n_genes)

    # Samples: contiguous batch blocks, disease balanced within batches, hidden group balanced
    # within (batch, disease), null group balanced within disease.
    batch_sizes = np.diff(np.linspace(0, n_samples, n_batches + 1).round().astype(int))
    sample_batch = np.repeat(np.arange(n_batches), batch_sizes)
    sample_disease = _balanced_split(sample_batch, rng)
    sample_group_b = _balanced_split(sample_batch * 2 + sample_disease, rng)
    sample_null_y = _balanced_split(sample_disease * 2 + sample_group_b, rng)

    # Planted effects.
    de_type, group_type, da_type = rng.choice(n_cell_types, size=3, replace=False)
    type_log_mean = baseline + activities @ loadings
    de_genes = _expressed_genes(type_log_mean[de_type], effect["n_de_genes"], set(), rng)
    group_genes = _expressed_genes(type_log_mean[group_type], effect["n_group_genes"], set(de_genes), rng)
    de_lfc = _signed_effects(effect["de_log_fold_change"], len(de_genes), rng)
    group_lfc = _signed_effects(effect["group_log_fold_change"], len(group_genes), rng)

    batch_gene = rng.normal(0.0, effect["batch_sd"], size=(n_batches, n_genes))
    batch_library = rng.normal(0.0, effect["batch_sd"] / 2, size=n_batches)

    # Cells.
    base_proportions = rng.dirichlet(np.full(n_cell_types, 4.0)) + 0.05
    cells_per_sample = rng.lognormal(0.0, 0.3, size=n_samples)
    cells_per_sample = np.maximum(5, np.round(cells_per_sample / cells_per_sample.sum() * n_cells)).astype(int)
    cells_per_sample[np.argmax(cells_per_sample)] += n_cells - cells_per_sample.sum()
    cell_sample, cell_type = [], []
    for s in range(n_samples):
        weights = base_proportions.copy()
        if sample_disease[s]:
            weights[da_type] *= effect["da_fold_change"]
        proportions = rng.dirichlet(40.0 * weights / weights.sum())
        cell_type.append(rng.choice(n_cell_types, size=cells_per_sample[s], p=proportions))
        cell_sample.append(np.full(cells_per_sample[s], s))
    order = rng.permutation(n_cells)
    cell_sample, cell_type = np.concatenate(cell_sample)[order], np.concatenate(cell_type)[order]
    cell_batch = sample_batch[cell_sample]
    library = np.exp(rng.normal(np.log(mean_library_size) + batch_library[cell_batch], 0.4))

    chunks = []
    for start in range(0, n_cells, CHUNK_CELLS):
        cells = slice(start, min(start + CHUNK_CELLS, n_cells))
        noise = rng.normal(0.0, 0.35, size=(cells.stop - cells.start, n_programs))
        eta = baseline + (activities[cell_type[cells]] + noise) @ loadings + batch_gene[cell_batch[cells]]
        de_cells = (cell_type[cells] == de_type) & sample_disease[cell_sample[cells]]
        eta[np.ix_(de_cells, de_genes)] += de_lfc
        group_cells = (cell_type[cells] == group_type) & sample_group_b[cell_sample[cells]]
        eta[np.ix_(group_cells, group_genes)] += group_lfc
        eta -= eta.max(axis=1, keepdims=True)
        mean = np.exp(eta)
        mean *= (library[cells] / mean.sum(axis=1))[:, None]
        counts = rng.negative_binomial(inverse_dispersion, inverse_dispersion / (inverse_dispersion + mean))
        empty = np.flatnonzero(counts.sum(axis=1) == 0)
        counts[empty, rng.integers(n_genes, size=len(empty))] = 1
        counts = counts.astype(np.float32)
        chunks.append(sp.csr_matrix(counts) if sparse else counts)
    X = sp.vstack(chunks, format="csr") if sparse else np.vstack(chunks)

    genes = [f"gene_{g:04d}" for g in range(n_genes)]
    types = [f"type_{k}" for k in range(n_cell_types)]
    samples = [f"sample_{s:02d}" for s in range(n_samples)]
    obs = pd.DataFrame({
        "sample": pd.Categorical.from_codes(cell_sample, categories=samples),
        "batch": pd.Categorical.from_codes(cell_batch, categories=[f"batch_{b}" for b in range(n_batches)]),
        "cell_type": pd.Categorical.from_codes(cell_type, categories=types),
        "disease": pd.Categorical.from_codes(sample_disease[cell_sample].astype(int),
                                             categories=["healthy", "disease"]),
        "hidden_group": pd.Categorical.from_codes(sample_group_b[cell_sample].astype(int), categories=["A", "B"]),
        "null_group": pd.Categorical.from_codes(sample_null_y[cell_sample].astype(int), categories=["X", "Y"]),
    }, index=[f"cell_{n:05d}" for n in range(n_cells)])
    adata = anndata.AnnData(X=X, obs=obs, var=pd.DataFrame(index=genes))
    adata.uns["simulation"] = {
        "simulator": "benchmarks/_independent_sim.py (gene programs)",
        "seed": int(seed),
        "preset": preset,
        "de_cell_type": types[de_type],
        "de_covariate": "disease",
        "de_genes": [genes[g] for g in de_genes],
        "de_log_fold_changes": [float(x) for x in de_lfc],
        "grouping_cell_type": types[group_type],
        "grouping_covariate": "hidden_group",
        "grouping_genes": [genes[g] for g in group_genes],
        "grouping_log_fold_changes": [float(x) for x in group_lfc],
        "da_cell_type": types[da_type],
        "da_covariate": "disease",
        "da_fold_change": float(effect["da_fold_change"]),
        "batch_gene_effect_sd": float(effect["batch_sd"]),
        "null_covariate": "null_group",
    }
    return adata


def _balanced_split(strata: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Half the units True, alternating within strata in random order (balanced up to one)."""
    order = np.lexsort((rng.permutation(len(strata)), strata))
    start = rng.integers(2)
    out = np.zeros(len(strata), dtype=bool)
    out[order] = (np.arange(len(strata)) + start) % 2 == 1
    return out


def _expressed_genes(log_mean: np.ndarray, n: int, exclude: set, rng: np.random.Generator) -> np.ndarray:
    """``n`` random genes, sorted, among those above the median log mean and not in ``exclude``."""
    candidates = [g for g in np.flatnonzero(log_mean > np.median(log_mean)) if g not in exclude]
    return np.sort(rng.choice(candidates, size=n, replace=False))


def _signed_effects(magnitude: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """Log fold changes ``+-|N(magnitude, (magnitude / 4)^2)|`` with random signs."""
    return np.abs(rng.normal(magnitude, magnitude / 4, size=n)) * rng.choice([-1.0, 1.0], size=n)
