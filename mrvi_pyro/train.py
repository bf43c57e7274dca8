"""Stochastic variational inference for MrVI.

:func:`train_svi` fits a module (anything with ``model``/``guide`` methods sharing the
:func:`mrvi_pyro.model.model` signature, and torch parameters) on minibatches from a
:class:`mrvi_pyro.data.CellData`. The ELBO is Pyro's ``Trace_ELBO`` used as a differentiable
loss with a plain torch optimiser (Adam with gradient-norm clipping) on the module's own
parameters: no global parameter store (a model or guide that creates ``pyro.param``
parameters is refused before the first step, :func:`check_parameters_owned`). Minibatches are
``subsample`` indices of the ``cells`` plate, so each step's ELBO is an unbiased estimate of the
full training-set ELBO.

The optimiser sees that estimate divided by the number of training cells: the per-cell mean
loss of the minibatch, the scale the reference (scvi-tools) optimises. Adam is invariant to the
scale of the loss, but gradient-norm clipping (``clip_norm=40``) is not: on the full-data
scale the gradient norm is N times larger and every step was clipped. The history records the
share of clipped steps per epoch (``clipped_share``).

The optimiser is torch's fused Adam kernel (:class:`mrvi_pyro.optim.Adam`, the update of
``torch.optim.Adam(fused=True)`` without torch.optim's one-time ``torch._dynamo`` import;
``torch.optim.Adam`` where the kernel is missing) with ``clip_grad_norm_(foreach=True)``: a
hand-written flat-buffer Adam was measured against it and not kept
(``benchmarks/results/optimizer_and_malloc.md``). A parameter without a gradient in a
step (the prior's in the first KL warm-up epoch, where the KL weight is 0) is skipped by Adam: no
weight decay, no moment update. With ``mrvi_pyro.settings.tune_malloc`` the allocator keeps freed
minibatch memory for reuse (:func:`mrvi_pyro._malloc.tune_malloc`; off by default in the library).
Counts read from disk are read ahead (:meth:`mrvi_pyro.data.CellData.read_ahead`).

The learning rate defaults to :func:`default_lr`: the reference's 2e-3 at batch 128 (and
below), scaled by the square root of ``batch_size / 128`` up to batch 256 (Adam's square-root
scaling rule), so that a run at batch 256 follows the course per epoch of one at batch 128 (see
its docstring for the figures).

Inside a ``torch.distributed`` launch the same call trains data-parallel (the hooks are
:class:`mrvi_pyro.distributed.Replicas`: each rank's slice of every global minibatch, one
gradient all-reduce per step, validation losses summed over the ranks); see
:mod:`mrvi_pyro.distributed`.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyro
import scipy.sparse
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from tqdm.auto import tqdm

from ._malloc import tune_malloc_if_enabled
from .checkpoint import TrainingState, data_identity, open_checkpoint
from .data import CellData
from .distributed import Replicas
from .optim import Adam, fused_kernel_available

BASE_LR = 2e-3
"""The reference's learning rate, which :func:`default_lr` gives up to :data:`BASE_BATCH_SIZE`."""
BASE_BATCH_SIZE = 128
"""The batch size at which the default learning rate is the reference's (scvi-tools' ``train()`` default)."""
MAX_SCALED_BATCH_SIZE = 256
"""Above this batch size :func:`default_lr` stops growing (the rule is measured up to here)."""


def default_lr(batch_size: int) -> float:
    """Learning rate used when ``lr=None``: ``2e-3 * sqrt(b / 128)`` with ``b`` the batch size
    clipped to [128, 256].

    At batch 128 (the default) and below, this is the reference's 2e-3. Between 128 and 256 it
    follows the square-root scaling rule for Adam (Malladi et al., 2022, "On the SDEs and
    scaling rules for adaptive gradient algorithms"): a step on a batch twice as large has
    sqrt(2) times the signal-to-noise ratio and there are half as many steps per epoch, so
    raising the rate by sqrt(2) keeps the course of training per epoch. The reference keeps 2e-3
    at every batch size, so at batch 256 it learns weak sample effects more slowly per epoch
    than at batch 128. On the weak-effect benchmark (``benchmarks/README.md``, stop 20: 10 seeds,
    batch 256, 100 epochs) the rule separated the disease-driven sample pairs in 5 of 10 seeds
    against 2 of 10 with 2e-3, and the hidden grouping in 4 of 10 against 5 of 10 (as often, within
    the seed-to-seed spread), with a validation loss within 0.3 nats per cell of 2e-3's; on a
    second simulator (3 seeds of 6,000 cells) it was not better than 2e-3. Above
    256 the rate stays at 256's (2.83e-3): at batch 1024 the scaled rate (5.7e-3) ended 7 nats per
    cell worse on validation than 2e-3 after 100 epochs on the one run measured. Pass ``lr`` to choose
    the rate yourself (``lr=2e-3`` is the reference's setting at every batch size).

    With ``lr=None`` :func:`train_svi` uses this rate after the KL warm-up only: during its
    ``n_epochs_kl_warmup`` epochs it trains at the reference's 2e-3. Early in training the batch
    goes through the sample effects before the decoder's nuisance path takes it over; started at
    the scaled rate, that detour lasted 30-60 epochs on 12,000 cells (batch share of the sample
    effects above 0.95 until epoch 30-40 on two seeds), against about 25 at 2e-3, and the
    hidden grouping of the weak benchmark was then missed. With the warm-up at 2e-3 it was found
    in 11 of 20 seeds (the reference: 11; the scaled rate throughout: 8), the disease-driven pairs
    in 7 of 20 (the reference: 3; the scaled rate throughout: 9) (``benchmarks/README.md``, stop 23).
    Those figures are architecture 2's; with architecture 3 (the default since stop 30), 2e-3
    throughout at batch 256 was not better than this rule on seeds 0-6 (stop 30).
    """
    clipped = min(max(int(batch_size), BASE_BATCH_SIZE), MAX_SCALED_BATCH_SIZE)
    return BASE_LR * float(np.sqrt(clipped / BASE_BATCH_SIZE))


