"""Posterior quantities computed chunk by chunk through the analysis protocol.

These functions take a module implementing the protocol of :mod:`mrvi_pyro.module`
(``encode_u``, ``z_base``/``counterfactual_z``, ``decode``) and a
:class:`mrvi_pyro.data.CellData`; they never hold more than one chunk of cells in memory
beyond their outputs. Every random draw comes from a ``torch.Generator`` seeded by ``seed``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from ._malloc import tune_malloc_if_enabled
from .nn import reuse_folded


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded with ``seed`` (0 when None, so results are reproducible)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(0 if seed is None else int(seed))
    return gen


def module_device(module) -> torch.device:
    """Device of the module's parameters."""
    return next(module.parameters()).device


def iter_posterior_u(
    module,
    data,
    indices: np.ndarray | None = None,
    *,
    batch_size: int = 256,
    n_draws: int | None = None,
    seed: int | None = 0,
    progress_bar: bool | None = None,
    draws_offset: int = 0,
) -> Iterator[tuple[np.ndarray, dict, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Yield ``(indices, batch, loc, scale, draws)`` chunk by chunk.

    ``loc`` and ``scale`` are the posterior ``q(u | x, s)`` parameters (n, L_u); ``draws`` is
    ``None`` when ``n_draws`` is None, else (n_draws, n, L_u) reparameterised draws. Every
    analysis passes through here, so this is where its progress bar lives (and where the
    allocator is tuned once when ``mrvi_pyro.settings.tune_malloc`` is on,
    :func:`mrvi_pyro._malloc.tune_malloc`): ``progress_bar=None``
    shows one on an interactive terminal when there is more than one chunk (tqdm's rule), True
    always, False never.

    ``draws_offset`` (a multiple of ``batch_size``) is the number of cells that precede
    ``indices`` in a longer run (a shard of a distributed analysis,
    :class:`mrvi_pyro.distributed.CellPartition`): the generator first skips the draws of their
    chunks, so these cells get the draws one process gives them.
    """
    tune_malloc_if_enabled()
    device = module_device(module)
    gen = make_generator(seed, device)
    was_training = module.training
    module.eval()
    n_cells = len(data) if indices is None else len(indices)
    n_chunks = -(-n_cells // batch_size)
    disable = (n_chunks < 2 or None) if progress_bar is None else not progress_bar
    bar = tqdm(total=n_cells, unit="cells", desc="mrvi_pyro", disable=disable, leave=False)
    try:
        # reuse_folded: the attention blocks fold their parameters once for the whole pass
        # (the consumers' calls between chunks included), not once per call.
        with torch.no_grad(), reuse_folded():
            check_threads = n_chunks > 1 and device.type == "cpu"
            for chunk, batch in data.iter_batches(indices, batch_size, device):
                if check_threads:
                    _check_threads(module, batch)
                    check_threads = False
                bar.update(len(chunk))
                loc, scale = module.encode_u(batch["x"], batch["sample_index"])
                draws = None
                for _ in range(draws_offset // batch_size if n_draws is not None else 0):
                    torch.randn((n_draws, batch_size, loc.shape[-1]), generator=gen, device=device, dtype=loc.dtype)
                draws_offset = 0
                if n_draws is not None:
                    noise = torch.randn((n_draws, *loc.shape), generator=gen, device=device, dtype=loc.dtype)
                    draws = loc + scale * noise
                yield chunk, batch, loc, scale, draws
    finally:
        bar.close()
        module.train(was_training)


def _check_threads(module, batch: dict) -> None:
    """Warn when torch's threads make the analysis slower than one thread would
    (:func:`mrvi_pyro._threads.warn_if_slowed` on encoding at most 256 of the chunk's cells)."""
    from ._threads import warn_if_slowed

    x, sample_index = batch["x"][:256], batch["sample_index"][:256]
    warn_if_slowed("This analysis", lambda: module.encode_u(x, sample_index), stacklevel=5)


def latent_representation(module, data, indices=None, *, give_z=False, use_mean=True, batch_size=256, seed=0):
    """u (n, L_u) -- or z under each cell's own sample (n, L) when ``give_z`` -- as a numpy array.

    ``use_mean=False`` uses one posterior draw of u per cell instead of its mean.
    """
    out = []
    for _, batch, loc, _, draws in iter_posterior_u(
        module, data, indices, batch_size=batch_size, n_draws=None if use_mean else 1, seed=seed
    ):
        u = loc if use_mean else draws[0]
        out.append((module.counterfactual_z(u, batch["sample_index"]) if give_z else u).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def normalized_expression(
    module,
    data,
    indices=None,
    *,
    batch_levels: list[int] | None = None,
    n_samples: int = 1,
    return_mean: bool = True,
    library_size: float | str = 1.0,
    use_mean: bool | None = None,
    batch_size: int = 256,
    seed: int = 0,
) -> np.ndarray:
    """Decoded expression ``library * h`` of each cell under its own sample.

    Parameters
    ----------
    batch_levels
        Nuisance codes to decode under; the result is averaged over them (in expression
        space). ``None`` uses each cell's own nuisance level.
    n_samples
        Number of values of u per cell.
    return_mean
        Average over the draws; otherwise return (n_samples, n_cells, G).
    library_size
        A number (the same scale for every cell; 1 gives proportions) or ``"latent"``: each
        cell's observed total count, i.e. the mean of the count likelihood.
    use_mean
        Decode the posterior mean of u (its expression repeated ``n_samples`` times) instead of
        posterior draws.
        None: the mean when ``n_samples == 1``, draws otherwise.
    """
    out = []
    use_mean = n_samples == 1 if use_mean is None else use_mean
    for _, batch, loc, _, draws in iter_posterior_u(
        module, data, indices, batch_size=batch_size, n_draws=None if use_mean else n_samples, seed=seed
    ):
        u = loc.unsqueeze(0) if draws is None else draws
        z = module.counterfactual_z(u, batch["sample_index"])
        if batch_levels is None:
            h = module.decode(z, batch["batch_index"]).exp()
        else:
            levels = torch.as_tensor(batch_levels, device=z.device)
            h = module.decode(z.unsqueeze(-2), levels).exp().mean(-2)
        h = h * (batch["x"].sum(-1, keepdim=True) if library_size == "latent" else library_size)
        out.append((h.mean(0, keepdim=True) if return_mean else h.expand(n_samples, *h.shape[1:])).cpu().numpy())
    result = np.concatenate(out, axis=1)
    return result[0] if return_mean else result


def likelihood_parameters(
    module,
    data,
    indices=None,
    *,
    n_samples: int = 1,
    return_mean: bool = True,
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Parameters of the count likelihood ``p(x | z, b)`` of each cell under its own sample.

    ``"mean"``: the likelihood's mean (its ``mean`` property, so a variant's likelihood gives its
    own); ``"dispersions"``: its inverse dispersion ``theta`` broadcast to (cells, genes) when it
    has one (the negative binomial; not the Poisson). ``n_samples == 1`` decodes the posterior
    mean of u; more decodes that many seeded posterior draws, (n_samples, n_cells, G), averaged
    over the draws with ``return_mean``.
    """
    parts: dict[str, list[np.ndarray]] = {}
    use_mean = n_samples == 1
    for _, batch, loc, _, draws in iter_posterior_u(
        module, data, indices, batch_size=batch_size, n_draws=None if use_mean else n_samples, seed=seed
    ):
        u = loc.unsqueeze(0) if draws is None else draws
        z = module.counterfactual_z(u, batch["sample_index"])
        log_mu = module.decode(z, batch["batch_index"]) + torch.log(batch["x"].sum(-1, keepdim=True))
        likelihood = module.observation_distribution(log_mu)
        values = {"mean": likelihood.mean}
        theta = getattr(likelihood, "theta", None)
        if isinstance(theta, torch.Tensor):
            values["dispersions"] = theta.expand(values["mean"].shape)
        for name, value in values.items():
            value = value.mean(0, keepdim=True) if return_mean or use_mean else value
            parts.setdefault(name, []).append(value.detach().cpu().numpy())
    result = {name: np.concatenate(chunks, axis=1) for name, chunks in parts.items()}
    return {name: value[0] if return_mean or use_mean else value for name, value in result.items()}
