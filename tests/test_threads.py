"""The check that torch's threads are not making training or an analysis slower than one thread.

What it measures is timing, so these tests fix the measurement (monkeypatched) to test the
decisions, and run the real measurement only to show it leaves no trace: the random state, the
thread count and the trained weights are the same with and without it. The timings themselves
are in benchmarks/contention.py.
"""

import warnings

import numpy as np
import pytest
import torch

from mrvi_pyro import MRVI, _threads


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fresh_checks(monkeypatch):
    """No remembered check, and no once-a-minute limit unless a test sets one."""
    monkeypatch.setattr(_threads, "_last", None)
    monkeypatch.setattr(_threads, "MIN_INTERVAL_S", 0.0)


def test_thread_slowdown_times_the_work_and_restores_threads_and_random_state(two_threads):
    calls = []

    def work():
        calls.append(torch.get_num_threads())
        return torch.rand(3)

    torch.manual_seed(0)
    expected = torch.rand(5)
    torch.manual_seed(0)
    ratio = _threads.thread_slowdown(work)
    assert ratio > 0
    assert torch.equal(torch.rand(5), expected)  # the work's draws left the stream where it was
    assert torch.get_num_threads() == 2
    assert calls == [2] + [1, 2] * _threads.REPEATS  # one untimed call, then alternated
    torch.set_num_threads(1)
    assert _threads.thread_slowdown(work) is None  # one thread: nothing to compare
    assert len(calls) == 1 + 2 * _threads.REPEATS


def test_warn_if_slowed_warns_from_the_threshold_and_at_most_once_a_minute(monkeypatch, fresh_checks):
    measured = []

    def fake(work):
        measured.append(work)
        return ratios.pop(0)

    monkeypatch.setattr(_threads, "thread_slowdown", fake)
    ratios = [3.0, 1.2, _threads.SLOWDOWN_RATIO]
    with pytest.warns(RuntimeWarning, match=r"Training runs 3\.0x slower with torch's \d+ threads.*"
                                             r"torch\.set_num_threads\(1\).*OMP_NUM_THREADS=1"):
        assert _threads.warn_if_slowed("Training", lambda: None) == 3.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _threads.warn_if_slowed("Training", lambda: None) == 1.2  # below: silent
    with pytest.warns(RuntimeWarning, match="1.5x slower"):
        _threads.warn_if_slowed("This analysis", lambda: None)
    assert len(measured) == 3
    monkeypatch.setattr(_threads, "MIN_INTERVAL_S", 60.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _threads.warn_if_slowed("Training", lambda: None) == _threads.SLOWDOWN_RATIO  # remembered
    assert len(measured) == 3


def _train(adata, epochs=3):
    model = MRVI(adata, seed=0)
    model.train(max_epochs=epochs, batch_size=128, seed=0, progress_bar=False)
    return model


def test_training_warns_once_when_its_threads_slow_it(small_adata, monkeypatch, fresh_checks):
    checked = []
    monkeypatch.setattr(_threads, "thread_slowdown", lambda work: checked.append(work()) or 3.0)
    with pytest.warns(RuntimeWarning, match="Training runs 3.0x slower") as caught:
        _train(small_adata)
    assert len([w for w in caught if "slower with torch's" in str(w.message)]) == 1
    assert len(checked) == 1  # the loss was computed for the check; once slowed, no more checks
    assert torch.isfinite(checked[0])
    monkeypatch.setattr(_threads, "thread_slowdown", lambda work: checked.append(work()) or 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _train(small_adata)
    assert len(checked) == 1 + 3  # not slowed: checked at the first step of every epoch


def test_the_real_check_leaves_training_and_analyses_unchanged(small_adata, monkeypatch, two_threads, fresh_checks):
    timed = []
    real = _threads.thread_slowdown
    monkeypatch.setattr(_threads, "thread_slowdown", lambda work: timed.append(1) or real(work))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a busy test machine may make it warn
        checked = _train(small_adata)
        u_checked = checked.get_latent_representation(batch_size=64)
    assert len(timed) >= 2  # training (every epoch until it warns: once on a busy machine) and the analysis
    monkeypatch.setattr(_threads, "warn_if_slowed", lambda *args, **kwargs: None)
    unchecked = _train(small_adata)
    state, other = checked.module.state_dict(), unchecked.module.state_dict()
    assert all(torch.equal(state[k], other[k]) for k in state)
    np.testing.assert_array_equal(u_checked, unchecked.get_latent_representation(batch_size=64))
    assert torch.get_num_threads() == 2


def test_a_single_chunk_analysis_is_not_checked(small_adata, monkeypatch, fresh_checks):
    model = MRVI(small_adata, seed=0)
    checks = []
    monkeypatch.setattr(_threads, "warn_if_slowed", lambda what, work, **kwargs: checks.append(what))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # untrained model
        model.get_latent_representation(batch_size=small_adata.n_obs)
        assert checks == []
        model.get_latent_representation(batch_size=64)
    assert checks == ["This analysis"]
