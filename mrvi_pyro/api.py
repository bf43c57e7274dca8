"""``MRVI``: the scvi-tools-compatible facade.

Same method names, argument names and output names as ``scvi.external.MRVI``; switching is an
import change. The facade owns registration, training and bookkeeping; the maths lives in
:mod:`mrvi_pyro.module`, :mod:`mrvi_pyro.train`, :mod:`mrvi_pyro.posterior` and the analysis
modules.
"""

from __future__ import annotations

import inspect
import numbers
import os
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse
import torch
from anndata import AnnData

from . import __version__, distributed
from ._api_da import DAMixin
from ._api_de import DEMixin
from ._api_explore import ExploreMixin
from .components import GUIDES, LIKELIHOODS, MODULE_CLASSES, PRIORS, SAMPLE_MAPPERS, module_class_name
from .criticism import posterior_predictive_statistics
from .data import CellData, Registry, build_sample_info, check_key_added, get_registry
from .data import setup_anndata as _setup_anndata
from .explore import check_memory_budget, check_positive
from .io import history_from_json, history_to_json, read_model, split_from_json, split_to_json, write_model
from .module import MrVIModule, default_max_epochs, prior_name
from .posterior import latent_representation, likelihood_parameters, make_generator, normalized_expression
from .train import (
    TrainingDivergedError,
    TrainingResult,
    batch_share_still_falling,
    elbo_per_cell,
    log_likelihood_per_cell,
    posterior_predictive_counts,
    resolve_device,
    spread_still_growing,
    train_svi,
)

FACADE_ARGUMENTS = ("scale_observations",)
"""Saved ``init_params`` that belong to the facade; every other one is a module constructor argument."""


PLAN_KWARGS = {
    "lr": "lr", "weight_decay": "weight_decay", "eps": "eps", "n_epochs_kl_warmup": "n_epochs_kl_warmup",
    "max_norm": "clip_norm", "gradient_clip_val": "clip_norm", "clip_norm": "clip_norm",
}
"""scvi-tools training-plan (and trainer) names accepted in ``plan_kwargs`` -> ``train_svi`` arguments."""

_TRAIN_DEFAULTS = {"lr": None, "weight_decay": 1e-8, "eps": 1e-8, "clip_norm": 40.0, "n_epochs_kl_warmup": 20}


def _plan_options(plan_kwargs: dict | None, **explicit) -> dict:
    """Merge scvi-tools style ``plan_kwargs`` into the explicit optimiser arguments of ``train``."""
    if plan_kwargs is None:
        return explicit
    if not isinstance(plan_kwargs, dict):
        raise ValueError(f"plan_kwargs must be a dict or None; got {type(plan_kwargs).__name__}.")
    plan = dict(plan_kwargs)
    optimizer = plan.pop("optimizer", "Adam")
    if optimizer != "Adam":
        raise ValueError(f"plan_kwargs['optimizer'] must be 'Adam' (the only optimiser here); got {optimizer!r}.")
    unknown = sorted(set(plan) - set(PLAN_KWARGS))
    if unknown:
        raise ValueError(
            f"Unknown plan_kwargs {unknown}; supported: {sorted(PLAN_KWARGS) + ['optimizer']}. "
            "Pass other training options as arguments of train()."
        )
    options, source = dict(explicit), {}
    for key, value in plan.items():
        target = PLAN_KWARGS[key]
        if target in source and options[target] != value:
            raise ValueError(f"plan_kwargs sets {target} twice with different values ({source[target]!r}, {key!r}).")
        if explicit[target] != _TRAIN_DEFAULTS[target] and explicit[target] != value:
            raise ValueError(
                f"{target} was given both as an argument ({explicit[target]!r}) and as plan_kwargs[{key!r}] "
                f"({value!r}); give it once."
            )
        options[target], source[target] = value, key
    return options


def _train_share(train_size: float, validation_size: float | None) -> float:
    """``train_size`` checked against scvi-tools' ``validation_size`` (no test split here)."""
    if validation_size is None:
        return train_size
    if not 0.0 <= float(validation_size) < 1.0:
        raise ValueError(f"validation_size must lie in [0, 1); got {validation_size!r}.")
    if abs(float(train_size) + float(validation_size) - 1.0) > 1e-9:
        raise ValueError(
            f"train_size ({train_size}) + validation_size ({validation_size}) must be 1: mrvi_pyro holds out "
            f"no test set. Pass train_size={1.0 - float(validation_size):g} with this validation_size."
        )
    return train_size


def _saved_configuration(metadata: dict, dir_path) -> tuple[Registry, dict]:
    """The registry and constructor arguments of a ``model.json``, type-checked (one-line errors)."""
    where = f"{dir_path}/model.json"
    registry, params = metadata.get("registry"), metadata.get("init_params")
    if not isinstance(registry, dict) or not isinstance(params, dict):
        raise ValueError(f"{where} lacks its 'registry' or 'init_params' objects; it is damaged.")
    try:
        registry = Registry(**registry)
    except TypeError as err:
        raise ValueError(f"{where} has an invalid registry ({err}).") from None
    for name in ("sample_key", "batch_key", "labels_key", "layer"):
        value = getattr(registry, name)
        if not (value is None and name != "sample_key") and not isinstance(value, str):
            raise ValueError(f"{where}: registry {name} must be a string; got {value!r}.")
    for name in ("sample_categories", "batch_categories", "label_categories", "var_names"):
        value = getattr(registry, name)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{where}: registry {name} must be a list of strings.")
    # Files written before these fields existed: their defaults then (architecture 1: see module.ARCHITECTURE).
    params = {"likelihood": "nb", "sample_mapper": "attention", "architecture": 1, **params}
    if not isinstance(params.get("scale_observations", False), (bool, np.bool_)):
        raise ValueError(f"{where}: scale_observations must be True or False; got {params['scale_observations']!r}.")
    return registry, params


