"""mrvi_pyro: MrVI (multi-resolution variational inference) as explicit Pyro programs.

Public names: :class:`MRVI` (the scvi-tools-compatible facade), the Pyro programs
:func:`model` and :func:`guide`, :class:`MrVIModule`, :func:`train_svi`, :mod:`datasets`
(simulated cohorts with planted truth) and :mod:`plotting` (``pl``); the registries of model
components :func:`register_likelihood`, :func:`register_sample_mapper`, :func:`register_prior`
and :func:`register_guide` (:mod:`mrvi_pyro.components`); process-wide options in :data:`settings`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mrvi-pyro")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.1.0"

from . import datasets  # noqa: E402
from ._settings import settings  # noqa: E402
from .api import MRVI  # noqa: E402
from .components import register_guide, register_likelihood, register_prior, register_sample_mapper  # noqa: E402
from .guide import guide  # noqa: E402
from .model import model  # noqa: E402
from .module import MrVIModule  # noqa: E402
from .train import TrainingDivergedError, TrainingResult, train_svi  # noqa: E402

__all__ = [
    "MRVI", "MrVIModule", "TrainingDivergedError", "TrainingResult", "__version__", "datasets", "guide",
    "model", "register_guide", "register_likelihood", "register_prior", "register_sample_mapper", "settings",
    "train_svi",
]
