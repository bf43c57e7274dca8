"""Process-wide options of mrvi_pyro: :data:`settings` (``mrvi_pyro.settings``)."""

from __future__ import annotations

import os


class Settings:
    """Options that change the process rather than one call.

    Attributes
    ----------
    tune_malloc
        Let training and the analyses tune glibc's allocator (:func:`mrvi_pyro._malloc.tune_malloc`:
        freed blocks below 32 MB are reused instead of being returned to the operating system,
        10-20% faster training and distances on Linux). It changes the allocator of the **whole
        process** (a Jupyter kernel included) for the rest of its life, so library calls leave it
        off unless you set ``mrvi_pyro.settings.tune_malloc = True`` (or the environment variable
        ``MRVI_PYRO_TUNE_MALLOC=1``); the ``mrvi-pyro`` command line turns it on (its process is
        its own). ``MRVI_PYRO_TUNE_MALLOC=0`` turns it off everywhere.
    """

    __slots__ = ("_tune_malloc",)

    def __init__(self):
        self._tune_malloc = os.environ.get("MRVI_PYRO_TUNE_MALLOC", "") == "1"

    @property
    def tune_malloc(self) -> bool:
        return self._tune_malloc

    @tune_malloc.setter
    def tune_malloc(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"mrvi_pyro.settings.tune_malloc must be True or False; got {value!r}.")
        self._tune_malloc = value

    def __repr__(self) -> str:
        return f"mrvi_pyro.settings(tune_malloc={self.tune_malloc})"


settings = Settings()
