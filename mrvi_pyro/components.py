"""Registries of model components: count likelihoods, sample mappers, priors on ``u``, guides and
module classes.

A model names its components (``MRVI(adata, likelihood="zinb")``); the name is looked up here
when the module is built, and saved in ``model.json``, so :meth:`mrvi_pyro.MRVI.load` rebuilds
the model from the components registered in the loading process. Nothing is ever imported
because a model file names it: a name that is not registered is a ``ValueError`` saying what to
register or import first. The built-in components are registered through the same functions
(:mod:`mrvi_pyro.module`).

Factories
---------
Likelihoods, sample mappers and priors are registered as **factories**: callables
``factory(config) -> torch.nn.Module`` that get the module's configuration -- a dict with the
data dimensions ``n_genes``, ``n_samples``, ``n_batches``, ``n_labels``, the latent sizes
``n_latent``, ``n_latent_u`` and every other constructor argument of
:class:`mrvi_pyro.MrVIModule` (block options resolved against their defaults, e.g.
``config["qz_kwargs"]["n_hidden"]``) -- and return a ``torch.nn.Module``. The module becomes a
submodule of the model (``module.likelihood``, ``module.sample_mapper``, ``module.u_prior``), so
its parameters are trained and saved with the model. Use :func:`functools.partial` to give a
factory options of its own. The returned modules are called as follows:

=================  ==========================================  ====================================
component          call                                        returns
=================  ==========================================  ====================================
likelihood         ``likelihood(log_mu, theta)``               distribution of the counts, batch
                                                               shape ``log_mu.shape`` (..., G),
                                                               mean ``exp(log_mu)``; ``theta`` is
                                                               the module's per-gene inverse
                                                               dispersion (G,), free to ignore
sample mapper      ``sample_mapper(u, sample_index=None)``     offset ``f(u, s)``: (..., S, L) for
                                                               every sample, (..., L) with an
                                                               index broadcastable with
                                                               ``u.shape[:-1]``; or a ``(loc,
                                                               scale)`` pair (a non-MAP ``z``)
prior              ``u_prior(label_index=None)``               distribution of ``u`` with event
                                                               shape (L_u,), batch shape () or
                                                               (n,) with labels
=================  ==========================================  ====================================

:func:`check_contract` checks a registered component against this contract (the test suite runs
it on every registered one).

Guides are registered as the guide function itself (the signature of :func:`mrvi_pyro.guide`),
module classes by subclassing :class:`mrvi_pyro.MrVIModule` (registered automatically under
``"<module>.<qualname>"`` when the class is defined).
"""

from __future__ import annotations

from collections.abc import Callable


class ComponentRegistry:
    """Names -> factories (or guides, or module classes) of one kind of component.

    Parameters
    ----------
    kind
        What is registered (``"likelihood"``, ...), used in error messages.
    register_hint
        How a user registers one, used in error messages.
    """

    def __init__(self, kind: str, register_hint: str):
        self.kind, self.register_hint = kind, register_hint
        self._entries: dict[str, Callable] = {}
        self._builtin: set[str] = set()

    def register(self, name: str, entry: Callable, *, overwrite: bool = False, builtin: bool = False) -> None:
        """Register ``entry`` under ``name``.

        A built-in name is never replaced. Another entry under a name already taken is a
        ``ValueError`` unless ``overwrite=True``, except a redefinition of the same function or
        class (same module and qualified name: a notebook cell run again).
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"A {self.kind} name must be a non-empty string; got {name!r}.")
        if not callable(entry):
            raise TypeError(f"The {self.kind} registered as {name!r} must be callable; got {type(entry).__name__}.")
        old = self._entries.get(name)
        if old is not None and old is not entry:
            if name in self._builtin:
                raise ValueError(f"{name!r} is a built-in {self.kind} and cannot be replaced; choose another name.")
            if not (overwrite or _same_definition(old, entry)):
                raise ValueError(
                    f"A different {self.kind} is already registered as {name!r} ({_describe(old)}); "
                    "choose another name, or pass overwrite=True to replace it."
                )
        self._entries[name] = entry
        if builtin:
            self._builtin.add(name)

    def get(self, name: str) -> Callable:
        """The entry registered as ``name``; ``ValueError`` listing the registered names if none."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ValueError(
                f"{self.kind} {name!r} is not registered; registered: {self.names()}. "
                f"{self.register_hint}"
            ) from None

    def name_of(self, entry) -> str | None:
        """The name ``entry`` is registered under (None if it is not)."""
        for name, registered in self._entries.items():
            if registered is entry:
                return name
        return None

    def names(self) -> list[str]:
        """Registered names, in registration order (built-ins first)."""
        return list(self._entries)

    def __contains__(self, name) -> bool:
        return name in self._entries

    def __repr__(self) -> str:
        return f"ComponentRegistry({self.kind!r}: {self.names()})"