class TrainingDivergedError(FloatingPointError):
    """The loss or its gradient became NaN or infinite; training stopped before any update."""


@dataclass(frozen=True)
class TrainingResult:
    """What a training run learned about itself (the parameters live in the module).

    Attributes
    ----------
    history
        One row per epoch: ``epoch``, ``kl_weight``, ``lr`` (Adam's learning rate),
        ``elbo_train`` and ``elbo_validation`` (the
        negative ELBO per cell, lower is better; validation at full KL weight),
        ``clipped_share`` (share of steps whose gradient norm exceeded ``clip_norm``),
        ``sample_spread`` (size of the learned sample effects, :func:`sample_spread`),
        ``batch_share`` and ``batch_share_chance`` (the share of those effects that follows the
        samples' batch, :func:`sample_batch_share`, and its chance level; with a nuisance key of
        two or more levels and three or more samples), ``seconds``.
    train_indices, validation_indices
        The split of the cells.
    stopped_early
        Whether early stopping ended the run.
    """

    history: pd.DataFrame
    train_indices: np.ndarray
    validation_indices: np.ndarray
    stopped_early: bool


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available else CPU; ``"cpu"``; ``"cuda"`` (error if absent)."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but CUDA is not available; use device='cpu'.")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"Unknown device {device!r}; use 'auto', 'cpu' or 'cuda'.")
    return torch.device(device)


def make_adam(params, **kwargs):
    """Adam with the fused kernel where this torch build has it (same maths, fewer kernels).

    That is :class:`mrvi_pyro.optim.Adam` (the kernel of ``torch.optim.Adam(fused=True)``,
    called without torch.optim and so without its one-time ``torch._dynamo`` import: ~1 s and
    ~70 MB per process); otherwise ``torch.optim.Adam``, fused where it can be."""
    params = list(params)
    if fused_kernel_available(params):
        return Adam(params, **kwargs)
    try:
        return torch.optim.Adam(params, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, **kwargs)


def zero_missing_gradients(params) -> None:
    """Give every parameter without a gradient a zero one, so that Adam counts the step for it
    and weight decay moves it (``warmup_zero_grads``)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def split_indices(n_obs: int, train_size: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random train/validation split; ``train_size=1`` keeps every cell for training."""
    if not 0 < train_size <= 1:
        raise ValueError(f"train_size must be in (0, 1], got {train_size}.")
    permutation = rng.permutation(n_obs)
    n_train = n_obs if train_size == 1 else int(np.clip(round(train_size * n_obs), 1, n_obs - 1))
    return np.sort(permutation[:n_train]), np.sort(permutation[n_train:])


def sample_balance_weights(sample_index: np.ndarray, n_samples: int) -> np.ndarray:
    """Per-cell weights ``(N / S) / n_s`` so that every sample weighs the same in total and the
    weights still sum to N (``scale_observations``)."""
    counts = np.bincount(sample_index, minlength=n_samples).astype(np.float64)
    present = counts > 0
    weights = np.zeros(n_samples)
    weights[present] = len(sample_index) / present.sum() / counts[present]
    return weights[sample_index].astype(np.float32)


def _fork_devices(device: torch.device) -> list[int]:
    """The CUDA devices whose random state ``torch.random.fork_rng`` must fork for ``device``."""
    return [device.index or 0] if device.type == "cuda" else []


def _call_args(batch: dict) -> tuple:
    return batch["x"], batch["sample_index"], batch["batch_index"], batch["label_index"]


SPREAD_PROBE_CELLS = 256


def probe_counterfactuals(module, batch: dict) -> torch.Tensor | None:
    """(n, S, L) counterfactual ``z`` of the cells of ``batch`` under every sample (posterior
    mean ``u``, evaluation mode, no gradients; the module's mode is restored). None for a module
    without ``encode_u``/``counterfactual_z`` or with fewer than two samples. What
    :func:`sample_spread` and :func:`sample_batch_share` summarise after every epoch (computed
    once for both)."""
    if not (hasattr(module, "encode_u") and hasattr(module, "counterfactual_z")):
        return None
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            z = module.counterfactual_z(module.encode_u(batch["x"], batch["sample_index"])[0])
    finally:
        module.train(was_training)
    return z if z.ndim == 3 and z.shape[-2] >= 2 else None


def sample_spread(module, batch: dict, z: torch.Tensor | None = None) -> float | None:
    """Root mean square distance between the counterfactual ``z`` of one cell under two samples,
    averaged over the cells of ``batch`` (posterior mean ``u``, evaluation mode, no gradients).

    It is the size of the sample effects the model has learned: near 0 when ``z`` ignores the
    sample, growing while the model learns them. Weak effects are learned late (they can take
    100+ epochs on 12,000 cells, ``benchmarks/dynamics.py``), so a spread still growing at the
    last epoch says that the sample-level results (distances, DE, stratification) have not
    settled. ``z``: :func:`probe_counterfactuals` of ``batch`` when already computed. None for a
    module without ``encode_u``/``counterfactual_z``.
    """
    z = probe_counterfactuals(module, batch) if z is None else z
    if z is None:
        return None
    n_samples = z.shape[-2]
    # mean over ordered pairs s != s' of |z_s - z_s'|^2 = 2 S / (S - 1) x mean_s |z_s - mean z|^2
    squared = (z - z.mean(-2, keepdim=True)).pow(2).sum(-1).mean(-1) * (2 * n_samples / (n_samples - 1))
    return float(squared.sqrt().mean())


