"""``MrVIModule``: owns the networks and parameters of MrVI and exposes the analysis protocol.

The module is a plain ``torch.nn.Module`` (its parameters never touch Pyro's global parameter
store, so several models live side by side and ``state_dict`` is the whole model). Its
``model``/``guide`` methods call the explicit programs in :mod:`mrvi_pyro.model` and
:mod:`mrvi_pyro.guide`.

Analyses only use this small protocol, so a variant that implements it gets every analysis:

- ``encode_u(x, sample_index) -> (loc, scale)`` -- the posterior ``q(u | x, s)``;
- ``counterfactual_z(u, sample_index=None) -> (..., S, L)`` -- ``z`` of ``u`` under every sample
  (or under the given samples, broadcasting);
- ``decode(z, batch_index) -> (..., G)`` -- log normalised expression;
- ``z_base(u)`` and ``sample_offset(u, sample_index)``.

Extension points: the count likelihood, the sample mapper and the prior on ``u`` are named
components built by registered factories (:mod:`mrvi_pyro.components`; the built-ins below are
registered the same way), the guide is any registered program, and a subclass of
:class:`MrVIModule` can add parameters and override methods (``MRVI._module_cls``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from pyro import distributions as dist
from torch import nn

from . import distributions as mdist
from .components import GUIDES, LIKELIHOODS, MODULE_CLASSES, PRIORS, SAMPLE_MAPPERS
from .guide import guide as guide_program
from .model import model as model_program
from .nn import DecoderX, EncoderU, LinearSampleMapper, MLPSampleMapper, SampleMapper

QU_KWARGS = {"n_residual": 2}
QZ_KWARGS = {
    "use_map": True,
    "stop_gradients": False,
    "stop_gradients_mlp": True,
    "dropout_rate": 0.03,
    "embedding_dim": 16,
    "n_channels": 8,
    "n_heads": 2,
    "n_hidden": 32,
}
PX_KWARGS = {
    "low_dim_batch": True,
    "stop_gradients": False,
    "stop_gradients_mlp": True,
    "dropout_rate": 0.03,
    "embedding_dim": 16,
    "n_channels": 8,
    "n_heads": 2,
    "n_hidden": 32,
}
ARCHITECTURE = 3
"""Architecture version of new models (3). 3: the reference's blocks (residual MLPs with layer
norms in the attention blocks, the reference's encoder blocks, ``z_base`` with bias, inverse
dispersion initialised at ``exp(N(0, 1))``) and the reference's attention lifts in product form
(a bias-free token lift times ``nn.MultiheadAttention``'s input projection; the keys and values
share one token lift). 2: the same blocks with one linear map per lift: the same function class,
trained differently (Adam moves the product's effective lift several times further per step);
the default until stop 30, when the product form separated the weak disease effect on more seeds
at batch 128 (``benchmarks/README.md``, stops 29-30). 1: models saved before version 2 (files
without the field load as 1). Every version loads and computes what it computed when it was
saved."""
ARCHITECTURES = (1, 2, 3)
DIMENSIONS = ("n_genes", "n_samples", "n_batches", "n_labels")
"""The data dimensions every module class takes first (from the data registry)."""


def resolve_kwargs(name: str, given: dict | None, defaults: dict) -> dict:
    """Merge user block options into the defaults; an unknown key is a ``ValueError``."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(
            f"Unknown key(s) {unknown} in {name}. Allowed keys: {sorted(defaults)}."
        )
    return {**defaults, **given}


def attention_mlp(architecture: int) -> str:
    """The attention blocks' MLP kind of an architecture version."""
    return "simple" if architecture == 1 else "resnet"


def attention_lift(architecture: int) -> str:
    """How the attention blocks lift tokens to q/k/v in an architecture version."""
    return "product" if architecture >= 3 else "single"


_INT_ARGUMENTS = {"n_latent": 1, "n_latent_u": 1, "encoder_n_hidden": 1, "encoder_n_layers": 0, "u_prior_mixture_k": 1}
_FLOAT_ARGUMENTS = ("z_u_prior_scale", "u_prior_scale")
_BOOL_ARGUMENTS = ("z_u_prior", "u_prior_mixture", "learn_z_u_prior_scale")
_DICT_ARGUMENTS = ("qu_kwargs", "qz_kwargs", "px_kwargs")