def _same_definition(old, new) -> bool:
    return (getattr(old, "__module__", None), getattr(old, "__qualname__", None)) == (
        getattr(new, "__module__", None), getattr(new, "__qualname__", None))


def _describe(entry) -> str:
    return f"{getattr(entry, '__module__', '?')}.{getattr(entry, '__qualname__', type(entry).__name__)}"


LIKELIHOODS = ComponentRegistry(
    "likelihood", "Register it with mrvi_pyro.register_likelihood(name, factory) (or import the code that "
    "does) before building or loading the model.")
SAMPLE_MAPPERS = ComponentRegistry(
    "sample_mapper", "Register it with mrvi_pyro.register_sample_mapper(name, factory) (or import the code "
    "that does) before building or loading the model.")
PRIORS = ComponentRegistry(
    "u_prior", "Register it with mrvi_pyro.register_prior(name, factory) (or import the code that does) "
    "before building or loading the model.")
GUIDES = ComponentRegistry(
    "guide", "Register it with mrvi_pyro.register_guide(name, guide) (or import the code that does) before "
    "loading the model, or pass the guide function with guide=.")
MODULE_CLASSES = ComponentRegistry(
    "module class", "A MrVIModule subclass is registered when its class statement runs: import (or run) the "
    "code that defines it before loading the model.")


CONTRACT_KINDS = {"likelihood": LIKELIHOODS, "sample_mapper": SAMPLE_MAPPERS, "u_prior": PRIORS, "guide": GUIDES}
"""Kinds checked by :func:`check_contract` (the module constructor argument each is named by)."""


def register_likelihood(name: str, factory: Callable, *, overwrite: bool = False) -> None:
    """Register a count likelihood: ``factory(config) -> nn.Module`` called as
    ``likelihood(log_mu, theta)`` (see :mod:`mrvi_pyro.components`); then
    ``MRVI(adata, likelihood=name)``."""
    LIKELIHOODS.register(name, factory, overwrite=overwrite)


def register_sample_mapper(name: str, factory: Callable, *, overwrite: bool = False) -> None:
    """Register a sample mapper ``f(u, s)``: ``factory(config) -> nn.Module`` called as
    ``mapper(u, sample_index=None)`` (see :mod:`mrvi_pyro.components`); then
    ``MRVI(adata, sample_mapper=name)``."""
    SAMPLE_MAPPERS.register(name, factory, overwrite=overwrite)


def register_prior(name: str, factory: Callable, *, overwrite: bool = False) -> None:
    """Register a prior on ``u``: ``factory(config) -> nn.Module`` called as
    ``u_prior(label_index=None)`` (see :mod:`mrvi_pyro.components`); then
    ``MRVI(adata, u_prior=name)``."""
    PRIORS.register(name, factory, overwrite=overwrite)


def register_guide(name: str, guide: Callable, *, overwrite: bool = False) -> None:
    """Register a guide program (the signature of :func:`mrvi_pyro.guide`, sites ``u`` and ``z``).

    A model trained with a registered guide (``MRVI(adata, guide=name)`` or ``guide=function``)
    saves its name, and :meth:`mrvi_pyro.MRVI.load` finds it again without ``guide=``.
    """
    GUIDES.register(name, guide, overwrite=overwrite)