def sample_batch_composition(data: CellData) -> np.ndarray | None:
    """(S, B) share of each sample's cells in each nuisance level (batch); None with fewer than
    two levels or three samples, where the batch share of the sample effects is not defined."""
    n_samples, n_batches = data.registry.n_samples, data.registry.n_batches
    if n_batches < 2 or n_samples < 3:
        return None
    counts = np.zeros((n_samples, n_batches))
    np.add.at(counts, (np.asarray(data.sample_index), np.asarray(data.batch_index)), 1.0)
    return counts / np.maximum(counts.sum(1, keepdims=True), 1.0)


def sample_batch_share(module, batch: dict, projection: torch.Tensor, z: torch.Tensor | None = None) -> float | None:
    """Share of the sample effects of the cells of ``batch`` that follows the samples' batch.

    Each cell's counterfactual ``z`` under every sample (posterior mean ``u``, evaluation mode,
    no gradients) is centred over the samples; the sum of squares that ``projection`` (the
    :func:`mrvi_pyro.explore.centred_projection` of :func:`sample_batch_composition`) keeps is
    divided by the total, pooled over the cells: what
    :meth:`mrvi_pyro.MRVI.get_sample_effect_shares` reports for the batch. Batch belongs in the
    decoder's nuisance path; early in training it often passes through the sample effects first,
    and the sample distances then group samples by batch. Its chance level (effects unrelated to
    batch) is ``rank / (S - 1)``. ``z``: :func:`probe_counterfactuals` of ``batch`` when already
    computed. None for a module without ``encode_u``/``counterfactual_z``.
    """
    from .explore import effect_sums

    z = probe_counterfactuals(module, batch) if z is None else z
    if z is None or z.shape[-2] != projection.shape[-1]:
        return None
    total, explained = effect_sums(z.double(), projection.unsqueeze(0).to(z.device))
    total = float(total.sum())
    return float(explained.sum()) / total if total > 0 else None


def _last_two_windows(history: pd.DataFrame, column: str, share: float,
                      min_epochs: int) -> tuple[float, float, int] | None:
    """``(before, last, window)``: the means of ``column`` over the last ``share`` of the epochs
    (a window of at least ``min_epochs``) and over the window before it. None without the
    column, with fewer than two windows of epochs, or with a non-finite mean."""
    if column not in history:
        return None
    values = history[column].to_numpy(dtype=float)
    window = max(min_epochs, int(round(share * len(values))))
    if len(values) < 2 * window:
        return None
    before, last = values[-2 * window:-window].mean(), values[-window:].mean()
    if not (np.isfinite(before) and np.isfinite(last)):
        return None
    return float(before), float(last), window


def spread_still_growing(history: pd.DataFrame, *, share: float = 0.1, min_epochs: int = 5,
                         growth: float = 0.1) -> tuple[float, int] | None:
    """``(relative growth, window)`` of ``sample_spread`` over the last ``share`` of the epochs
    (a window of at least ``min_epochs``): the mean over that window against the mean over the
    window before it. Returned when the growth exceeds ``growth``; None otherwise, or when the
    history is shorter than two windows or has no spread. The spread moves by a few percent from
    epoch to epoch around a settled value, so the two windows' means are compared rather than two
    single epochs."""
    windows = _last_two_windows(history, "sample_spread", share, min_epochs)
    if windows is None:
        return None
    before, last, window = windows
    if before <= 0:
        return None
    relative = float(last / before - 1.0)
    return (relative, window) if relative > growth else None


def batch_share_still_falling(history: pd.DataFrame, *, share: float = 0.1, min_epochs: int = 5,
                              drop: float = 0.1, above: float = 2.0) -> tuple[float, float, float, int] | None:
    """``(last, before, chance, window)`` when the batch share of the sample effects
    (``batch_share``, :func:`sample_batch_share`) was still falling at the end of training.

    ``last`` and ``before`` are its means over the last ``share`` of the epochs (a window of at
    least ``min_epochs``) and the window before; returned when ``last`` is more than ``drop``
    below ``before`` and more than ``above`` times ``chance`` (``batch_share_chance``). None
    otherwise, or when the history is shorter than two windows or has no batch share.

    Early in training the batch often passes through the sample effects before the decoder's
    nuisance path takes it over; a share that is high and still falling says that move has not
    finished (the sample distances then still group samples by batch, and a weak effect can be
    hidden behind it). A share that stays high without falling is not flagged: that is what a
    design whose sample covariates are confounded with batch gives.
    """
    windows = _last_two_windows(history, "batch_share", share, min_epochs)
    if windows is None or "batch_share_chance" not in history:
        return None
    before, last, window = windows
    chance = float(history["batch_share_chance"].to_numpy(dtype=float)[-1])
    if not np.isfinite(chance):
        return None
    if last < (1.0 - drop) * before and last > above * chance:
        return float(last), float(before), chance, window
    return None