def check_arguments(params: dict) -> None:
    """``ValueError`` naming the first constructor argument of the wrong type or size."""
    for name, minimum in _INT_ARGUMENTS.items():
        value = params.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}.")
    for name in _FLOAT_ARGUMENTS:
        value = params.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not np.isfinite(value):
            raise ValueError(f"{name} must be a finite number (a log-scale); got {value!r}.")
    for name in _BOOL_ARGUMENTS:
        if not isinstance(params.get(name), (bool, np.bool_)):
            raise ValueError(f"{name} must be True or False; got {params.get(name)!r}.")
    for name in _DICT_ARGUMENTS:
        if params.get(name) is not None and not isinstance(params[name], dict):
            raise ValueError(f"{name} must be a dict or None; got {type(params[name]).__name__}.")
    for name in ("likelihood", "sample_mapper"):
        if not isinstance(params.get(name), str):
            raise ValueError(f"{name} must be a string (a registered name); got {params.get(name)!r}.")
    if params.get("u_prior") is not None and not isinstance(params["u_prior"], str):
        raise ValueError(f"u_prior must be None or a string (a registered name); got {params['u_prior']!r}.")
    if params.get("architecture") not in ARCHITECTURES:
        raise ValueError(
            f"architecture={params.get('architecture')!r} is not known to this mrvi_pyro (known: {ARCHITECTURES}); "
            "a model saved by a newer version needs that version."
        )


def prior_name(u_prior: str | None, u_prior_mixture: bool) -> str:
    """The registered prior of the arguments: ``u_prior`` if given, else scvi-tools' switch
    ``u_prior_mixture`` between ``"mixture"`` and ``"normal"``."""
    if u_prior is None:
        return "mixture" if u_prior_mixture else "normal"
    if not u_prior_mixture and u_prior != "normal":
        raise ValueError(
            f"u_prior={u_prior!r} and u_prior_mixture=False disagree; give u_prior only (u_prior_mixture=False "
            "means u_prior='normal')."
        )
    return u_prior


def data_dimensions(registry_or_dims) -> dict[str, int]:
    """``n_genes``, ``n_samples``, ``n_batches``, ``n_labels`` of a data registry
    (:class:`mrvi_pyro.data.Registry`) or of a mapping with those keys (the last two optional)."""
    if isinstance(registry_or_dims, Mapping):
        unknown = sorted(set(registry_or_dims) - set(DIMENSIONS))
        missing = [k for k in DIMENSIONS[:2] if k not in registry_or_dims]
        if unknown or missing:
            raise ValueError(
                f"Dimensions must be a mapping with keys {list(DIMENSIONS)} (the last two optional); "
                f"unknown {unknown}, missing {missing}."
            )
        return {"n_batches": 1, "n_labels": 0, **registry_or_dims}
    if all(hasattr(registry_or_dims, name) for name in ("var_names", "n_samples", "n_batches", "n_labels")):
        r = registry_or_dims
        return {"n_genes": len(r.var_names), "n_samples": r.n_samples, "n_batches": r.n_batches,
                "n_labels": r.n_labels}
    raise TypeError(
        "registry_or_dims must be a data registry (mrvi_pyro.data.get_registry(adata)) or a mapping with keys "
        f"{list(DIMENSIONS)}; got {type(registry_or_dims).__name__}."
    )


def build_component(kind: str, factory, config: dict) -> nn.Module:
    """``factory(config)``, which must be a ``torch.nn.Module`` (``TypeError`` otherwise)."""
    component = factory(config)
    if not isinstance(component, nn.Module):
        raise TypeError(
            f"The {kind} factory registered as {config[kind]!r} must return a torch.nn.Module; "
            f"got {type(component).__name__}."
        )
    return component


# ----- built-in components (registered below, as user components are) --------------------------
class NegativeBinomialLikelihood(nn.Module):
    """``x ~ NB(mean exp(log_mu), inverse dispersion theta)`` (``likelihood="nb"``, the default)."""

    def __init__(self, config: Mapping | None = None):
        super().__init__()

    def forward(self, log_mu: torch.Tensor, theta: torch.Tensor):
        return mdist.NegativeBinomialLogMean(log_mu, theta)