def _saved_components(cls, metadata: dict, init_params: dict, guide, dir_path) -> tuple[type, object]:
    """The module class and guide a ``model.json`` names, looked up among the registered ones.

    Nothing is imported because a file names it: a name not registered in this process is a
    ``ValueError`` saying what to import or register. Files written before these fields existed
    used :class:`MrVIModule` (``cls._module_cls`` is used for them) and the MrVI guide.
    """
    where = f"{dir_path} was saved with"
    names = [("likelihood", init_params.get("likelihood"), LIKELIHOODS),
             ("sample_mapper", init_params.get("sample_mapper"), SAMPLE_MAPPERS)]
    if isinstance(init_params.get("u_prior"), str):
        names.append(("u_prior", init_params["u_prior"], PRIORS))
    module_class = metadata.get("module_class")
    if module_class is not None:
        names.append(("module class", module_class, MODULE_CLASSES))
    saved_guide = metadata.get("guide")
    if guide is None and saved_guide is not None:
        names.append(("guide", saved_guide, GUIDES))
    for what, name, registry in names:
        if not isinstance(name, str) or name not in registry:
            raise ValueError(
                f"{where} the {what} {name!r}, which is not registered in this process (registered: "
                f"{registry.names()}). {registry.register_hint}"
            )
    if guide is None and saved_guide is None and metadata.get("unregistered_guide"):
        raise ValueError(
            f"{where} the unregistered guide {metadata['unregistered_guide']!r}; pass it with "
            "MRVI.load(..., guide=<function>), or register it with mrvi_pyro.register_guide(name, function) before "
            "saving so that the model file names it."
        )
    module_cls = cls._module_cls if module_class is None else MODULE_CLASSES.get(module_class)
    if guide is None and saved_guide is not None:
        guide = GUIDES.get(saved_guide)
    return module_cls, guide


def _check_materialised(module) -> None:
    """``ValueError`` if loading left a tensor of ``module`` on the meta device (one kept outside
    its ``state_dict``: a non-persistent buffer or a plain tensor attribute)."""
    left = [f"{prefix}.{name}".lstrip(".") for prefix, sub in module.named_modules()
            for name, value in [*sub.named_buffers(recurse=False), *vars(sub).items()]
            if isinstance(value, torch.Tensor) and value.is_meta]
    if left:
        raise ValueError(
            f"{type(module).__name__} keeps tensors outside its state_dict ({sorted(set(left))[:5]}), which a saved "
            "model cannot restore; make them persistent buffers (register_buffer) or parameters."
        )


_PRIOR_NAMES = {"normal": "isotropic normal"}


def _check_optional_positive(name: str, value) -> None:
    """:func:`mrvi_pyro.explore.check_positive` for arguments where ``None`` means a default."""
    if value is not None:
        check_positive(name, value)


def _insert_parameter_docs(doc: str, placeholder: str, cls: type, skip: tuple[str, ...]) -> str:
    """``doc`` with the line ``placeholder`` replaced by the entries of the numpydoc
    ``Parameters`` section of ``cls`` (at the placeholder's indentation), without those whose
    names are all in ``skip``: the module's arguments are documented once and shown by :class:`MRVI`."""
    line = next(line for line in doc.splitlines() if line.strip() == placeholder)
    indent = line[: len(line) - len(line.lstrip())]
    return doc.replace(placeholder, _parameter_docs(cls, skip).replace("\n", "\n" + indent))


def _parameter_docs(cls: type, skip: tuple[str, ...]) -> str:
    """The entries of the numpydoc ``Parameters`` section of ``cls`` (unindented), without those
    whose names are all in ``skip``."""
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    try:
        first = lines.index("Parameters") + 2
    except ValueError:
        return ""
    entries: list[list[str]] = []
    for i in range(first, len(lines)):
        line = lines[i]
        if i + 1 < len(lines) and set(lines[i + 1]) == {"-"}:  # the next section
            break
        if line and not line.startswith(" "):
            entries.append([line])
        elif entries:
            entries[-1].append(line)
    kept = [e for e in entries if not set(e[0].replace(" ", "").split(",")) <= set(skip)]
    return "\n".join(line for entry in kept for line in entry).rstrip()


class _SkipRandomFillOnMeta(torch.overrides.TorchFunctionMode):
    """Leave meta tensors' in-place random fills (``torch.nn.init``'s and ``Tensor.normal_`` and
    the like) out while a module is built on the meta device, where they compute nothing anyway.

    On meta tensors ``normal_`` and ``torch.randn`` run torch's Python reference
    implementations, whose first use imports ``torch._dynamo`` and sympy: ~2 s and ~65 MB of
    resident memory for every process that loads a model (measured with :meth:`MRVI.load`).
    Random tensors made on the meta device become empty ones of the same size."""

    FILLS = frozenset({torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.bernoulli_,
                       torch.Tensor.exponential_, torch.Tensor.log_normal_, torch.Tensor.cauchy_,
                       torch.Tensor.geometric_, torch.Tensor.random_})

    FACTORIES = {torch.randn: torch.empty, torch.rand: torch.empty, torch.randn_like: torch.empty_like,
                 torch.rand_like: torch.empty_like}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FACTORIES and str(kwargs.get("device") or "meta") == "meta" and (
                func in (torch.randn, torch.rand) or (args and args[0].is_meta)):
            # Random tensors made on the meta device (torch.randn(n) under the meta context):
            # empty ones of the same size (the random ones go through the same references).
            return self.FACTORIES[func](*args, **{k: v for k, v in kwargs.items() if k != "generator"})
        first = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes it by keyword
        if isinstance(first, torch.Tensor) and first.is_meta and (
                func in self.FILLS or getattr(func, "__module__", None) == "torch.nn.init"):
            return first  # torch.nn.init's fills (normal_, xavier_uniform_, ...) return their tensor
        return func(*args, **kwargs)