def check_parameters_owned(module, data: CellData, cells: np.ndarray, n_obs: int, device) -> None:
    """``ValueError`` when the model or guide uses Pyro parameters that ``module`` does not own.

    :func:`train_svi` optimises ``module.parameters()`` only, so a ``pyro.param`` created inside
    the guide or the model (kept in Pyro's global parameter store) would silently stay at its
    initial value, and would not be saved with the model either. Both programs are run once on
    ``cells`` under ``poutine.trace``; every ``param`` site must be a parameter of the module
    (as the parameters of a :class:`pyro.nn.PyroModule` are). The run uses evaluation mode, no
    gradients and a forked random state, so training is unchanged by it.
    """
    owned = {id(p) for p in module.parameters()}
    was_training = module.training
    module.eval()
    try:
        with torch.random.fork_rng(devices=_fork_devices(device)), torch.no_grad(), pyro.validation_enabled(False):
            args = _call_args(data.batch(cells, device))
            kwargs = {"n_obs": n_obs, "subsample": torch.arange(len(cells), device=device)}
            guide_trace = poutine.trace(module.guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(module.model, trace=guide_trace)).get_trace(*args, **kwargs)
    finally:
        module.train(was_training)
    store = dict(pyro.get_param_store().named_parameters())
    foreign = {
        program: sorted(name for name, site in trace.nodes.items()
                        if site["type"] == "param" and id(store.get(name)) not in owned)
        for program, trace in (("guide", guide_trace), ("model", model_trace))
    }
    foreign = {program: names for program, names in foreign.items() if names}
    if foreign:
        found = "; ".join(f"the {program} creates {names}" for program, names in foreign.items())
        raise ValueError(
            f"Pyro parameters that the module does not own: {found}. Training optimises the module's "
            "parameters only, so these would keep their initial values (and would not be saved). Make "
            "each one a torch.nn.Parameter of the module instead of a pyro.param: subclass MrVIModule, "
            "create it in __init__ (self.name = nn.Parameter(...)) and read module.name in the program "
            "(a pyro.nn.PyroModule with PyroParam attributes works too); use the subclass through "
            "MRVI._module_cls."
        )


def evaluate_loss(module, data: CellData, indices: np.ndarray, *, batch_size: int, device, kl_weight=1.0,
                  cell_weights: np.ndarray | None = None, replicas: Replicas | None = None) -> float:
    """Negative ELBO per cell over ``indices`` (one posterior draw per cell, no gradients).

    With ``replicas`` (data-parallel training) each rank evaluates its share of every chunk and
    the sum is all-reduced, so every rank returns the single-process value.
    """
    elbo = Trace_ELBO()
    total = 0.0
    was_training = module.training
    module.eval()
    with torch.no_grad():
        chunks = _minibatches(indices, batch_size, replicas)
        for (chunk, _, share, draws), batch in zip(chunks, data.read_ahead([c[0] for c in chunks], device)):
            scale = None if cell_weights is None else torch.as_tensor(cell_weights[chunk], device=device)
            with draws:
                total += float(share > 0) * float(elbo.differentiable_loss(
                    module.model, module.guide, *_call_args(batch), kl_weight=kl_weight, cell_scale=scale
                ))
    module.train(was_training)
    if replicas is not None:
        total = float(replicas.all_reduce_sum([total])[0])
    return total / max(len(indices), 1)


def elbo_per_cell(module, data: CellData, indices: np.ndarray | None = None, *, batch_size: int = 1024,
                  seed: int = 0) -> np.ndarray:
    """The ELBO of each cell (n,), higher is better: ``log p(x, u, z) - log q(u, z | x)`` at one
    posterior draw per cell (evaluation mode, the full KL weight, no gradients), the per-cell
    terms of what :func:`evaluate_loss` averages (its negative). Draws come from torch's random
    state seeded with ``seed`` inside a fork, so the caller's random state is left alone."""
    return _per_cell_log_densities(module, data, indices, batch_size=batch_size, seed=seed, observed_only=False)


def log_likelihood_per_cell(module, data: CellData, indices: np.ndarray | None = None, *, batch_size: int = 1024,
                            seed: int = 0) -> np.ndarray:
    """``log p(x | u, z)`` of each cell (n,): the log-density of the model's observed sites (the
    counts) at one posterior draw of the latent variables, the same draw as
    :func:`elbo_per_cell` with the same ``seed``. Its negative is scvi-tools'
    ``reconstruction_loss`` (:meth:`mrvi_pyro.MRVI.get_reconstruction_error`)."""
    return _per_cell_log_densities(module, data, indices, batch_size=batch_size, seed=seed, observed_only=True)


@contextlib.contextmanager
def _seeded_evaluation(module, seed: int):
    """The block runs in evaluation mode, without gradients or Pyro's validation, on torch's
    random state seeded with ``seed`` inside a fork (the caller's state is left alone); yields
    the module's device. The module's mode is restored afterwards."""
    device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=_fork_devices(device)), pyro.validation_enabled(False):
            torch.manual_seed(seed)
            yield device
    finally:
        module.train(was_training)


