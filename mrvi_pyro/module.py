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
"""

from __future__ import annotations

from typing import Any

import torch
from pyro import distributions as dist
from torch import nn

from . import distributions as mdist
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
LIKELIHOODS = ("nb", "poisson")
ARCHITECTURE = 2
"""Architecture version of new models (2). 3: as 2, with the attention lifts in the reference's
product form (a bias-free token lift times ``nn.MultiheadAttention``'s input projection; the
keys and values share one token lift): the same function class, trained differently; on the
weak-effect benchmark (5 seeds) it was no better than 2, so it is not the default
(``benchmarks/README.md``). 2: the reference's blocks (residual MLPs with layer
norms in the attention blocks, the reference's encoder blocks, ``z_base`` with bias, inverse
dispersion initialised at ``exp(N(0, 1))``) with one linear map per lift. 1: models saved before
version 2 (files without the field load as 1). Every version loads and computes what it
computed when it was saved."""
ARCHITECTURES = (1, 2, 3)
SAMPLE_MAPPERS = ("attention", "mlp", "linear")


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


def build_sample_mapper(kind: str, n_latent_u: int, n_latent: int, n_samples: int, options: dict,
                        architecture: int = ARCHITECTURE) -> nn.Module:
    """The sample mapper ``f_phi(u, s)`` of the given kind (``"attention"``, ``"mlp"``, ``"linear"``)."""
    if kind == "attention":
        attention = {k: v for k, v in options.items() if k not in ("embedding_dim", "stop_gradients")}
        attention["mlp"] = attention_mlp(architecture)
        attention["lift"] = attention_lift(architecture)
        return SampleMapper(n_latent_u, n_latent, n_samples, embedding_dim=options["embedding_dim"],
                            stop_gradients=options["stop_gradients"], **attention)
    if not options["use_map"]:
        raise ValueError(f"qz_kwargs use_map=False needs sample_mapper='attention', not {kind!r}.")
    if kind == "mlp":
        return MLPSampleMapper(n_latent_u, n_latent, n_samples, embedding_dim=options["embedding_dim"],
                               n_hidden=options["n_hidden"], stop_gradients=options["stop_gradients"])
    return LinearSampleMapper(n_latent_u, n_latent, n_samples, stop_gradients=options["stop_gradients"])


class MrVIModule(nn.Module):
    """Networks and parameters of MrVI.

    Parameters
    ----------
    n_genes, n_samples, n_batches
        Data dimensions (``n_batches=1`` means no nuisance covariate).
    n_labels
        Number of cell-type labels (0: no labels). With labels, the mixture prior has one
        component per label and is label-guided per cell.
    n_latent, n_latent_u
        Dimensions of ``z`` and ``u``.
    encoder_n_hidden, encoder_n_layers
        Encoder width and depth.
    z_u_prior
        Keep the ``log p(z | u)`` term (False masks it).
    z_u_prior_scale
        Log standard deviation of ``z | u`` (0 -> 1).
    u_prior_scale
        Log standard deviation of the isotropic prior (``u_prior_mixture=False``).
    u_prior_mixture, u_prior_mixture_k
        Mixture-of-Gaussians prior and its number of components (without labels).
    learn_z_u_prior_scale
        Learn the ``z | u`` scale (one per latent dimension).
    likelihood
        ``"nb"`` (negative binomial, default) or ``"poisson"``.
    sample_mapper
        ``f_phi(u, s)``: ``"attention"`` (default, as the reference), ``"mlp"`` or ``"linear"``
        (see :mod:`mrvi_pyro.nn`). Any module with the same call signature can be assigned to
        ``module.sample_mapper`` afterwards.
    guide
        The guide program (default :func:`mrvi_pyro.guide.guide`); a custom guide takes the
        same arguments and must keep the sites ``u`` and ``z``.
    qu_kwargs, qz_kwargs, px_kwargs
        Block options of the encoder, the sample mapper and the decoder (see the ``*_KWARGS``
        defaults in this module).
    architecture
        Version of the network blocks (:data:`ARCHITECTURE` for new models; 1 rebuilds models
        saved before version 2).
    """

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
        qu_kwargs: dict | None = None,
        qz_kwargs: dict | None = None,
        px_kwargs: dict | None = None,
        guide=None,
        architecture: int = ARCHITECTURE,
    ):
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise ValueError(
                f"architecture={architecture!r} is not known to this mrvi_pyro (known: {ARCHITECTURES}); "
                "a model saved by a newer version needs that version."
            )
        self.guide_program = guide_program if guide is None else guide
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood={likelihood!r} is not supported; use one of {LIKELIHOODS}.")
        if sample_mapper not in SAMPLE_MAPPERS:
            raise ValueError(f"sample_mapper={sample_mapper!r} is not supported; use one of {SAMPLE_MAPPERS}.")
        qu = resolve_kwargs("qu_kwargs", qu_kwargs, QU_KWARGS)
        qz = resolve_kwargs("qz_kwargs", qz_kwargs, QZ_KWARGS)
        px = resolve_kwargs("px_kwargs", px_kwargs, PX_KWARGS)
        self.config: dict[str, Any] = dict(
            n_genes=n_genes, n_samples=n_samples, n_batches=n_batches, n_labels=n_labels,
            n_latent=n_latent, n_latent_u=n_latent_u, encoder_n_hidden=encoder_n_hidden,
            encoder_n_layers=encoder_n_layers, z_u_prior=z_u_prior, z_u_prior_scale=z_u_prior_scale,
            u_prior_scale=u_prior_scale, u_prior_mixture=u_prior_mixture,
            u_prior_mixture_k=u_prior_mixture_k, learn_z_u_prior_scale=learn_z_u_prior_scale,
            likelihood=likelihood, sample_mapper=sample_mapper, qu_kwargs=qu, qz_kwargs=qz, px_kwargs=px,
            architecture=architecture,
        )
        self.n_samples, self.n_batches, self.n_labels = n_samples, n_batches, n_labels
        self.z_u_prior, self.likelihood = z_u_prior, likelihood
        self.u_prior_mixture = u_prior_mixture

        self.encoder = EncoderU(
            n_genes, n_latent_u, n_samples, n_hidden=encoder_n_hidden, n_layers=encoder_n_layers,
            n_residual=qu["n_residual"], architecture=architecture,
        )
        self.sample_mapper = build_sample_mapper(sample_mapper, n_latent_u, n_latent, n_samples, qz, architecture)
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
        n_components = n_labels if n_labels > 0 else u_prior_mixture_k
        if u_prior_mixture:
            self.prior_logits = nn.Parameter(torch.zeros(n_components))
            self.prior_means = nn.Parameter(torch.randn(n_components, n_latent_u))
            self.prior_log_scales = nn.Parameter(torch.zeros(n_components, n_latent_u))
        self.register_buffer("u_prior_log_scale", torch.full((n_latent_u,), float(u_prior_scale)))

    # ----- pieces of the generative model -------------------------------------------------
    @property
    def theta(self) -> torch.Tensor:
        """Gene-level inverse dispersion ``r_g``."""
        return self.log_theta.exp()

    @property
    def z_u_scale(self) -> torch.Tensor:
        """Standard deviation of ``z | u``."""
        return self.z_u_log_scale.exp()

    def u_prior(self, label_index: torch.Tensor | None = None):
        """Prior on ``u``: mixture (label-guided per cell when labels are given) or isotropic."""
        if not self.u_prior_mixture:
            scale = self.u_prior_log_scale.exp()
            return dist.Normal(torch.zeros_like(scale), scale).to_event(1)
        labels = label_index if self.n_labels > 0 else None
        return mdist.mixture_of_gaussians(self.prior_logits, self.prior_means, self.prior_log_scales, labels)

    def z_base(self, u: torch.Tensor) -> torch.Tensor:
        """Sample-unaware part of ``z``: identity when L == L_u, else a learned linear map."""
        return self.z_base_map(u)

    def decode(self, z: torch.Tensor, batch_index: torch.Tensor) -> torch.Tensor:
        """Log normalised expression ``log h`` (..., G)."""
        return self.decoder(z, batch_index)

    def observation_distribution(self, log_mu: torch.Tensor):
        """Likelihood of the counts given their log mean (..., G)."""
        if self.likelihood == "poisson":
            return mdist.poisson_log_mean(log_mu)
        return mdist.NegativeBinomialLogMean(log_mu, self.theta)

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


__all__ = ["ARCHITECTURE", "MrVIModule", "default_max_epochs", "resolve_kwargs"]
