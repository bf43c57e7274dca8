"""The earlier name of :mod:`mrvi_pyro.pl`: the same function objects, so code written against
``mrvi_pyro.plotting`` keeps working. New code: ``import mrvi_pyro.pl as pl``."""

from .pl import *  # noqa: F403
from .pl import __all__  # noqa: F401