class PoissonLikelihood(nn.Module):
    """``x ~ Poisson(exp(log_mu))``, no over-dispersion (``likelihood="poisson"``)."""

    def __init__(self, config: Mapping | None = None):
        super().__init__()

    def forward(self, log_mu: torch.Tensor, theta: torch.Tensor | None = None):
        return mdist.poisson_log_mean(log_mu)


class MixturePrior(nn.Module):
    """Learned mixture of diagonal Gaussians on ``u`` (``u_prior="mixture"``, the default): one
    component per label when labels are registered (then label-guided per cell), else
    ``u_prior_mixture_k`` (see :func:`mrvi_pyro.distributions.mixture_of_gaussians`)."""

    def __init__(self, config: Mapping):
        super().__init__()
        n_components = config["n_labels"] if config["n_labels"] > 0 else config["u_prior_mixture_k"]
        self.label_guided = config["n_labels"] > 0
        self.logits = nn.Parameter(torch.zeros(n_components))
        self.means = nn.Parameter(torch.randn(n_components, config["n_latent_u"]))
        self.log_scales = nn.Parameter(torch.zeros(n_components, config["n_latent_u"]))

    def forward(self, label_index: torch.Tensor | None = None):
        labels = label_index if self.label_guided else None
        return mdist.mixture_of_gaussians(self.logits, self.means, self.log_scales, labels)


class NormalPrior(nn.Module):
    """Isotropic ``u ~ N(0, exp(u_prior_scale)^2 I)`` (``u_prior="normal"``, ``u_prior_mixture=False``)."""

    def __init__(self, config: Mapping):
        super().__init__()
        self.register_buffer("log_scale", torch.full((config["n_latent_u"],), float(config["u_prior_scale"])))

    def forward(self, label_index: torch.Tensor | None = None):
        scale = self.log_scale.exp()
        return dist.Normal(torch.zeros_like(scale), scale).to_event(1)


def attention_sample_mapper(config: Mapping) -> nn.Module:
    """``sample_mapper="attention"`` (the reference's): :class:`mrvi_pyro.nn.SampleMapper`."""
    options = config["qz_kwargs"]
    attention = {k: v for k, v in options.items() if k not in ("embedding_dim", "stop_gradients")}
    attention["mlp"] = attention_mlp(config["architecture"])
    attention["lift"] = attention_lift(config["architecture"])
    return SampleMapper(config["n_latent_u"], config["n_latent"], config["n_samples"],
                        embedding_dim=options["embedding_dim"], stop_gradients=options["stop_gradients"], **attention)


def _check_map(config: Mapping, kind: str) -> None:
    if not config["qz_kwargs"]["use_map"]:
        raise ValueError(f"qz_kwargs use_map=False needs sample_mapper='attention', not {kind!r}.")


def mlp_sample_mapper(config: Mapping) -> nn.Module:
    """``sample_mapper="mlp"``: :class:`mrvi_pyro.nn.MLPSampleMapper`."""
    _check_map(config, "mlp")
    options = config["qz_kwargs"]
    return MLPSampleMapper(config["n_latent_u"], config["n_latent"], config["n_samples"],
                           embedding_dim=options["embedding_dim"], n_hidden=options["n_hidden"],
                           stop_gradients=options["stop_gradients"])


def linear_sample_mapper(config: Mapping) -> nn.Module:
    """``sample_mapper="linear"``: :class:`mrvi_pyro.nn.LinearSampleMapper`."""
    _check_map(config, "linear")
    return LinearSampleMapper(config["n_latent_u"], config["n_latent"], config["n_samples"],
                              stop_gradients=config["qz_kwargs"]["stop_gradients"])


LIKELIHOODS.register("nb", NegativeBinomialLikelihood, builtin=True)
LIKELIHOODS.register("poisson", PoissonLikelihood, builtin=True)
SAMPLE_MAPPERS.register("attention", attention_sample_mapper, builtin=True)
SAMPLE_MAPPERS.register("mlp", mlp_sample_mapper, builtin=True)
SAMPLE_MAPPERS.register("linear", linear_sample_mapper, builtin=True)
PRIORS.register("mixture", MixturePrior, builtin=True)
PRIORS.register("normal", NormalPrior, builtin=True)
GUIDES.register("mrvi", guide_program, builtin=True)

