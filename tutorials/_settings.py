"""Sizes shared by the tutorials: full by default, tiny when ``MRVI_TUTORIAL_FAST=1``.

The stored notebook outputs come from the full settings. The test suite
(``tests/test_tutorials.py``) executes every notebook with ``MRVI_TUTORIAL_FAST=1`` so that a
broken notebook fails CI within seconds; the numbers it then prints are meaningless.

Import it from a notebook in this folder (Jupyter starts notebooks with the notebook's folder
as working directory)::

    from _settings import FAST, N_CELLS, MAX_EPOCHS
"""

import os
import warnings

FAST: bool = os.environ.get("MRVI_TUTORIAL_FAST", "").strip().lower() in {"1", "true", "yes"}
"""True when ``MRVI_TUTORIAL_FAST`` is ``1`` (or ``true``/``yes``)."""

SEED: int = 0
"""Seed of the simulation, the training (split, minibatches, draws) and every Monte Carlo draw."""

INIT_SEED: int = 0
"""Seed of the network initialisation: ``MRVI(adata, seed=INIT_SEED)`` (tutorial 1 shows why an
initialisation can matter: on this cohort, seed 1 keeps the disease effect of ``type_0`` in u).
Every seed is passed as an argument; only Pyro's own ``Predictive`` and loss draws, which have no
seed argument, are seeded with ``pyro.set_rng_seed``."""

N_CELLS: int = 400 if FAST else 3000
N_GENES: int = 200
N_SAMPLES: int = 12
"""Size of the simulated cohort (:func:`mrvi_pyro.datasets.simulate`)."""

MAX_EPOCHS: int = 3 if FAST else 60
BATCH_SIZE: int = 128
"""Training length and minibatch size."""

N_DRAWS: int = 5 if FAST else 100
"""Posterior draws for Monte Carlo summaries (posterior predictive checks, uncertainty)."""

# tqdm.auto warns at import time when ipywidgets is missing; the tutorials train without a
# progress bar, so the warning is noise in the stored outputs.
warnings.filterwarnings("ignore", message="IProgress not found")


def summary() -> str:
    """One line describing the active settings."""
    mode = "FAST (test-suite) settings" if FAST else "full settings"
    return (
        f"{mode}: {N_CELLS} cells, {N_GENES} genes, {N_SAMPLES} samples; "
        f"{MAX_EPOCHS} epochs (batch size {BATCH_SIZE}); {N_DRAWS} posterior draws"
    )

VARIANT_N_CELLS: int = 400 if FAST else 1500
VARIANT_MAX_EPOCHS: int = 2 if FAST else 40
"""Cohort size and training length of each model variant in tutorial 3 (several models are trained)."""