class MRVI(ExploreMixin, DEMixin, DAMixin):
    """Multi-resolution variational inference (MrVI) for multi-sample single-cell data.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata` (not modified).
    scale_observations
        Weight cells so that every sample counts equally in the ELBO.
    guide
        Optional custom guide: a function with the signature of :func:`mrvi_pyro.guide.guide`
        (sites ``u`` and ``z``) or the name it was registered under. A registered guide
        (:func:`mrvi_pyro.register_guide`) is saved by name and found again by :meth:`load`;
        an unregistered one must be passed again to :meth:`load`.
    seed
        Seeds the initial weights (default 0, as scvi-tools seeds with ``scvi.settings.seed = 0``:
        the same script gives the same model). ``None`` draws them from torch's global random
        state. The caller's global random state is left unchanged either way.
    **module_kwargs
        Keyword arguments of the module class :attr:`_module_cls` (:class:`MrVIModule` by
        default, whose constructor lists them once; a subclass may add its own). For
        :class:`MrVIModule`:

        {module_parameters}

    Attributes
    ----------
    _module_cls
        The module class built by the constructor (set it in a subclass of ``MRVI`` to train a
        variant of :class:`MrVIModule` through the facade). :meth:`load` rebuilds the class a
        model was saved with.

    Examples
    --------
    >>> MRVI.setup_anndata(adata, sample_key="donor", batch_key="site")
    >>> model = MRVI(adata)
    >>> model.train(max_epochs=50)
    >>> u = model.get_latent_representation()
    """

    _module_cls: type = MrVIModule

    def __init__(
        self,
        adata: AnnData,
        *,
        scale_observations: bool = False,
        guide=None,
        seed: int | None = 0,
        **module_kwargs,
    ):
        registry = get_registry(adata)
        if not isinstance(scale_observations, (bool, np.bool_)):
            raise ValueError(f"scale_observations must be True or False; got {scale_observations!r}.")
        with torch.random.fork_rng():
            if seed is not None:
                torch.manual_seed(seed)
            self.module = self._module_cls.from_config(registry, guide=guide, **module_kwargs)
        self.module.eval()
        self.init_params = {**self._module_cls.default_arguments(), **module_kwargs,
                            "scale_observations": scale_observations}
        self.registry: Registry = registry
        self.adata = adata
        self.scale_observations = scale_observations
        self._data_cache: tuple[int, CellData] | None = None
        self.sample_info = build_sample_info(adata, registry)
        self.history: pd.DataFrame | None = None
        self.training_result: TrainingResult | None = None
        self._split: tuple[np.ndarray, np.ndarray] | None = None
        self.is_trained = False
        self.diverged: str | None = None

    # ----- registration -------------------------------------------------------------------
    @staticmethod
    def setup_anndata(
        adata: AnnData,
        *,
        sample_key: str,
        batch_key: str | None = None,
        labels_key: str | None = None,
        layer: str | None = None,
    ) -> None:
        """Register ``adata``: see :func:`mrvi_pyro.data.setup_anndata`.

        Writes only ``adata.uns["_mrvi_pyro"]`` (a JSON string).
        """
        _setup_anndata(adata, sample_key, batch_key=batch_key, labels_key=labels_key, layer=layer)

    def update_sample_info(self, adata: AnnData | None = None) -> None:
        """Recompute :attr:`sample_info` from ``adata`` (default: the model's AnnData), e.g. after
        adding sample-level columns to ``obs``."""
        adata = self.adata if adata is None else adata
        self._cell_data(adata, purpose="check")  # validates counts, genes and categories
        self.sample_info = build_sample_info(adata, self.registry)

    def _check_ready(self) -> None:
        """Refuse analyses of diverged weights; warn about analyses of untrained ones."""
        if getattr(self, "diverged", None):
            raise ValueError(
                f"Training of this model diverged ({self.diverged}), so its weights are not usable for "
                "analyses. Build a new MRVI and train it with a lower lr or a smaller clip_norm."
            )
        if not self.is_trained:
            warnings.warn(
                "This model has not been trained: analyses use its random initial weights. Call "
                "model.train() first.", UserWarning, stacklevel=4,
            )

    def _cell_data(self, adata: AnnData | None = None, purpose: str = "analysis") -> CellData:
        """The model's view of ``adata`` (default: its own), validated (counts, genes, categories).

        ``purpose="analysis"`` also refuses diverged weights and warns about untrained ones.
        The model's own AnnData is read once and cached; every later use checks that its counts
        are unchanged (``ValueError`` otherwise) and re-reads reassigned sample, nuisance or
        label columns (and then recomputes :attr:`sample_info`).
        """
        adata = self.adata if adata is None else adata
        if adata is None:
            raise ValueError("This model has no AnnData attached; pass `adata=`.")
        if purpose == "analysis":
            self._check_ready()
        cached = self._data_cache
        if cached is not None and cached[0] == id(adata) and adata is self.adata:
            if cached[1].is_current(adata):
                return cached[1]
        data = CellData(adata, self.registry)
        if adata is self.adata:
            self._data_cache = (id(adata), data)
            if cached is not None:
                self.sample_info = build_sample_info(adata, self.registry)
        return data

    @staticmethod
    def _indices(data: CellData, indices: Sequence[int] | None) -> np.ndarray:
        if indices is None:
            return np.arange(len(data))
        indices = np.asarray(indices)
        if indices.ndim != 1:
            raise ValueError(f"indices must be one-dimensional; got shape {indices.shape}.")
        if indices.dtype == bool:
            if len(indices) != len(data):
                raise ValueError(
                    f"A boolean mask for indices must have one entry per cell ({len(data)}); got {len(indices)}."
                )
            indices = np.flatnonzero(indices)
        elif indices.size and not np.issubdtype(indices.dtype, np.integer):
            raise ValueError(f"indices must be integers or a boolean mask; got dtype {indices.dtype}.")
        if indices.size and (indices.min() < 0 or indices.max() >= len(data)):
            raise ValueError(f"indices must lie in [0, {len(data)}); got values outside that range.")
        return indices.astype(np.int64)

    # ----- training -----------------------------------------------------------------------
    def train(
        self,
        max_epochs: int | None = None,
        *,
        batch_size: int = 128,
        train_size: float = 0.9,
        early_stopping: bool = False,
        lr: float | None = None,
        weight_decay: float = 1e-8,
        eps: float = 1e-8,
        clip_norm: float = 40.0,
        n_epochs_kl_warmup: int = 20,
        warmup_zero_grads: bool = False,
        early_stopping_patience: int = 15,
        early_stopping_min_delta: float = 0.0,
        seed: int = 0,
        device: str = "auto",
        progress_bar: bool = True,
        validation_size: float | None = None,
        plan_kwargs: dict | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
    ) -> TrainingResult:
        """Train by SVI on minibatches (see :func:`mrvi_pyro.train.train_svi`).

        ``max_epochs=None`` uses ``min(round(20000 / n_cells * 400), 400)``. Training continues
        from the current parameters; the history of this run is in :attr:`history`.

        ``history["sample_spread"]`` is, after each epoch, the root mean square distance between
        the counterfactual ``z`` of one cell under two samples (256 validation cells, posterior
        mean ``u``): the size of the sample effects learned so far. Weak sample effects are
        learned late (``benchmarks/dynamics.py``); when the spread still rose by more than 10% over
        the last tenth of the epochs (at least 5), ``train`` warns that the sample-level results
        have not settled and that more epochs are needed.

        ``history["batch_share"]`` is, after each epoch and on the same cells, the share of those
        sample effects that the samples' batch explains (``batch_share_chance``: its level when
        they have nothing to do with batch; with a nuisance key of two or more levels). Early in
        training the batch often goes through the sample effects before the decoder's nuisance
        path takes it over. When the share was still more than twice its chance level and falling
        by more than 10% over the last tenth of the epochs, ``train`` warns that the sample
        distances still group samples by batch. A share that stays high without falling (a design
        whose covariates are confounded with batch) is not flagged.

        ``lr=None`` (default): the reference's 2e-3 during the KL warm-up
        (``n_epochs_kl_warmup`` epochs), then :func:`mrvi_pyro.train.default_lr`: 2e-3 up to
        batch 128, scaled by ``sqrt(batch_size / 128)`` up to batch 256 (2.83e-3), so that
        training at batch 256 follows the course per epoch of batch 128. The warm-up at 2e-3 lets
        the batch leave the sample effects early (see ``batch_share``). The reference keeps 2e-3
        throughout; pass ``lr=2e-3`` for its setting.

        ``warmup_zero_grads=True`` gives the prior's parameters zero gradients during the first
        warm-up epoch (KL weight 0), as scvi-tools does; the default False lets Adam skip them
        (see :func:`mrvi_pyro.train.train_svi` and the README's "Differences from scvi-tools").

        As in scvi-tools, ``validation_size`` (None: ``1 - train_size``) is the held-out share;
        mrvi_pyro holds out no test set, so ``train_size + validation_size`` must be 1.
        ``plan_kwargs`` takes scvi-tools' training-plan names: ``lr``, ``weight_decay``,
        ``eps``, ``n_epochs_kl_warmup``, ``max_norm`` or ``gradient_clip_val`` (= ``clip_norm``)
        and ``optimizer`` (``"Adam"`` only); they override the keyword defaults, and giving a
        setting both ways with different values is an error.

        ``checkpoint_dir`` (a new or empty directory, default None: no checkpoint) receives a
        checkpoint after every epoch, written atomically (a kill at any moment leaves the last
        complete one). Calling ``train`` again with the same ``checkpoint_dir``, data and
        arguments -- in this process or a new one, on a freshly built ``MRVI`` -- resumes after
        the last complete epoch and continues to ``max_epochs`` (which may be raised); on CPU
        (same torch thread count) the result equals that of an uninterrupted run. A checkpoint of another configuration,
        other training arguments or other data is refused naming what differs, and a
        non-empty directory that is not a checkpoint is refused; neither is changed.

        Data-parallel: inside ``torchrun --nproc-per-node N`` (or
        :func:`mrvi_pyro.distributed.launch`) the same call trains on N ranks, each reading its
        share of every minibatch; ``batch_size`` is then the global minibatch (N must divide it)
        and the run reproduces one process with that ``batch_size`` (see
        :mod:`mrvi_pyro.distributed`). There rank 0 alone writes ``checkpoint_dir`` (with the
        random states of every rank) and every rank resumes from it; a checkpoint is resumed on
        the number of ranks that wrote it (another number is refused).
        """
        options = _plan_options(
            plan_kwargs, lr=lr, weight_decay=weight_decay, eps=eps, clip_norm=clip_norm,
            n_epochs_kl_warmup=n_epochs_kl_warmup,
        )
        train_size = _train_share(train_size, validation_size)
        data = self._cell_data(purpose="training")
        max_epochs = default_max_epochs(len(data)) if max_epochs is None else max_epochs
        try:
            result = train_svi(
                self.module, data, max_epochs=max_epochs, batch_size=batch_size, train_size=train_size,
                **options, warmup_zero_grads=warmup_zero_grads, early_stopping=early_stopping,
                early_stopping_patience=early_stopping_patience, early_stopping_min_delta=early_stopping_min_delta,
                scale_observations=self.scale_observations, seed=seed, device=device, progress_bar=progress_bar,
                checkpoint_dir=checkpoint_dir,
                checkpoint_identity=None if checkpoint_dir is None else {
                    "model": self.init_params, "registry": self.registry.__dict__,
                },
            )
        except TrainingDivergedError as err:
            self.diverged = str(err).split(";")[0]  # analyses now refuse these weights
            raise
        self.training_result, self.history, self.is_trained = result, result.history, True
        self._split = (np.asarray(result.train_indices, dtype=np.int64),
                       np.asarray(result.validation_indices, dtype=np.int64))
        train_longer = (
            f"Train longer: a larger max_epochs (default for {len(data)} cells: {default_max_epochs(len(data))}); "
            "with checkpoint_dir, calling train() again with a larger max_epochs continues the same run."
        )
        still_growing = spread_still_growing(result.history)
        if still_growing is not None:
            growth, window = still_growing
            warnings.warn(
                f"The sample effects were still growing when training stopped: model.history['sample_spread'] "
                f"(the distance between one cell's z under two samples) rose by {growth:.0%} over the last "
                f"{window} epochs. Sample distances, stratification, DE and DA may not have settled, and a weak "
                "effect (a hidden grouping of samples) can still be missing. " + train_longer,
                UserWarning, stacklevel=2,
            )
        falling = batch_share_still_falling(result.history)
        if falling is not None:
            last, before, chance, window = falling
            warnings.warn(
                f"The sample effects still follow batch: model.history['batch_share'] (the share of the sample "
                f"effects that the samples' batch explains) averaged {last:.0%} over the last {window} epochs, down "
                f"from {before:.0%} over the {window} before (chance: {chance:.0%}). The batch is still moving from "
                "the sample effects to the decoder's nuisance path, so sample distances and stratification still "
                "group samples by batch, and a weak effect can be hidden behind it. " + train_longer,
                UserWarning, stacklevel=2,
            )
        return result

    def to_device(self, device: str = "auto") -> None:
        """Move the module to ``device`` (``"auto"``, ``"cpu"``, ``"cuda"``)."""
        self.module.to(resolve_device(device))

    @property
    def device(self) -> torch.device:
        """The device of the module's weights (scvi-tools' ``model.device``); see :meth:`to_device`."""
        return next(self.module.parameters()).device

    # ----- the training split, under scvi-tools' names ------------------------------------
    @property
    def train_indices(self) -> np.ndarray | None:
        """Positions (in the AnnData the model was trained on) of the cells it was trained on,
        sorted; None before training. Kept by :meth:`save` and restored by :meth:`load`; a
        later :meth:`train` replaces it. A copy: changing it changes nothing here."""
        return None if self._split is None else self._split[0].copy()

    @property
    def validation_indices(self) -> np.ndarray | None:
        """Positions of the validation cells (``train_size`` / ``validation_size``: the cells
        held out from training, on which ``history["elbo_validation"]`` is computed), sorted;
        empty with ``train_size=1``; None before training. As :attr:`train_indices`."""
        return None if self._split is None else self._split[1].copy()

    @property
    def test_indices(self) -> np.ndarray | None:
        """Always empty after training (None before): unlike scvi-tools' splitter, ``train`` holds
        out no test set (``train_size + validation_size`` is 1 here); kept for scripts written
        for scvi-tools that read it."""
        return None if self._split is None else np.zeros(0, dtype=np.int64)

    # ----- latent space and expression ----------------------------------------------------
    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        use_mean: bool = True,
        give_z: bool = False,
        *,
        seed: int = 0,
        key_added: str | None = None,
        overwrite: bool = False,
    ) -> np.ndarray:
        """Posterior u (n_cells, n_latent_u), or z under each cell's own sample when ``give_z``.

        ``use_mean=False`` returns one posterior draw per cell (seeded by ``seed``).

        ``key_added`` (e.g. ``"X_mrvi_u"``, for ``sc.pp.neighbors(adata, use_rep="X_mrvi_u")``)
        also writes the result to ``adata.obsm[key_added]`` of the AnnData analysed (``adata``,
        or the model's own); it needs all its cells (``indices=None``) and refuses a key that
        exists unless ``overwrite=True``. The returned array is the same either way.
        """
        _check_optional_positive("batch_size", batch_size)
        target = self.adata if adata is None else adata
        if key_added is not None:
            if target is not None:
                check_key_added(key_added, target.obsm, [key_added], where="adata.obsm", overwrite=overwrite)
            if indices is not None:
                raise ValueError("key_added writes one row per cell of adata.obsm, so it needs indices=None; "
                                 "subset the AnnData instead.")
        data = self._cell_data(adata)
        latent = latent_representation(
            self.module, data, self._indices(data, indices), give_z=give_z, use_mean=use_mean,
            batch_size=batch_size or 1024, seed=seed,
        )
        if key_added is not None:
            target.obsm[key_added] = latent.copy()
        return latent

    def get_elbo(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        *,
        return_mean: bool = True,
        seed: int = 0,
    ) -> float | np.ndarray:
        """Evidence lower bound of the cells (higher is better), as scvi-tools' ``get_elbo``.

        ``log p(x, u, z) - log q(u, z | x)`` at one posterior draw per cell (seeded by ``seed``),
        with the full KL weight: the mean over the cells when ``return_mean``, else one value per
        cell (n_cells,). Its negative is what ``history["elbo_validation"]`` reports per epoch.
        """
        return self._per_cell(elbo_per_cell, adata, indices, batch_size, return_mean, seed)

    def _per_cell(self, function, adata, indices, batch_size, return_mean, seed, sign: float = 1.0):
        """``sign * function(module, data, indices, ...)``, one value per cell or their mean
        (:meth:`get_elbo`, :meth:`get_reconstruction_error`)."""
        _check_optional_positive("batch_size", batch_size)
        if not isinstance(return_mean, (bool, np.bool_)):
            raise ValueError(f"return_mean must be True or False; got {return_mean!r}.")
        data = self._cell_data(adata)
        per_cell = sign * function(self.module, data, self._indices(data, indices), batch_size=batch_size or 1024,
                                   seed=seed)
        return float(per_cell.mean()) if return_mean else per_cell

    def get_reconstruction_error(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        *,
        return_mean: bool = True,
        seed: int = 0,
    ) -> dict[str, float | np.ndarray]:
        """Reconstruction error of the cells, as scvi-tools' ``get_reconstruction_error``.

        ``{"reconstruction_loss": value}``: the negative log-likelihood of the counts given one
        posterior draw of ``u`` and ``z`` per cell (seeded by ``seed``; evaluation mode), ``-log p(x | u, z)``,
        lower is better. ``value`` is the mean over the cells when ``return_mean``, else one value
        per cell (n_cells,). It is the likelihood part of :meth:`get_elbo` (the same draw for
        the same ``seed``), so it compares likelihoods (``likelihood="nb"`` against
        ``"poisson"``) or decoders without the prior's terms; it is not the marginal likelihood.
        """
        value = self._per_cell(log_likelihood_per_cell, adata, indices, batch_size, return_mean, seed, sign=-1.0)
        return {"reconstruction_loss": value}

    def get_normalized_expression(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        transform_batch: str | Sequence[str] | None = None,
        gene_list: Sequence[str] | None = None,
        library_size: float | str = "latent",
        n_samples: int = 1,
        n_samples_overall: int | None = None,
        weights: str | None = None,
        batch_size: int | None = None,
        return_mean: bool = False,
        return_numpy: bool | None = None,
        silent: bool = True,
        *,
        seed: int = 0,
    ) -> pd.DataFrame | np.ndarray:
        """Decoded expression of each cell under its own sample (scvi-tools' names and defaults).

        Parameters
        ----------
        transform_batch
            Nuisance level name(s) to decode under; several are averaged. None: each cell's
            own level.
        gene_list
            Return only these genes (names of ``adata.var_names``).
        library_size
            ``"latent"`` (default): each cell's observed total count, so the output is the mean of
            the count likelihood; a number: that common scale (1: proportions summing to one).
        n_samples
            1 decodes the posterior mean of u (deterministic); more decodes that many seeded
            posterior draws.
        n_samples_overall
            Instead of per-cell values, return this many rows drawn uniformly with replacement
            (seeded) from ``n_samples_overall // n_cells + 1`` posterior draws of every cell:
            an ndarray (n_samples_overall, n_genes). Requires ``n_samples=1``.
        weights
            ``None`` or ``"uniform"`` (the only option; scvi-tools' ``"importance"`` is not
            implemented).
        return_mean
            With ``n_samples > 1``: average the draws; otherwise an ndarray of shape
            (n_samples, n_cells, n_genes) is returned.
        return_numpy
            Return an ndarray instead of a DataFrame (None: only when the result is not 2-d per cell).
        silent
            Accepted for compatibility with scvi-tools and ignored (no progress bar is shown).
        seed
            Seeds the posterior draws.

        Returns
        -------
        DataFrame (cells x genes), or an ndarray as described above.
        """
        _check_optional_positive("batch_size", batch_size)
        _check_optional_positive("n_samples", n_samples)
        if weights not in (None, "uniform"):
            raise ValueError(
                f"weights must be None or 'uniform' (importance weights are not implemented); got {weights!r}."
            )
        if not (library_size == "latent" or (isinstance(library_size, numbers.Real) and library_size > 0)):
            raise ValueError(f"library_size must be 'latent' or a positive number; got {library_size!r}.")
        if n_samples_overall is not None and (n_samples != 1 or int(n_samples_overall) < 1):
            raise ValueError("n_samples_overall must be a positive integer and is used with n_samples=1 "
                             f"(got n_samples_overall={n_samples_overall!r}, n_samples={n_samples!r}).")
        data = self._cell_data(adata)
        idx = self._indices(data, indices)
        levels = None if transform_batch is None else self._batch_codes(transform_batch)
        genes = self._gene_positions(gene_list)
        n_draws = n_samples if n_samples_overall is None else int(n_samples_overall) // len(idx) + 1
        values = normalized_expression(
            self.module, data, idx, batch_levels=levels, n_samples=n_draws,
            return_mean=(return_mean or n_samples == 1) and n_samples_overall is None, library_size=library_size,
            use_mean=None if n_samples_overall is None else False, batch_size=batch_size or 256, seed=seed,
        )[..., genes]
        if n_samples_overall is not None:
            rows = values.reshape(-1, values.shape[-1])
            pick = torch.randint(len(rows), (int(n_samples_overall),), generator=make_generator(seed + 1)).numpy()
            return rows[pick]
        if values.ndim == 3:
            if return_numpy is False:
                warnings.warn("return_numpy=False is ignored: n_samples > 1 without return_mean gives an ndarray "
                              "(n_samples, n_cells, n_genes).", UserWarning, stacklevel=2)
            return values
        if return_numpy:
            return values
        return pd.DataFrame(values, index=data.obs_names[idx], columns=np.asarray(self.registry.var_names)[genes])

    def get_latent_library_size(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        give_mean: bool = True,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """Library size of each cell, (n_cells, 1) (scvi-tools' name and shape).

        MrVI does not infer a library size: the likelihood's mean is the decoded expression times
        the cell's observed total count, so this is that total (read chunk by chunk). ``give_mean``
        is accepted for compatibility and changes nothing (there is no posterior to average).
        """
        _check_optional_positive("batch_size", batch_size)
        if not isinstance(give_mean, (bool, np.bool_)):
            raise ValueError(f"give_mean must be True or False; got {give_mean!r}.")
        data = self._cell_data(adata)
        totals = [batch["x"].sum(-1, keepdim=True).double().numpy()
                  for _, batch in data.iter_batches(self._indices(data, indices), batch_size or 1024)]
        return np.concatenate(totals) if totals else np.zeros((0, 1))

    def get_likelihood_parameters(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        n_samples: int = 1,
        give_mean: bool = False,
        batch_size: int | None = None,
        *,
        seed: int = 0,
    ) -> dict[str, np.ndarray]:
        """Parameters of the count likelihood ``p(x | z, b)`` of each cell (scvi-tools' name and keys).

        ``"mean"``: the likelihood's mean (cells x genes), ``library * h`` for the negative
        binomial and the Poisson, at the cell's observed library size; ``"dispersions"``: the
        negative binomial's inverse dispersion ``theta`` per gene, repeated for every cell (absent
        for the Poisson). A variant's likelihood gives its own ``mean`` (and ``theta`` if it has one).

        Parameters
        ----------
        n_samples
            1 decodes the posterior mean of u (deterministic; the reference draws once); more
            decodes that many seeded posterior draws: arrays (n_samples, n_cells, n_genes).
        give_mean
            With ``n_samples > 1``, average over the draws (arrays (n_cells, n_genes)).
        seed
            Ours: seeds the posterior draws.
        """
        _check_optional_positive("batch_size", batch_size)
        n_samples = check_positive("n_samples", n_samples)
        if not isinstance(give_mean, (bool, np.bool_)):
            raise ValueError(f"give_mean must be True or False; got {give_mean!r}.")
        data = self._cell_data(adata)
        return likelihood_parameters(self.module, data, self._indices(data, indices), n_samples=n_samples,
                                     return_mean=bool(give_mean), batch_size=batch_size or 256, seed=seed)

    def posterior_predictive_sample(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        transform_batch: str | None = None,
        n_samples: int = 1,
        gene_list: Sequence[str] | None = None,
        batch_size: int | None = None,
        *,
        silent: bool = True,
        seed: int = 0,
        max_in_memory_gb: float = 2.0,
    ) -> scipy.sparse.csr_matrix | np.ndarray:
        """Counts drawn from the posterior predictive distribution ``p(x_new | x)`` (scvi-tools' name).

        For each cell and draw: ``u`` and ``z`` from the posterior ``q(u, z | x, s)``, then the
        counts from the model's likelihood given them (the cell's observed library size), run as
        the Pyro model itself with its observed site unconditioned, so a variant's likelihood is
        sampled as it is defined. For posterior predictive checks: compare a statistic of the
        draws (per-gene mean, variance, share of zeros) with the same statistic of the data.

        Parameters
        ----------
        adata, indices
            Cells to draw for (default: every cell of the model's AnnData).
        transform_batch
            A nuisance level: the likelihood sees it for every cell (counts as if measured in that
            batch); the posterior still conditions on the observed cells. None: each cell's own.
        n_samples
            Draws per cell.
        gene_list
            Return only these genes (names of ``adata.var_names``), in this order.
        batch_size
            Cells per chunk (default 256).
        silent
            Accepted for compatibility with scvi-tools and ignored (no progress bar is shown).
        seed
            Seeds the draws (posterior and counts); the caller's random state is left alone.
        max_in_memory_gb
            Ours: with ``n_samples > 1`` the dense result (n_cells x n_genes x n_samples float32)
            must fit in this many GB (1e9 bytes), else a ``ValueError`` is raised before any work,
            naming the size and how to reduce it.

        Returns
        -------
        ``n_samples == 1``: a ``scipy.sparse.csr_matrix`` (n_cells, n_genes) of counts (float32).
        ``n_samples > 1``: an ndarray (n_cells, n_genes, n_samples), the axes of scvi-tools'
        result (which is a pydata ``sparse.GCXS``; scipy has no 3-d sparse type).
        """
        _check_optional_positive("batch_size", batch_size)
        n_samples = check_positive("n_samples", n_samples)
        check_memory_budget(max_in_memory_gb)
        if transform_batch is not None and not isinstance(transform_batch, str):
            raise ValueError("transform_batch must be one nuisance level (a string) or None; "
                             f"got {transform_batch!r}.")
        data = self._cell_data(adata)
        idx = self._indices(data, indices)
        level = None if transform_batch is None else self._batch_codes(transform_batch)[0]
        genes = self._gene_positions(gene_list)
        n_genes = len(self.registry.var_names) if isinstance(genes, slice) else len(genes)
        size_gb = 4 * len(idx) * n_genes * n_samples / 1e9
        if n_samples > 1 and size_gb > max_in_memory_gb:
            raise ValueError(
                f"{n_samples} posterior predictive draws of {len(idx)} cells x {n_genes} genes are "
                f"{size_gb:.3g} GB as a dense array, above max_in_memory_gb={max_in_memory_gb}. Draw for fewer "
                "cells (indices=) or genes (gene_list=), raise max_in_memory_gb, or call with n_samples=1 "
                "and different seeds (each draw is a sparse matrix)."
            )
        draws = posterior_predictive_counts(self.module, data, idx, n_samples=n_samples, batch_level=level,
                                            genes=genes, batch_size=batch_size or 256, seed=seed, sparse=n_samples == 1)
        return draws[0] if n_samples == 1 else np.stack(draws, axis=-1)

    def posterior_predictive_check(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        n_samples: int = 20,
        gene_list: Sequence[str] | None = None,
        batch_size: int | None = None,
        *,
        interval: float = 0.9,
        seed: int = 0,
    ) -> pd.DataFrame:
        """Per-gene posterior predictive check (ours; scvi-tools has ``scvi.criticism``).

        Draws ``n_samples`` replicated data sets of the cells (:meth:`posterior_predictive_sample`'s
        draws, reduced chunk by chunk, so memory does not grow with the cells) and compares
        each gene's mean, variance, share of zeros and coefficient of variation over the cells
        with the observed ones (:func:`mrvi_pyro.criticism.posterior_predictive_statistics`).
        Check held-out cells (``indices=model.validation_indices``) to see more than the fit.

        Returns
        -------
        DataFrame, one row per (statistic, gene): ``observed``, ``replicated`` (median of the
        draws), ``low``/``high`` (the central ``interval`` of the draws), ``inside`` and ``ppp``
        (``P(replicated >= observed)``). ``table.groupby("statistic", observed=True)["inside"].mean()``
        is each statistic's coverage, near ``interval`` for a model that fits;
        :func:`mrvi_pyro.pl.posterior_predictive_check` draws it.
        """
        _check_optional_positive("batch_size", batch_size)
        n_samples = check_positive("n_samples", n_samples)
        if not (isinstance(interval, numbers.Real) and 0 < interval < 1):
            raise ValueError(f"interval must be between 0 and 1 (e.g. 0.9); got {interval!r}.")
        data = self._cell_data(adata)
        return posterior_predictive_statistics(
            self.module, data, self._indices(data, indices), n_samples=n_samples,
            genes=self._gene_positions(gene_list), interval=float(interval), batch_size=batch_size or 256, seed=seed)

    def _batch_codes(self, transform_batch: str | Sequence[str]) -> list[int]:
        names = [transform_batch] if isinstance(transform_batch, str) else list(transform_batch)
        unknown = [b for b in names if b not in self.registry.batch_categories]
        if unknown:
            raise ValueError(
                f"transform_batch {unknown} not among the nuisance levels {self.registry.batch_categories}."
            )
        return [self.registry.batch_categories.index(b) for b in names]

    def _gene_positions(self, gene_list: Sequence[str] | None) -> slice | np.ndarray:
        if gene_list is None:
            return slice(None)
        genes = [gene_list] if isinstance(gene_list, str) else list(gene_list)
        var_names = pd.Index(self.registry.var_names)
        unknown = [g for g in genes if g not in var_names]
        if unknown:
            raise ValueError(f"gene_list has {len(unknown)} gene(s) not in the model's genes, e.g. {unknown[:5]}.")
        return var_names.get_indexer(genes)

    # ----- persistence --------------------------------------------------------------------
    def save(self, dir_path: str | os.PathLike, *, overwrite: bool = False, save_anndata: bool = False) -> None:
        """Save weights (``model.pt``) and JSON metadata (``model.json``) to ``dir_path``.

        The save is atomic (written beside ``dir_path``, then renamed into place), and replaces
        an earlier save as a whole: no file of it (e.g. an old ``adata.h5ad``) survives.
        ``overwrite=True`` is needed to replace a non-empty ``dir_path``, and only an earlier
        mrvi_pyro save is ever replaced. In a distributed launch only rank 0 writes (all ranks
        hold the same weights); the others return at once, so a rank that reads the save should
        wait for rank 0 first (``torch.distributed.barrier()``).
        """
        if distributed.rank() != 0:
            return
        guide_name = GUIDES.name_of(self.module.guide_program)
        metadata = {
            "package_version": __version__,
            "module_class": module_class_name(type(self.module)),
            "guide": guide_name,
            "init_params": self.init_params,
            "registry": self.registry.__dict__,
            "history": history_to_json(self.history),
            "split": split_to_json(*(self._split or (None, None))),
            "is_trained": self.is_trained,
            "diverged": getattr(self, "diverged", None),
        }
        if guide_name is None:
            metadata["unregistered_guide"] = getattr(self.module.guide_program, "__qualname__", "?")
            warnings.warn(
                f"The guide {metadata['unregistered_guide']!r} is not registered, so the model file cannot name it: "
                "MRVI.load will need it again as guide=. Register it with mrvi_pyro.register_guide(name, guide) "
                "before saving to make the file self-describing.", UserWarning, stacklevel=2,
            )
        write_model(dir_path, self.module.state_dict(), metadata, overwrite=overwrite,
                    adata=self.adata if save_anndata else None)

    @classmethod
    def load(cls, dir_path: str | os.PathLike, adata: AnnData | None = None, *, device: str = "cpu",
             guide=None) -> "MRVI":
        """Load a model saved by :meth:`save`.

        ``adata`` must have the saved genes (same order) and no sample, nuisance or label
        category the model was not trained on; without ``adata`` the saved ``adata.h5ad`` is
        used. ``adata`` is not modified.

        The module class, guide and components (likelihood, sample mapper, prior) named in
        ``model.json`` are looked up among those registered in this process
        (:mod:`mrvi_pyro.components`): import or register custom ones before loading. Nothing is
        imported because a model file names it. ``guide`` overrides the saved guide; it is
        needed for a model trained with an unregistered guide.
        """
        import anndata

        state_dict, metadata, adata_path = read_model(dir_path)
        registry, init_params = _saved_configuration(metadata, dir_path)
        module_cls, guide = _saved_components(cls, metadata, init_params, guide, dir_path)
        # Sizes come from a JSON file: build the module on the meta device (no memory), compare
        # its shapes with the weights, then give it the loaded tensors (built once).
        arguments = {k: v for k, v in init_params.items() if k not in FACADE_ARGUMENTS}
        try:
            with torch.device("meta"), _SkipRandomFillOnMeta():
                module = module_cls.from_config(registry, guide=guide, **arguments)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{dir_path}/model.json has an invalid configuration: {err}") from None
        if metadata.get("format_version", 1) < 2:
            state_dict = module.upgrade_state_dict(state_dict)
        expected = module.state_dict()
        wrong = [k for k in expected if k not in state_dict or tuple(state_dict[k].shape) != tuple(expected[k].shape)]
        wrong += [k for k in state_dict if k not in expected]
        if wrong:
            raise ValueError(
                f"The weights in {dir_path} do not fit the configuration in its model.json (mismatched or "
                f"missing: {wrong[:5]}); the files are not from one save."
            )
        if adata is None:
            if adata_path is None:
                raise ValueError(f"{dir_path} has no saved AnnData; pass the AnnData with `adata=`.")
            adata = anndata.read_h5ad(adata_path)
        model = cls.__new__(cls)
        model.registry, model.adata, model._data_cache = registry, adata, None
        model._cell_data(adata, purpose="check")  # counts, genes and categories must fit
        model.init_params = init_params
        model.scale_observations = bool(model.init_params.get("scale_observations", False))
        try:
            module.load_state_dict(state_dict, assign=True)
        except RuntimeError as err:
            raise ValueError(f"The weights in {dir_path} do not fit the saved configuration: {err}") from None
        _check_materialised(module)
        model.module = module.to(resolve_device(device)).eval()
        model.sample_info = build_sample_info(adata, registry)
        model.history = history_from_json(metadata.get("history"))
        model.training_result = None
        model._split = split_from_json(metadata.get("split"), f"{dir_path}/model.json")
        model.is_trained = bool(metadata.get("is_trained", False))
        model.diverged = metadata.get("diverged")
        return model

    def __repr__(self) -> str:
        r = self.registry
        prior = prior_name(self.init_params.get("u_prior"), self.init_params["u_prior_mixture"])
        lines = [
            f"MRVI (mrvi_pyro {__version__}): {'trained' if self.is_trained else 'not trained'}",
            f"  data: {len(r.var_names)} genes; samples {r.n_samples} ({r.sample_key!r}); "
            f"nuisance levels {r.n_batches} ({r.batch_key!r}); labels {r.n_labels} ({r.labels_key!r})",
            f"  latent: u {self.init_params['n_latent_u']}-d, z {self.init_params['n_latent']}-d; "
            f"prior: {_PRIOR_NAMES.get(prior, prior)}; "
            f"likelihood: {self.init_params['likelihood']}; parameters: {self.module.n_parameters():,}",
        ]
        if self.history is not None and len(self.history):
            last = self.history.iloc[-1]
            val = f", validation {last['elbo_validation']:.2f}" if "elbo_validation" in last else ""
            lines.append(f"  trained {len(self.history)} epochs; last -ELBO/cell: train {last['elbo_train']:.2f}{val}")
        return "\n".join(lines)


MRVI.__doc__ = _insert_parameter_docs(MRVI.__doc__, "{module_parameters}", MrVIModule,
                                      skip=("n_genes", "n_samples", "n_batches", "n_labels", "guide"))