LEGACY_KEYS = {"prior_logits": "u_prior.logits", "prior_means": "u_prior.means",
               "prior_log_scales": "u_prior.log_scales", "u_prior_log_scale": "u_prior.log_scale"}
"""State-dict keys of model files of format 1 -> their keys now (the prior became a component)."""


class MrVIModule(nn.Module):
    """Networks and parameters of MrVI.

    This constructor's signature is the one list of the model's arguments: :class:`mrvi_pyro.MRVI`
    passes its keyword arguments here through :meth:`from_config`.

    Parameters
    ----------
    n_genes, n_samples, n_batches
        Data dimensions (``n_batches=1`` means no nuisance covariate).
    n_labels
        Number of cell-type labels (0: no labels). With labels, the mixture prior has one
        component per label and is label-guided per cell.
    n_latent, n_latent_u
        Dimensions of the sample-aware ``z`` and the sample-unaware ``u``.
    encoder_n_hidden, encoder_n_layers
        Width and depth of the u-encoder.
    z_u_prior
        Keep the ``log p(z | u)`` term (False masks it).
    z_u_prior_scale
        Log standard deviation of ``z | u`` (0 -> 1).
    u_prior_scale
        Log standard deviation of the isotropic prior (``u_prior="normal"``).
    u_prior_mixture, u_prior_mixture_k
        Mixture-of-Gaussians prior on ``u`` (one component per label when labels are registered,
        else ``u_prior_mixture_k``); False gives an isotropic normal. scvi-tools' switch between
        the priors ``"mixture"`` and ``"normal"``; ``u_prior`` takes precedence.
    learn_z_u_prior_scale
        Learn the ``z | u`` scale (one per latent dimension).
    likelihood
        Name of a registered count likelihood: ``"nb"`` (negative binomial, default),
        ``"poisson"``, or one added with :func:`mrvi_pyro.register_likelihood`.
    sample_mapper
        Name of a registered ``f_phi(u, s)``: ``"attention"`` (default, as the reference),
        ``"mlp"``, ``"linear"`` (see :mod:`mrvi_pyro.nn`), or one added with
        :func:`mrvi_pyro.register_sample_mapper`.
    u_prior
        Name of a registered prior on ``u``: ``"mixture"``, ``"normal"`` or one added with
        :func:`mrvi_pyro.register_prior`. None (default): decided by ``u_prior_mixture``.
    qu_kwargs, qz_kwargs, px_kwargs
        Options of the encoder, the sample mapper (``use_map``, ``stop_gradients``,
        ``stop_gradients_mlp``, ``dropout_rate``, ...) and the decoder (also ``low_dim_batch``);
        see the ``*_KWARGS`` defaults in this module. Unknown keys raise a ``ValueError`` listing
        the allowed ones.
    guide
        The guide program: a function with the signature of :func:`mrvi_pyro.guide.guide` that
        keeps the sites ``u`` and ``z``, or the name it was registered under
        (:func:`mrvi_pyro.register_guide`); None: the MrVI guide. A registered guide is saved by
        name with the model.
    architecture
        Version of the network blocks (:data:`ARCHITECTURE` for new models; 1 rebuilds models
        saved before version 2).

    Notes
    -----
    Every subclass is registered by name (``"<module>.<qualname>"``) when its class statement
    runs, so that :meth:`mrvi_pyro.MRVI.load` can rebuild a model saved with it once the code
    that defines it has been imported (a model file never makes anything be imported).
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        MODULE_CLASSES.register(f"{cls.__module__}.{cls.__qualname__}", cls)

    def __init__(
        self,
        n_genes: int,
        n_samples: int,
        n_batches: int = 1,
        n_labels: int = 0,
        *,
        n_latent: int = 30,
        n_latent_u: int = 10,
        encoder_n_hidden: int = 128,
        encoder_n_layers: int = 2,
        z_u_prior: bool = True,
        z_u_prior_scale: float = 0.0,
        u_prior_scale: float = 0.0,
        u_prior_mixture: bool = True,
        u_prior_mixture_k: int = 20,
        learn_z_u_prior_scale: bool = False,
        likelihood: str = "nb",
        sample_mapper: str = "attention",
        u_prior: str | None = None,
        qu_kwargs: dict | None = None,
        qz_kwargs: dict | None = None,
        px_kwargs: dict | None = None,
        guide=None,
        architecture: int = ARCHITECTURE,
    ):
        super().__init__()
        arguments = {k: v for k, v in locals().items() if k not in ("self", "__class__", "guide")}
        check_arguments(arguments)
        self.guide_program = GUIDES.get(guide) if isinstance(guide, str) else guide
        if self.guide_program is None:
            self.guide_program = guide_program
        if not callable(self.guide_program):
            raise TypeError(f"guide must be a function, a registered guide name or None; got {type(guide).__name__}.")
        likelihood_factory = LIKELIHOODS.get(likelihood)
        mapper_factory = SAMPLE_MAPPERS.get(sample_mapper)
        prior_factory = PRIORS.get(prior_name(u_prior, u_prior_mixture))
        self.config: dict[str, Any] = {
            **arguments, "u_prior": prior_name(u_prior, u_prior_mixture),
            "qu_kwargs": resolve_kwargs("qu_kwargs", qu_kwargs, QU_KWARGS),
            "qz_kwargs": resolve_kwargs("qz_kwargs", qz_kwargs, QZ_KWARGS),
            "px_kwargs": resolve_kwargs("px_kwargs", px_kwargs, PX_KWARGS),
        }
        qu, px = self.config["qu_kwargs"], self.config["px_kwargs"]
        self.n_samples, self.n_batches, self.n_labels = n_samples, n_batches, n_labels
        self.z_u_prior = z_u_prior

        # Built in this order so that a seed gives the same initial weights as before; the
        # components' slots come first so that the parameters keep their order too (the order in
        # which the gradient norm is summed, on which float rounding depends).
        self.register_module("likelihood", None)
        self.register_module("u_prior", None)
        self.encoder = EncoderU(
            n_genes, n_latent_u, n_samples, n_hidden=encoder_n_hidden, n_layers=encoder_n_layers,
            n_residual=qu["n_residual"], architecture=architecture,
        )
        self.sample_mapper = build_component("sample_mapper", mapper_factory, self.config)
        decoder_opts = {k: v for k, v in px.items() if k not in ("embedding_dim", "stop_gradients", "low_dim_batch")}
        decoder_opts["mlp"] = attention_mlp(architecture)
        decoder_opts["lift"] = attention_lift(architecture)
        self.decoder = DecoderX(
            n_latent, n_genes, n_batches, low_dim_batch=px["low_dim_batch"],
            embedding_dim=px["embedding_dim"], stop_gradients=px["stop_gradients"], **decoder_opts,
        )
        if n_latent != n_latent_u:
            self.z_base_map = nn.Linear(n_latent_u, n_latent, bias=architecture >= 2)
        else:
            self.z_base_map = nn.Identity()
        self.log_theta = nn.Parameter(torch.zeros(n_genes) if architecture == 1 else torch.randn(n_genes))
        z_scale = torch.full((n_latent,), float(z_u_prior_scale))
        if learn_z_u_prior_scale:
            self.z_u_log_scale = nn.Parameter(z_scale)
        else:
            self.register_buffer("z_u_log_scale", z_scale)
        self.likelihood = build_component("likelihood", likelihood_factory, self.config)
        self.u_prior = build_component("u_prior", prior_factory, self.config)

    @classmethod
    def from_config(cls, registry_or_dims, **params) -> "MrVIModule":
        """Build the module for a data registry (or its dimensions) with constructor arguments.

        The one construction path of :class:`mrvi_pyro.MRVI` (new models, and saved ones on
        load).

        Parameters
        ----------
        registry_or_dims
            A :class:`mrvi_pyro.data.Registry` (``mrvi_pyro.data.get_registry(adata)``) or a
            mapping with ``n_genes``, ``n_samples`` and optionally ``n_batches``, ``n_labels``.
        **params
            Keyword arguments of the constructor (of ``cls``).
        """
        return cls(**data_dimensions(registry_or_dims), **params)

    @classmethod
    def default_arguments(cls) -> dict[str, Any]:
        """The constructor's keyword arguments with their defaults (data dimensions and ``guide``
        excluded), read from the signatures of ``cls`` and its MrVIModule bases."""
        defaults: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            if not (issubclass(klass, MrVIModule) and "__init__" in vars(klass)):
                continue
            for name, p in inspect.signature(klass.__init__).parameters.items():
                if name in DIMENSIONS or name in ("self", "guide") or p.default is inspect.Parameter.empty:
                    continue
                defaults[name] = p.default
        return defaults

    def upgrade_state_dict(self, state_dict: dict) -> dict:
        """A ``state_dict`` of a format-1 model file with today's keys (:data:`LEGACY_KEYS`).

        The isotropic prior's scale was a buffer of every model; a mixture model drops it.
        """
        out = {}
        for key, value in state_dict.items():
            new = LEGACY_KEYS.get(key, key)
            if new == "u_prior.log_scale" and self.config["u_prior"] != "normal":
                continue
            out[new] = value
        return out

    # ----- pieces of the generative model -------------------------------------------------
    @property
    def theta(self) -> torch.Tensor:
        """Gene-level inverse dispersion ``r_g``."""
        return self.log_theta.exp()

    @property
    def z_u_scale(self) -> torch.Tensor:
        """Standard deviation of ``z | u``."""
        return self.z_u_log_scale.exp()

    def z_base(self, u: torch.Tensor) -> torch.Tensor:
        """Sample-unaware part of ``z``: identity when L == L_u, else a learned linear map."""
        return self.z_base_map(u)

    def decode(self, z: torch.Tensor, batch_index: torch.Tensor) -> torch.Tensor:
        """Log normalised expression ``log h`` (..., G)."""
        return self.decoder(z, batch_index)

    def observation_distribution(self, log_mu: torch.Tensor):
        """Likelihood of the counts given their log mean (..., G): the ``likelihood`` component."""
        return self.likelihood(log_mu, self.theta)

    # ----- pieces of the guide / analysis protocol ----------------------------------------
    def encode_u(self, x: torch.Tensor, sample_index: torch.Tensor):
        """``(loc, scale)`` of ``q(u | x, s)``."""
        return self.encoder(x, sample_index)

    def sample_offset(self, u: torch.Tensor, sample_index: torch.Tensor | None = None):
        """``f_phi(u, s)`` (or its ``(loc, scale)`` when the mapper is not MAP)."""
        return self.sample_mapper(u, sample_index)

    def counterfactual_z(self, u: torch.Tensor, sample_index: torch.Tensor | None = None) -> torch.Tensor:
        """Mean ``z`` of ``u`` (..., L_u) under every sample: shape (..., S, L).

        With ``sample_index`` (broadcastable with ``u.shape[:-1]``) the given samples are used
        instead and the shape is (..., L). The same ``u`` is used for every sample (paired).
        """
        offset = self.sample_offset(u, sample_index)
        if isinstance(offset, tuple):
            offset = offset[0]
        base = self.z_base(u)
        return (base if sample_index is not None else base.unsqueeze(-2)) + offset

    # ----- Pyro programs ------------------------------------------------------------------
    def model(self, *args, **kwargs):
        """The generative program :func:`mrvi_pyro.model.model` bound to this module."""
        return model_program(self, *args, **kwargs)

    def guide(self, *args, **kwargs):
        """The guide program (default :func:`mrvi_pyro.guide.guide`) bound to this module."""
        return self.guide_program(self, *args, **kwargs)

    def n_parameters(self) -> int:
        """Number of trainable scalars."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def default_max_epochs(n_cells: int) -> int:
    """The reference's default: ``min(round(20000 / N * 400), 400)``."""
    return int(min(round(20000 / max(n_cells, 1) * 400), 400))


MODULE_CLASSES.register("MrVIModule", MrVIModule, builtin=True)

__all__ = ["ARCHITECTURE", "MrVIModule", "default_max_epochs", "resolve_kwargs"]
