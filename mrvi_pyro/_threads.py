"""Notice when torch's threads make the work slower than one thread would, and say so.

torch runs its parallel operations on an OpenMP team of ``torch.get_num_threads()`` threads (by
default one per core). Between operations the team's threads spin for a while, then sleep. When
another process keeps a core busy, a team thread on that core waits for the other process's
time slice, and every parallel operation waits for that thread. Measured on the 2-core
development machine (``benchmarks/contention.py``, ``benchmarks/README.md`` stop 33):

- while another process trained a model on one core, a training step at batch 128 (8,000 cells
  x 1,000 genes) took about 2.5 s with torch's 2 threads, against 25-30 ms with 1 thread.
  Training ran about 100 times slower, and nothing said why.
- With a CPU-bound Python loop on one core, 2 epochs on 2,000 cells took 2.9-4.9 s with 2
  threads, against 0.9-1.3 s with 1 thread (ten runs).

The analyses slow down the same way.

:func:`thread_slowdown` times a piece of the real work (a forward pass of the model on part of
a minibatch or chunk, without gradients) alternately with torch's thread count and with one
thread. :func:`warn_if_slowed` warns when the first is at least :data:`SLOWDOWN_RATIO` times
slower, naming the fix. Training checks at its first step and then at the first step of an
epoch at most once a minute, until it has warned. An analysis with more than one chunk checks
on its first chunk, under the same once-a-minute limit. A check of training costs about 130 ms
on an idle machine (at most 0.2% of a training run).

Nothing is changed automatically. With another thread count, results differ by float rounding,
so switching the count by itself would make a seeded run depend on the machine's load. The
check leaves the random state and the thread count as it found them, so a run that checks
trains exactly as one that does not.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

REPEATS = 5
"""Timed calls of the work per thread count (their total time is compared: contention comes and
goes, and the total is what the work would take)."""

SLOWDOWN_RATIO = 1.5
"""From this ratio of the two totals on, the current thread count counts as slowing the work.
Measured on the 2-core development machine, with training's loss on 128 cells x 1,000 genes: 0.93-0.97
with the machine idle (2 threads slightly faster than one), 3.0-4.5 with a CPU-bound loop on one
core (where whole training runs took 3.5-4.7 times as long as with one thread)."""

MIN_INTERVAL_S = 60.0
"""A process checks at most once per this many seconds; within it, the last ratio is returned
again without timing or warning."""

_last: tuple[float, float | None] | None = None
"""(perf_counter time, ratio) of the last check."""


def thread_slowdown(work: Callable[[], object], repeats: int = REPEATS) -> float | None:
    """Total time of ``repeats`` calls of ``work()`` with ``torch.get_num_threads()`` threads over
    that of ``repeats`` calls with one thread (alternated, after one untimed call), or None when
    torch uses a single thread. ``work`` runs without gradients; torch's CPU random state and the thread count are
    restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    if threads < 2:
        return None
    alone, team = [], []
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        work()
        for _ in range(repeats):
            try:
                torch.set_num_threads(1)
                start = time.perf_counter()
                work()
                alone.append(time.perf_counter() - start)
            finally:
                torch.set_num_threads(threads)
            start = time.perf_counter()
            work()
            team.append(time.perf_counter() - start)
    return sum(team) / max(sum(alone), 1e-9)


def warn_if_slowed(what: str, work: Callable[[], object], *, stacklevel: int = 2) -> float | None:
    """Warn when :func:`thread_slowdown` of ``work`` is at least :data:`SLOWDOWN_RATIO`.

    ``what`` names the work (e.g. "Training"). Returns the ratio (None with one thread). Within
    :data:`MIN_INTERVAL_S` of the last check, returns its ratio without timing or warning.
    """
    global _last
    now = time.perf_counter()
    if _last is not None and now - _last[0] < MIN_INTERVAL_S:
        return _last[1]
    ratio = thread_slowdown(work)
    _last = (now, ratio)
    if ratio is not None and ratio >= SLOWDOWN_RATIO:
        import torch

        warnings.warn(
            f"{what} runs {ratio:.1f}x slower with torch's {torch.get_num_threads()} threads than it would with "
            "one (timed on its own data just now). Most likely other processes hold CPU cores that torch's "
            "threads wait for at every operation; this can make the work tens of times slower. Free the cores, "
            "or use fewer threads: torch.set_num_threads(1) before the call (on the command line: "
            "OMP_NUM_THREADS=1 mrvi-pyro ...). Results with another thread count differ only by float rounding.",
            RuntimeWarning,
            stacklevel=stacklevel + 1,
        )
    return ratio
