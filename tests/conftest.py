"""Shared fixtures: simulated data and one trained model per session (reused by many tests)."""

import numpy as np
import pyro
import pytest

import mrvi_pyro
from mrvi_pyro import MRVI


@pytest.fixture(autouse=True)
def _pyro_state():
    pyro.clear_param_store()
    with pyro.validation_enabled(True):
        yield


@pytest.fixture(autouse=True)
def _no_timed_thread_check(request, monkeypatch):
    """The check of torch's threads (mrvi_pyro._threads) times the work, so on a busy test machine
    it may warn; outside test_threads.py, which tests it, it is off so that no test depends on
    the machine's load."""
    if request.node.path.name != "test_threads.py":
        from mrvi_pyro import _threads

        monkeypatch.setattr(_threads, "warn_if_slowed", lambda *args, **kwargs: None)


@pytest.fixture(scope="session")
def sim_adata():
    """A simulated cohort (2,000 cells, 200 genes, 12 samples, 2 batches), registered."""
    adata = mrvi_pyro.datasets.simulate(n_cells=2000, n_genes=200, n_samples=12, seed=0)
    MRVI.setup_anndata(adata, sample_key="sample", batch_key="batch")
    return adata


@pytest.fixture(scope="session")
def trained_model(sim_adata):
    """MrVI trained for 60 epochs (batch 256) on ``sim_adata`` (shared; do not train it further).

    Its initialisation is seeded too, so it does not depend on which tests ran before it. (On
    this simulation, where every sample sits in one batch, about one initialisation in five of
    architecture 2 kept batch structure in u; with architecture 3, the default, none of
    initialisations 0-4 did: batch kNN accuracy in u 0.50-0.58, chance 0.5, stop 31.)"""
    model = MRVI(sim_adata, seed=1)
    model.train(max_epochs=60, batch_size=256, seed=0, progress_bar=False)
    return model


@pytest.fixture
def small_adata():
    """A tiny cohort (300 cells, 50 genes, 6 samples) for fast, throwaway models."""
    adata = mrvi_pyro.datasets.simulate(n_cells=300, n_genes=60, n_samples=6, seed=1, n_de_genes=10, n_group_genes=10)
    MRVI.setup_anndata(adata, sample_key="sample", batch_key="batch")
    return adata


def knn_accuracy(x: np.ndarray, labels: np.ndarray, k: int = 15) -> float:
    """Leave-one-out kNN majority-vote accuracy of ``labels`` in ``x``."""
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    return float(cross_val_score(KNeighborsClassifier(k), x, labels, cv=5).mean())