def _per_cell_log_densities(module, data: CellData, indices: np.ndarray | None, *, batch_size: int, seed: int,
                            observed_only: bool) -> np.ndarray:
    """Per-cell sum of the log-densities of the model's sites minus the guide's (or, with
    ``observed_only``, of the model's observed sites only), at one seeded posterior draw."""
    indices = np.arange(data.n_obs) if indices is None else np.asarray(indices, dtype=np.int64)
    out = []
    with _seeded_evaluation(module, seed) as device:
        for chunk, batch in data.iter_batches(indices, batch_size, device):
            args = _call_args(batch)
            guide_trace = poutine.trace(module.guide).get_trace(*args)
            model_trace = poutine.trace(poutine.replay(module.model, trace=guide_trace)).get_trace(*args)
            total = torch.zeros(len(chunk), dtype=torch.float64, device=device)
            traces = ((model_trace, 1.0),) if observed_only else ((model_trace, 1.0), (guide_trace, -1.0))
            for trace, sign in traces:
                trace.compute_log_prob()
                for site in trace.nodes.values():
                    if site["type"] != "sample" or "log_prob" not in site:
                        continue
                    if observed_only and not site["is_observed"]:
                        continue
                    log_prob = site["log_prob"]
                    if log_prob.dim() == 0:  # a plate's subsample site, or a fully masked one
                        continue
                    if log_prob.shape != (len(chunk),):
                        raise ValueError(f"Site {site['name']!r} has per-cell log-densities of shape "
                                         f"{tuple(log_prob.shape)}; get_elbo and get_reconstruction_error "
                                         "need one value per cell (declare the site's event dimensions "
                                         "with .to_event()).")
                    total += sign * log_prob.double()
            out.append(total.cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def iter_posterior_predictive(module, data: CellData, indices: np.ndarray | None = None, *, n_samples: int = 1,
                              batch_level: int | None = None, batch_size: int = 256, seed: int = 0):
    """Yield ``(chunk, draw, batch, counts)``: for each chunk of cells, ``n_samples`` draws of
    their counts (n, G) from the posterior predictive distribution, in that order.

    Each draw runs the guide on the observed cells (``u`` and ``z`` from ``q(u, z | x, s)``,
    evaluation mode) and then the model, replayed on those latent values with its observed
    sites unconditioned (``poutine.uncondition``), so the count site is sampled from the
    likelihood instead of being fixed to the data. Whatever the model's likelihood (a variant's
    too), its own ``sample`` draws the counts. With ``batch_level`` the model (not the guide)
    sees that nuisance code for every cell: counts as if the cells had been measured in that
    batch. Draws come from torch's random state seeded with ``seed`` inside a fork, so the
    caller's random state is left alone.
    """
    indices = np.arange(data.n_obs) if indices is None else np.asarray(indices, dtype=np.int64)
    with _seeded_evaluation(module, seed) as device:
        for chunk, batch in data.iter_batches(indices, batch_size, device):
            args = _call_args(batch)
            model_args = args if batch_level is None else (
                args[0], args[1], torch.full_like(args[2], batch_level), *args[3:])
            for k in range(n_samples):
                guide_trace = poutine.trace(module.guide).get_trace(*args)
                model_trace = poutine.trace(poutine.uncondition(
                    poutine.replay(module.model, trace=guide_trace))).get_trace(*model_args)
                sites = [site for site in model_trace.nodes.values()
                         if site["type"] == "sample" and site["infer"].get("was_observed")]
                if len(sites) != 1 or tuple(sites[0]["value"].shape) != tuple(args[0].shape):
                    raise ValueError(
                        "posterior_predictive_sample needs the model to have exactly one observed site, the "
                        f"counts, of shape {tuple(args[0].shape)} (cells x genes); this model has "
                        + (", ".join(f"{site['name']!r} {tuple(site['value'].shape)}" for site in sites)
                           or "none") + "."
                    )
                yield chunk, k, batch, sites[0]["value"]


def posterior_predictive_counts(module, data: CellData, indices: np.ndarray | None = None, *, n_samples: int = 1,
                                batch_level: int | None = None, genes: slice | np.ndarray = slice(None),
                                batch_size: int = 256, seed: int = 0, sparse: bool = False) -> list:
    """Counts drawn from the posterior predictive distribution (:func:`iter_posterior_predictive`),
    one array (n, G') per draw, float32, of the columns ``genes``; with ``sparse``, a
    ``scipy.sparse.csr_matrix`` built chunk by chunk, so the dense counts of all cells are never
    held at once."""
    draws: list[list] = [[] for _ in range(n_samples)]
    for _, k, _, value in iter_posterior_predictive(module, data, indices, n_samples=n_samples, batch_level=batch_level,
                                                    batch_size=batch_size, seed=seed):
        counts = value[:, genes].float().cpu().numpy()
        draws[k].append(scipy.sparse.csr_matrix(counts) if sparse else counts)
    width = len(data.registry.var_names) if isinstance(genes, slice) else len(genes)
    if sparse:
        return [scipy.sparse.vstack(d, format="csr") if d else scipy.sparse.csr_matrix((0, width), dtype=np.float32)
                for d in draws]
    return [np.concatenate(d) if d else np.zeros((0, width), dtype=np.float32) for d in draws]


def train_svi(
    module,
    data: CellData,
    *,
    max_epochs: int,
    batch_size: int = 128,
    train_size: float = 0.9,
    lr: float | None = None,
    weight_decay: float = 1e-8,
    eps: float = 1e-8,
    clip_norm: float = 40.0,
    n_epochs_kl_warmup: int = 20,
    warmup_zero_grads: bool = False,
    early_stopping: bool = False,
    early_stopping_patience: int = 15,
    early_stopping_min_delta: float = 0.0,
    scale_observations: bool = False,
    seed: int = 0,
    device: str | torch.device = "auto",
    progress_bar: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_identity: dict | None = None,
) -> TrainingResult:
    """Fit ``module`` by SVI.

    Parameters
    ----------
    module
        A :class:`mrvi_pyro.module.MrVIModule` or a variant with the same programs.
    data
        Minibatch source.
    max_epochs
        Number of passes over the training cells.
    batch_size
        Cells per step. In data-parallel training (inside ``torchrun`` or
        :func:`mrvi_pyro.distributed.launch`) this is the *global* minibatch: each of the W ranks
        takes ``batch_size / W`` of its cells (W must divide it), and the run reproduces one
        process with this ``batch_size`` (see :mod:`mrvi_pyro.distributed`).
    train_size
        Share of cells used for training; the rest is the validation set.
    lr
        Adam's learning rate; None (default): the reference's 2e-3 during the KL warm-up, then
        :func:`default_lr` of ``batch_size`` (2e-3 at batch 128, 2.83e-3 at 256 and above). The
        rate used is the ``lr`` column of the history.
    weight_decay, eps, clip_norm
        Adam settings and the gradient-norm clip (on the gradient of the per-cell mean loss, as
        the reference's ``max_norm``).
    n_epochs_kl_warmup
        The KL weight rises linearly from 0 at epoch 0 to 1 at this epoch (0: no warm-up).
    warmup_zero_grads
        While the KL weight is 0 (the first warm-up epoch) the ``u`` and ``z`` sites are masked,
        so the prior's parameters (``u_prior``, ``z_u_log_scale``) get no gradient and Adam skips
        them. True: they get a zero gradient instead, as in scvi-tools, whose loss multiplies
        those terms by 0; Adam then counts the steps for them and weight decay moves them. False
        (default): skipped. Neither is the better default across the benchmarks' simulators
        (README, "Differences from scvi-tools").
    early_stopping, early_stopping_patience, early_stopping_min_delta
        Stop when the validation loss (training loss without a validation set) has not
        improved by ``min_delta`` for ``patience`` epochs.
    scale_observations
        Weight each cell by ``(N / S) / n_s`` so samples weigh equally.
    seed
        Seeds the split, the minibatch order and every Monte Carlo draw; the global RNG state
        of the caller is restored afterwards.
    device
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    progress_bar
        Show a tqdm bar with the current losses.
    checkpoint_dir
        Directory of a checkpoint written atomically after every epoch (:mod:`mrvi_pyro.checkpoint`).
        If it already holds one, training resumes after its last complete epoch, exactly where
        the interrupted run was (parameters, optimiser, random states, minibatch order,
        history, early stopping), and continues to ``max_epochs``. A checkpoint of another
        run (training arguments other than ``max_epochs`` and ``progress_bar``, the module's
        parameters or ``checkpoint_identity``, the data, or in data-parallel training the
        number of ranks) is refused, as is a non-empty directory that is not a checkpoint. In
        data-parallel training rank 0 alone reads and writes it, with the random states of every
        rank, and every rank resumes from it (:class:`mrvi_pyro.checkpoint.RankZeroCheckpoint`).
        None (default): no checkpoint, no cost.
    checkpoint_identity
        More JSON-able facts a checkpoint must match to be resumed (the facade passes the
        model's configuration).

    Raises
    ------
    TrainingDivergedError
        When the loss or gradient becomes non-finite (no update is applied with it).
    ValueError
        For an invalid argument, or a ``checkpoint_dir`` that cannot be used; when the model or
        guide creates Pyro parameters (``pyro.param``) that are not parameters of ``module``
        (:func:`check_parameters_owned`): those would never be optimised; in data-parallel
        training also (on every rank) when the ranks disagree on the data, the model or the
        arguments, or the world size does not divide ``batch_size``.
    """

    def number(v):
        return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and not np.isnan(v)

    def integer(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    rules = {  # argument: (value, valid, what it must be); checked before anything is touched
        "max_epochs": (max_epochs, integer(max_epochs) and max_epochs >= 1, "an integer >= 1"),
        "batch_size": (batch_size, integer(batch_size) and batch_size >= 1, "an integer >= 1"),
        "train_size": (train_size, number(train_size) and 0 < train_size <= 1, "a number in (0, 1]"),
        "lr": (lr, lr is None or (number(lr) and 0 < lr < np.inf), "None or a positive finite number"),
        "weight_decay": (weight_decay, number(weight_decay) and 0 <= weight_decay < np.inf, "a finite number >= 0"),
        "eps": (eps, number(eps) and 0 < eps < np.inf, "a positive finite number"),
        "clip_norm": (clip_norm, number(clip_norm) and clip_norm > 0, "a positive number (inf: no clipping)"),
        "n_epochs_kl_warmup": (n_epochs_kl_warmup, integer(n_epochs_kl_warmup) and n_epochs_kl_warmup >= 0,
                               "an integer >= 0"),
        "warmup_zero_grads": (warmup_zero_grads, isinstance(warmup_zero_grads, (bool, np.bool_)), "True or False"),
        "early_stopping_patience": (early_stopping_patience, integer(early_stopping_patience)
                                    and early_stopping_patience >= 1, "an integer >= 1"),
        "early_stopping_min_delta": (early_stopping_min_delta, number(early_stopping_min_delta)
                                     and 0 <= early_stopping_min_delta < np.inf, "a finite number >= 0"),
    }
    for name, (value, valid, rule) in rules.items():
        if not valid:
            raise ValueError(f"{name} must be {rule}; got {value!r}.")
    # lr=None: the reference's rate while the KL weight warms up, then the scaled rate (see
    # default_lr); an lr passed is used at every epoch.
    warmup_lr = BASE_LR if lr is None and default_lr(batch_size) != BASE_LR and n_epochs_kl_warmup > 0 else None
    lr = default_lr(batch_size) if lr is None else lr
    device = resolve_device(device)
    replicas = Replicas.current()  # None in a single process
    if replicas is not None:
        replicas.check_training(module, data, {
            "max_epochs": int(max_epochs), "batch_size": int(batch_size), "train_size": float(train_size),
            "lr": float(lr), "weight_decay": float(weight_decay), "eps": float(eps), "clip_norm": float(clip_norm),
            "n_epochs_kl_warmup": int(n_epochs_kl_warmup), "warmup_zero_grads": bool(warmup_zero_grads),
            "early_stopping": bool(early_stopping),
            "early_stopping_patience": int(early_stopping_patience),
            "early_stopping_min_delta": float(early_stopping_min_delta),
            "scale_observations": bool(scale_observations), "seed": int(seed),
            "checkpoint": checkpoint_dir is not None, "same_draws": replicas.same_draws,
        })
        device = replicas.device(device)
        progress_bar = progress_bar and replicas.is_main
    settings = dict(  # what the loop needs besides the split; with train_size, what a resume must match
        batch_size=batch_size, lr=lr, weight_decay=weight_decay, eps=eps, clip_norm=clip_norm,
        n_epochs_kl_warmup=n_epochs_kl_warmup, early_stopping=early_stopping,
        early_stopping_patience=early_stopping_patience, early_stopping_min_delta=early_stopping_min_delta,
        scale_observations=scale_observations, seed=seed,
    )
    if warmup_lr is not None:
        settings["warmup_lr"] = warmup_lr
    if warmup_zero_grads:  # only when set, so that checkpoints written before the option still resume
        settings["warmup_zero_grads"] = True
    checkpoint, resume = None, None
    if checkpoint_dir is not None:
        ranks = {} if replicas is None else {"world_size": replicas.world_size, "same_draws": replicas.same_draws}
        identity = {
            "training": {**settings, "train_size": train_size, "device": device.type, **ranks},
            "parameters": {k: list(v.shape) for k, v in module.state_dict().items()},
            "data": data_identity(data),
            **(checkpoint_identity or {}),
        }
        checkpoint, resume = open_checkpoint(checkpoint_dir, identity, max_epochs, replicas)
    rng = np.random.default_rng(seed)
    train_idx, val_idx = split_indices(len(data), train_size, rng)
    if resume is not None:
        module.load_state_dict(resume.module)
        train_idx, val_idx = resume.train_indices, resume.validation_indices
    tune_malloc_if_enabled()
    module.to(device)
    check_parameters_owned(module, data, train_idx[: min(batch_size, 16)], len(train_idx), device)
    params = [p for p in module.parameters() if p.requires_grad]
    if replicas is not None:
        replicas.broadcast_parameters(params)
    return _train_loop(
        module, data, params, train_idx, val_idx, rng, max_epochs=max_epochs, **settings,
        device=device, progress_bar=progress_bar, checkpoint=checkpoint, resume=resume, replicas=replicas,
    )


@contextlib.contextmanager
def _global_random_states(resume: TrainingState | None):
    """Nothing without ``resume``; with it, the caller's numpy and Python random states are
    kept aside for the block (which sets the checkpoint's) and given back afterwards."""
    if resume is None:
        yield
        return
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def _slowed_by_threads(module, elbo, batch: dict, n_obs: int, kl_weight: float) -> bool:
    """Whether torch's threads make a training step slower than one thread would (and a warning
    said so): :func:`mrvi_pyro._threads.warn_if_slowed` on the loss of at most 128 of the
    minibatch's cells, without gradients; the random state and the thread count are kept."""
    from ._threads import SLOWDOWN_RATIO, warn_if_slowed

    part = {k: v[:128] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    n = len(part["x"])
    if n == 0:  # a data-parallel rank without cells in this step: check at a later epoch
        return False

    def loss():
        return elbo.differentiable_loss(module.model, module.guide, *_call_args(part), n_obs=n_obs,
                                        subsample=torch.arange(n, device=part["x"].device), kl_weight=kl_weight)

    ratio = warn_if_slowed("Training", loss, stacklevel=5)
    return ratio is not None and ratio >= SLOWDOWN_RATIO


def _minibatches(order: np.ndarray, batch_size: int, replicas: Replicas | None) -> list[tuple]:
    """The steps over ``order``: ``(entries, global batch size, share of the loss, draws context)``.

    In a single process the entries are the consecutive ``batch_size`` slices of ``order``; in
    data-parallel training each is this rank's slice of them (:meth:`Replicas.shard`).
    """
    steps = []
    for start in range(0, len(order), batch_size):
        pos = order[start : start + batch_size]
        local, share, draws = (pos, 1.0, contextlib.nullcontext()) if replicas is None else replicas.shard(pos)
        steps.append((local, len(pos), share, draws))
    return steps


def _train_loop(module, data, params, train_idx, val_idx, rng, *, max_epochs, batch_size, lr, weight_decay,
                eps, clip_norm, n_epochs_kl_warmup, early_stopping, early_stopping_patience,
                early_stopping_min_delta, scale_observations, seed, device, progress_bar, checkpoint,
                resume, replicas=None, warmup_lr=None, warmup_zero_grads=False) -> "TrainingResult":
    n_train = len(train_idx)
    weights = (
        sample_balance_weights(data.sample_index, data.registry.n_samples) if scale_observations else None
    )
    optimizer = make_adam(params, lr=lr, eps=eps, weight_decay=weight_decay)
    elbo = Trace_ELBO()
    # A fixed set of cells on which the size of the learned sample effects is measured after
    # every epoch (``sample_spread``): validation cells when there are any, evenly spaced over
    # them (the indices are sorted, so their first ones would all come from the start of the
    # data, often a few samples only); no random draw, so training is unchanged.
    pool = val_idx if len(val_idx) else train_idx
    probe_cells = pool[np.unique(np.linspace(0, len(pool) - 1, min(SPREAD_PROBE_CELLS, len(pool))).astype(np.int64))]
    (probe,) = list(data.read_ahead([probe_cells], device)) if len(probe_cells) else (None,)
    composition = sample_batch_composition(data)
    batch_projection, batch_chance = None, None
    if composition is not None:
        from .explore import centred_projection, centred_rank

        batch_projection = torch.as_tensor(centred_projection(composition), dtype=torch.float64, device=device)
        batch_chance = centred_rank(composition) / (len(composition) - 1)
    rows, best, since_best, stopped, first = [], np.inf, 0, False, 0
    with (torch.random.fork_rng(devices=_fork_devices(device)), _global_random_states(resume),
          pyro.validation_enabled(False)):
        if resume is None:
            if replicas is None:
                torch.manual_seed(seed)
            else:
                replicas.seed(seed)
        else:
            optimizer.load_state_dict(resume.optimizer)
            resume.restore_random_states(rng, device)
            rows, best, since_best = [dict(row) for row in resume.rows], resume.best, resume.since_best
            stopped, first = resume.stopped_early, resume.epoch
        bar = tqdm(range(first, max_epochs if not stopped else first), initial=first, total=max_epochs,
                   desc="Training", unit="epoch", disable=not progress_bar, leave=False)
        slowed = device.type != "cpu"  # torch's CPU threads slowing the steps: checked on CPU only
        for epoch in bar:
            start = time.perf_counter()
            kl_weight = min(1.0, epoch / n_epochs_kl_warmup) if n_epochs_kl_warmup > 0 else 1.0
            epoch_lr = warmup_lr if warmup_lr is not None and epoch < n_epochs_kl_warmup else lr
            optimizer.param_groups[0]["lr"] = float(epoch_lr)
            module.train()
            positions = rng.permutation(n_train)
            epoch_loss, n_clipped, n_steps = 0.0, torch.zeros((), device=device), 0
            minibatches = _minibatches(positions, batch_size, replicas)
            reads = data.read_ahead([train_idx[pos] for pos, *_ in minibatches], device)  # next one read meanwhile
            for number, ((pos, n_batch, share, draws), batch) in enumerate(zip(minibatches, reads)):
                cells = train_idx[pos]
                scale = None if weights is None else torch.as_tensor(weights[cells], device=device)
                if number == 0 and not slowed:
                    slowed = _slowed_by_threads(module, elbo, batch, n_train, kl_weight)
                with draws:
                    loss = elbo.differentiable_loss(
                        module.model, module.guide, *_call_args(batch), n_obs=n_train,
                        subsample=torch.as_tensor(pos, device=device), kl_weight=kl_weight, cell_scale=scale,
                    ) / n_train * share  # per-cell mean of the (global) minibatch
                if replicas is not None and not torch.isfinite(loss.detach()):
                    loss = loss * torch.nan  # every rank then sees a non-finite gradient and stops
                elif not torch.isfinite(loss.detach()):
                    raise TrainingDivergedError(
                        f"The loss became {loss.detach().item()} at epoch {epoch} (step {number}); "
                        "training stopped and the parameters keep their last finite values. "
                        "Try a lower learning rate (e.g. lr=5e-4), a smaller clip_norm, or check "
                        "that the counts are raw integers."
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if replicas is not None:
                    replicas.all_reduce_gradients(params)
                if warmup_zero_grads and kl_weight == 0:
                    zero_missing_gradients(params)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_norm, foreach=True)
                if not torch.isfinite(grad_norm):
                    raise TrainingDivergedError(
                        f"The {'loss or ' if replicas is not None else ''}gradient became non-finite at epoch {epoch} "
                        f"(step {number}); "
                        "no update was applied. Try a lower learning rate (e.g. lr=5e-4)."
                    )
                optimizer.step()
                n_clipped += grad_norm > clip_norm
                n_steps += 1
                epoch_loss += float(loss.detach()) * n_batch
            if replicas is not None:
                epoch_loss = float(replicas.all_reduce_sum([epoch_loss])[0])
            row = {"epoch": epoch, "kl_weight": kl_weight, "lr": float(epoch_lr), "elbo_train": epoch_loss / n_train,
                   "clipped_share": float(n_clipped) / max(n_steps, 1)}
            if len(val_idx):
                row["elbo_validation"] = evaluate_loss(
                    module, data, val_idx, batch_size=max(batch_size, 512), device=device, cell_weights=weights,
                    replicas=replicas,
                )
            effects = probe_counterfactuals(module, probe) if probe is not None else None
            if effects is not None:
                spread = sample_spread(module, probe, effects)
                if spread is not None:
                    row["sample_spread"] = spread
                if batch_projection is not None:
                    share = sample_batch_share(module, probe, batch_projection, effects)
                    if share is not None:
                        row["batch_share"], row["batch_share_chance"] = share, float(batch_chance)
            row["seconds"] = time.perf_counter() - start
            rows.append(row)
            monitored = row.get("elbo_validation", row["elbo_train"])
            bar.set_postfix({k: f"{v:.1f}" for k, v in row.items() if k.startswith("elbo")})
            if monitored < best - early_stopping_min_delta:
                best, since_best = monitored, 0
            else:
                since_best += 1
            stopped = early_stopping and since_best >= early_stopping_patience
            if checkpoint is not None:
                checkpoint.write(TrainingState.capture(
                    epoch=epoch + 1, rows=rows, best=best, since_best=since_best, stopped_early=stopped,
                    module=module, optimizer=optimizer, train_indices=train_idx, validation_indices=val_idx,
                    minibatch_rng=rng, device=device,
                ))
            if stopped:
                break
        bar.close()
    module.eval()
    return TrainingResult(
        history=pd.DataFrame(rows).set_index("epoch"),
        train_indices=train_idx,
        validation_indices=val_idx,
        stopped_early=stopped,
    )
