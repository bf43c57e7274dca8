"""mrvi_pyro: MrVI (multi-resolution variational inference) as explicit Pyro programs.

Public names: :class:`MRVI` (the scvi-tools-compatible facade), the Pyro programs
:func:`model` and :func:`guide`, :class:`MrVIModule`, :func:`train_svi`, :mod:`datasets`
(simulated cohorts with planted truth) and :mod:`pl` (plotting, scanpy-style; also under its
earlier name :mod:`plotting`); the registries of model components :func:`register_likelihood`,
:func:`register_sample_mapper`, :func:`register_prior` and :func:`register_guide`
(:mod:`mrvi_pyro.components`); process-wide options in :data:`settings`.

Importing the package is cheap: every name is imported on first use (module ``__getattr__``),
so ``mrvi-pyro --help`` does not load torch or anndata.
"""

import sys
import types
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mrvi-pyro")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.1.0"

from ._settings import settings  # noqa: E402  (cheap: the standard library only)

_NAMES = {
    "MRVI": "api", "MrVIModule": "module", "TrainingDivergedError": "train", "TrainingResult": "train",
    "train_svi": "train", "register_guide": "components", "register_likelihood": "components",
    "register_prior": "components", "register_sample_mapper": "components",
}
"""Public classes and functions -> the submodule defining them."""

_SUBMODULES = (
    "admissibility", "api", "cli", "components", "da", "data", "datasets", "de", "distributions", "explore", "io",
    "module", "nn", "pipeline", "pl", "plotting", "posterior", "report", "train",
)

__all__ = [
    "MRVI", "MrVIModule", "TrainingDivergedError", "TrainingResult", "__version__", "datasets", "guide", "model",
    "pl", "plotting", "register_guide", "register_likelihood", "register_prior", "register_sample_mapper",
    "settings", "train_svi",
]


def __getattr__(name: str):
    if name in _NAMES:
        value = getattr(import_module(f".{_NAMES[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))


class _Package(types.ModuleType):
    """The package module, whose ``model`` and ``guide`` are the Pyro programs.

    Importing a submodule sets it as an attribute of its package, which would replace the
    programs by the submodules ``mrvi_pyro.model`` and ``mrvi_pyro.guide``; these properties
    keep answering with the programs (and ignore that assignment).
    """

    @property
    def model(self):
        return import_module(".model", __name__).model

    @model.setter
    def model(self, value):
        if not isinstance(value, types.ModuleType):
            raise AttributeError("mrvi_pyro.model is the Pyro program and cannot be replaced.")

    @property
    def guide(self):
        return import_module(".guide", __name__).guide

    @guide.setter
    def guide(self, value):
        if not isinstance(value, types.ModuleType):
            raise AttributeError("mrvi_pyro.guide is the Pyro program and cannot be replaced.")


sys.modules[__name__].__class__ = _Package