def check_contract(kind: str, name: str, *, n_cells: int = 5, seed: int = 0) -> None:
    """Check the component registered as ``name`` against the contract of its ``kind``.

    Builds a small :class:`mrvi_pyro.MrVIModule` (12 genes, 4 samples, 2 nuisance levels,
    ``L = 6``, ``L_u = 3``) with the component and checks, on ``n_cells`` random cells:

    - ``"likelihood"``: a distribution with batch shape (n, G) whose ``log_prob`` of counts is
      finite, of shape (n, G), and whose ``mean`` is ``exp(log_mu)``;
    - ``"sample_mapper"``: offsets (..., S, L) for ``sample_index=None`` and (..., L) with an
      index, the same values both ways, and extra leading dimensions broadcast;
    - ``"u_prior"``: a distribution with event shape (L_u,) whose ``log_prob`` of (n, L_u) values
      is finite with shape (n,), also label-guided (3 labels, a label per cell);
    - ``"guide"``: the sites ``u`` (n, L_u) and ``z`` (n, L).

    Raises
    ------
    ValueError
        Naming the broken rule (or an unknown ``kind`` / unregistered ``name``).
    """
    import torch
    from pyro import poutine

    from .module import MrVIModule

    if kind not in CONTRACT_KINDS:
        raise ValueError(f"kind must be one of {sorted(CONTRACT_KINDS)}; got {kind!r}.")
    CONTRACT_KINDS[kind].get(name)  # a clear error when it is not registered
    n_genes, n_samples, n_latent, n_latent_u = 12, 4, 6, 3

    def fail(rule: str):
        raise ValueError(f"The {kind} {name!r} breaks its contract: {rule}.")

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        module = MrVIModule(n_genes, n_samples, 2, n_latent=n_latent, n_latent_u=n_latent_u,
                            **{kind: name}).eval()
        n = n_cells
        if kind == "likelihood":
            log_mu = torch.randn(n, n_genes)
            counts = torch.poisson(log_mu.exp())
            d = module.likelihood(log_mu, module.theta)
            if tuple(d.batch_shape) != (n, n_genes):
                fail(f"batch shape {tuple(d.batch_shape)} instead of {(n, n_genes)}")
            lp = d.log_prob(counts)
            if tuple(lp.shape) != (n, n_genes) or not torch.isfinite(lp).all():
                fail("log_prob of counts must be finite with shape (n, G)")
            if not torch.allclose(d.mean, log_mu.exp(), rtol=1e-4, atol=1e-6):
                fail("its mean must equal exp(log_mu) (the decoder's expression is the mean count)")
        elif kind == "sample_mapper":
            u = torch.randn(n, n_latent_u)
            every = module.sample_mapper(u)
            every = every[0] if isinstance(every, tuple) else every
            if tuple(every.shape) != (n, n_samples, n_latent):
                fail(f"sample_index=None gives shape {tuple(every.shape)}, not (n, S, L) = {(n, n_samples, n_latent)}")
            index = torch.arange(n) % n_samples
            given = module.sample_mapper(u, index)
            given = given[0] if isinstance(given, tuple) else given
            if tuple(given.shape) != (n, n_latent):
                fail(f"a sample_index gives shape {tuple(given.shape)}, not (n, L) = {(n, n_latent)}")
            if not torch.allclose(given, every[torch.arange(n), index], rtol=1e-4, atol=1e-5):
                fail("the offset under a given sample must equal that sample's entry of the full (n, S, L)")
            extra = module.sample_mapper(u.expand(2, n, n_latent_u))
            extra = extra[0] if isinstance(extra, tuple) else extra
            if tuple(extra.shape) != (2, n, n_samples, n_latent):
                fail("leading dimensions of u must broadcast: (2, n, L_u) -> (2, n, S, L)")
        elif kind == "u_prior":
            labelled = MrVIModule(n_genes, n_samples, 2, 3, n_latent=n_latent, n_latent_u=n_latent_u,
                                  u_prior=name).eval()
            for prior, labels in ((module.u_prior, None), (labelled.u_prior, torch.arange(n) % 3)):
                d = prior(labels)
                if tuple(d.event_shape) != (n_latent_u,):
                    fail(f"event shape {tuple(d.event_shape)} instead of (L_u,) = {(n_latent_u,)}")
                lp = d.log_prob(torch.randn(n, n_latent_u))
                if tuple(lp.shape) != (n,) or not torch.isfinite(lp).all():
                    fail(f"log_prob of (n, L_u) values must be finite with shape (n,) (labels: {labels is not None})")
        else:
            x = torch.poisson(torch.full((n, n_genes), 3.0))
            sample_index, batch_index = torch.arange(n) % n_samples, torch.zeros(n, dtype=torch.long)
            trace = poutine.trace(module.guide).get_trace(x, sample_index, batch_index)
            for site, shape in (("u", (n, n_latent_u)), ("z", (n, n_latent))):
                if site not in trace.nodes or tuple(trace.nodes[site]["value"].shape) != shape:
                    fail(f"the site {site!r} must exist with shape {shape}")


def module_class_name(cls: type) -> str:
    """The name a module class is registered (and saved) under."""
    return MODULE_CLASSES.name_of(cls) or f"{cls.__module__}.{cls.__qualname__}"


__all__ = [
    "GUIDES", "LIKELIHOODS", "MODULE_CLASSES", "PRIORS", "SAMPLE_MAPPERS", "ComponentRegistry", "check_contract",
    "module_class_name",
    "register_guide", "register_likelihood", "register_prior", "register_sample_mapper",
]
