"""Allocator setting shared by training and the analyses (see :func:`tune_malloc`); opt-in for
library calls (:data:`mrvi_pyro.settings`), on in the command line. :func:`raise_mmap_threshold`
only triggers glibc's own adaptation early (the analyses' reused buffers, ``nn.workspace``)."""

from __future__ import annotations

import ctypes
import os
import sys

from ._settings import settings

MALLOC_MMAP_THRESHOLD = 32 << 20
MALLOC_TRIM_THRESHOLD = 128 << 20
_MALLOC_TUNED: list[bool] = []
"""Whether :func:`tune_malloc` ran (and applied), once per process."""


def tune_malloc() -> bool:
    """Stop glibc from returning every freed minibatch tensor to the operating system.

    A training step (and each chunk of an analysis) allocates and frees tensors of a few
    hundred KB to a few MB many times. By default glibc serves such blocks with ``mmap`` (or
    trims them off the heap) and gives them back on ``free``, so every step page-faults its
    memory in again (measured: ~0.5 s of system time per 60,000 cells at batch 128, 10-15% of
    the training time; grouped distances of 20,000 cells x 24 samples 1.6-1.9 s instead of 1.1 s). This sets
    ``M_MMAP_THRESHOLD`` to 32 MB and ``M_TRIM_THRESHOLD`` to 128 MB with ``mallopt`` (the
    same as the ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` environment variables):
    freed blocks below 32 MB are reused, and up to 128 MB of free heap is kept. It applies to
    the whole process, once, on Linux with glibc only; set the environment variable
    ``MRVI_PYRO_TUNE_MALLOC=0`` to leave the allocator alone. Returns whether it was applied.

    Library code calls :func:`tune_malloc_if_enabled` instead (off unless
    ``mrvi_pyro.settings.tune_malloc``); the command line calls this directly.
    """
    if _MALLOC_TUNED:
        return _MALLOC_TUNED[0]
    applied = False
    if os.environ.get("MRVI_PYRO_TUNE_MALLOC", "1") != "0" and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
            m_trim_threshold, m_mmap_threshold = -1, -3
            applied = bool(libc.mallopt(m_mmap_threshold, MALLOC_MMAP_THRESHOLD)) and bool(
                libc.mallopt(m_trim_threshold, MALLOC_TRIM_THRESHOLD)
            )
        except (OSError, AttributeError):  # not glibc
            applied = False
    _MALLOC_TUNED.append(applied)
    return applied


def tune_malloc_if_enabled() -> bool:
    """:func:`tune_malloc` when ``mrvi_pyro.settings.tune_malloc`` is on (off by default: the
    allocator of a user's process, e.g. a Jupyter kernel, is not changed behind its back).
    Returns whether the tuning is in effect."""
    if settings.tune_malloc:
        return tune_malloc()
    return bool(_MALLOC_TUNED and _MALLOC_TUNED[0])


MMAP_THRESHOLD_MAX = 32 << 20
"""glibc's ceiling for its dynamic mmap threshold on 64-bit systems."""


def raise_mmap_threshold(nbytes: int) -> None:
    """Allocate ``nbytes`` (at most 32 MB) and free it at once.

    glibc serves a large allocation with ``mmap`` and, when such a block is freed, raises its
    dynamic mmap threshold to the block's size (up to 32 MB) and its trim threshold to twice
    that; blocks below the threshold then come from the heap and stay there. Without this, the
    few-MB temporaries of an analysis pass are handed back to the system after every slice and
    faulted in again (~250,000 page faults per pass of grouped distances of 20,000 cells x 24
    samples). This is glibc's own adaptive behaviour, triggered early; the settings it reaches
    are what the process would reach anyway after freeing one such block (unlike
    :func:`tune_malloc`, which fixes them and stops the adaptation)."""
    import torch  # here: the command line imports this module for its help without torch

    if nbytes > 0:
        torch.empty(min(int(nbytes), MMAP_THRESHOLD_MAX), dtype=torch.uint8)
