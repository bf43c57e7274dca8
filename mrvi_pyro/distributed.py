r"""Data-parallel training and sharded analyses on ``torch.distributed``.

Launch
------
Any script that trains or analyses with :class:`mrvi_pyro.MRVI` runs unchanged on several
processes, one per GPU (or per group of CPU cores), started by ``torchrun``::

    torchrun --nproc-per-node 4 my_script.py                    # one machine, 4 ranks
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \
             --rdzv-endpoint HOST:29500 my_script.py            # two machines

or from Python by :func:`launch` (``fn`` runs on every rank, rank 0's return value comes
back), or ``mrvi-pyro fit --nproc N``. Inside such a launch the package finds the process
group (an initialised default group, or torchrun's ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``
environment, which it initialises: NCCL when CUDA is available, else gloo) and every rank
works on its share of the cells. With CUDA, rank ``LOCAL_RANK`` uses ``cuda:LOCAL_RANK``.

Training
--------
Each rank holds the whole model and reads only its shard of the cells. All ranks draw the same
split, the same epoch permutations and the same initial weights (broadcast from rank 0), so
they walk through the same *global* minibatches: ``batch_size`` is the global batch, and rank
``r`` of ``W`` takes the contiguous slice ``[r m / W, (r + 1) m / W)`` of each minibatch of
``m`` cells (``batch_size / W`` cells, which must be an integer). Its loss is its cells'
share of the per-cell mean over the global minibatch,

.. math::

    \ell_r = \frac{1}{m} \sum_{n \in \text{shard}_r} \ell_n, \qquad \sum_r \ell_r = \frac1m \sum_{n} \ell_n,

so one summed all-reduce of the gradients per step (one buffer) gives every rank the gradient
one process computes on the whole minibatch; clipping and the Adam update then run
identically everywhere. Training losses, the validation loss (each rank evaluates its shard of
the validation chunks) and hence early stopping are summed across ranks, so every rank takes
the same decisions. ``MRVI.save`` writes on rank 0 only, and so does a ``checkpoint_dir``
(:class:`mrvi_pyro.checkpoint.RankZeroCheckpoint`): rank 0 stores the shared state with the
random states of every rank after each epoch, and on resume reads it and broadcasts it, so every
rank continues from the same epoch with its own random stream (an interrupted and resumed run
of W ranks ends where an uninterrupted one does; a checkpoint of another world size is refused).
With several nodes the checkpoint is on rank 0's file system.

Random draws (the posterior draw of ``u`` in the guide and the dropout masks of the attention
blocks) are *the same per cell as in one process*: inside a step each per-cell draw is made for
the whole global minibatch from the shared, identically seeded generator and each rank keeps
its rows (:class:`SameDraws`). So ``W`` ranks reproduce one process to float-reduction rounding
(tested: 2 ranks of 64 against one process of 128). The price: every rank generates the random
numbers of the global batch, and the torch-function mode that intercepts the draws adds Python
work to every operation of a step (measured on CPU: +3.4 ms on a 21 ms step of 64 cells x
1,000 genes, about 16%). ``MRVI_PYRO_SAME_DRAWS=0`` drops both: each rank then draws for its
own cells only from its own stream (seeded by the seed and the rank), which is equal in
distribution but not bit-equal to one process. A custom guide that draws per-cell randomness
through other torch functions still trains correctly, only no longer bit-for-bit like one
process.

A launch whose ranks see different data (shape, counts fingerprint, annotations), a different
model configuration or different training arguments, or a world size that does not divide
``batch_size``, stops on every rank with the same ``ValueError`` (a collective check before the
first step), never a hang.

Analyses
--------
:func:`cell_range`, :func:`all_gather_rows`, :func:`gather_rows` and :func:`all_reduce_` are
the pieces the sharded analyses use: every rank takes a contiguous range of the cells (whole
chunks of ``batch_size``, so each rank computes exactly the chunks one process would), grouped
reductions are summed with an all-reduce, and rank 0 assembles the per-cell outputs and returns
the full result (other ranks return ``None``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import socket
import tempfile
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""Environment variables that mark a process started by ``torchrun`` (or :func:`launch`)."""


# ----- the process group ------------------------------------------------------------------------
def _launched_by_torchrun() -> bool:
    return all(v in os.environ for v in TORCHRUN_VARIABLES) and int(os.environ["WORLD_SIZE"]) > 1


def ensure_process_group() -> bool:
    """Whether this process is one rank of several; initialises the default process group
    from torchrun's environment variables when they are set and no group exists yet (NCCL
    when CUDA is available, gloo otherwise)."""
    if not dist.is_available():
        return False
    if not dist.is_initialized():
        if not _launched_by_torchrun():
            return False
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_world_size() > 1


def rank() -> int:
    """Rank of this process (0 outside a distributed launch)."""
    return dist.get_rank() if ensure_process_group() else 0


def world_size() -> int:
    """Number of ranks (1 outside a distributed launch)."""
    return dist.get_world_size() if ensure_process_group() else 1


def _reduce_device() -> torch.device:
    """Where collective tensors live: the current CUDA device under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_(tensors: list[torch.Tensor]) -> None:
    """Sum ``tensors`` (of one dtype) across ranks in place with ONE all-reduce (coalesced into
    one buffer when there are several or they are not on the backend's device; ``None``
    entries are skipped)."""
    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return
    device = _reduce_device()
    if len(tensors) == 1 and tensors[0].is_contiguous() and tensors[0].device == device:
        dist.all_reduce(tensors[0])
        return
    buffer = torch.cat([t.reshape(-1).to(device) for t in tensors])
    dist.all_reduce(buffer)
    for t, piece in zip(tensors, buffer.split([t.numel() for t in tensors])):
        t.copy_(piece.view_as(t))


def all_reduce_sum(values) -> np.ndarray:
    """Sum a few numbers across ranks (float64); one all-reduce."""
    buffer = torch.as_tensor(np.asarray(values, dtype=np.float64), device=_reduce_device())
    dist.all_reduce(buffer)
    return buffer.cpu().numpy()


def broadcast_(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` with rank ``src``'s values (one broadcast)."""
    tensors = [t for t in tensors if t is not None]
    device = _reduce_device()
    if len(tensors) == 1 and tensors[0].is_contiguous() and tensors[0].device == device:
        dist.broadcast(tensors[0], src)
        return
    buffer = torch.cat([t.detach().reshape(-1).to(device) for t in tensors])
    dist.broadcast(buffer, src)
    with torch.no_grad():
        for t, piece in zip(tensors, buffer.split([t.numel() for t in tensors])):
            t.copy_(piece.view_as(t))


def broadcast_object(value, src: int = 0):
    """Rank ``src``'s ``value`` (a picklable object) on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_object(value) -> list | None:
    """Every rank's ``value`` (picklable) in rank order on rank 0; ``None`` on the other ranks."""
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(value, parts, dst=0)
    return parts


def check_same_everywhere(description: dict, what: str) -> None:
    """Raise the same ``ValueError`` on every rank unless all ranks pass equal ``description``
    dicts (small, JSON-able values). One ``all_gather_object``."""
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, description)
    reference = gathered[0]
    differing = sorted({key for d in gathered[1:] for key in set(d) | set(reference)
                        if d.get(key) != reference.get(key)})
    if differing:
        details = "; ".join(
            f"{key}: " + ", ".join(f"rank {r} {_short(d.get(key))}" for r, d in enumerate(gathered))
            for key in differing[:4]
        )
        raise ValueError(
            f"The ranks of this distributed launch disagree on {what} ({details}). Every rank must load the "
            "same data and call with the same arguments (e.g. read the same .h5ad and pass the same seed)."
        )


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _digest(value) -> str:
    """A short hash of a JSON-able value or a numpy array (of all its bytes)."""
    if isinstance(value, np.ndarray):
        payload = f"{value.dtype}{value.shape}".encode() + np.ascontiguousarray(value).tobytes()
    else:
        payload = json.dumps(value, sort_keys=True, default=str).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


# ----- data-parallel training -------------------------------------------------------------------
class SameDraws(TorchFunctionMode):
    """Per-cell random draws of a shard equal to those of one process on the whole minibatch.

    Inside this context, a random draw whose leading dimension is the shard's ``n_local``
    cells -- a ``Tensor.normal_``/``uniform_``/``bernoulli_``-style fill with scalar
    arguments (how ``rsample`` draws), ``torch.randn``/``rand`` (and ``*_like``) or a training
    ``F.dropout`` -- is made for all ``n_global`` cells of the minibatch from the same
    generator, and rows ``start:start + n_local`` are kept. Every rank therefore consumes the
    generator exactly as one process does and uses that process's numbers for its cells.
    Other draws pass through unchanged.

    Parameters
    ----------
    n_global
        Cells in the global minibatch.
    start, n_local
        This rank's rows of it.
    """

    _FILLS = frozenset({torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.bernoulli_,
                        torch.Tensor.exponential_, torch.Tensor.log_normal_, torch.Tensor.cauchy_,
                        torch.Tensor.geometric_})
    _FACTORIES = frozenset({torch.randn, torch.rand})
    _LIKE = frozenset({torch.randn_like, torch.rand_like})
    _RANDOM = _FILLS | _FACTORIES | _LIKE | {torch.nn.functional.dropout}

    def __init__(self, n_global: int, start: int, n_local: int):
        super().__init__()
        self.n_global, self.start, self.n_local = int(n_global), int(start), int(n_local)

    def _rows(self, full: torch.Tensor) -> torch.Tensor:
        return full[self.start : self.start + self.n_local]

    def _is_local(self, shape) -> bool:
        return len(shape) > 0 and shape[0] == self.n_local

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in self._RANDOM:  # every other operation of the step: the fast path
            return func(*args, **kwargs)
        if func in self._FILLS and self._is_local(args[0].shape) and not any(
            isinstance(a, torch.Tensor) for a in (*args[1:], *kwargs.values())
        ):
            target = args[0]
            full = torch.empty((self.n_global, *target.shape[1:]), dtype=target.dtype, device=target.device)
            func(full, *args[1:], **kwargs)
            return target.copy_(self._rows(full))
        if func in self._FACTORIES:
            size = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else args
            if size and all(isinstance(s, int) for s in size) and self._is_local(size):
                return self._rows(func((self.n_global, *size[1:]), **kwargs))
        if func in self._LIKE and self._is_local(args[0].shape) and len(args) == 1:
            ref = args[0]
            kwargs = {"dtype": ref.dtype, "device": ref.device, **kwargs}
            return self._rows(func(torch.empty((self.n_global, *ref.shape[1:]), **kwargs)))
        if func is torch.nn.functional.dropout:
            return self._dropout(func, *args, **kwargs)
        return func(*args, **kwargs)

    def _dropout(self, func, input, p=0.5, training=True, inplace=False):
        if not (training and 0 < p < 1 and self._is_local(input.shape)):
            return func(input, p, training, inplace)
        ones = torch.ones((self.n_global, *input.shape[1:]), dtype=input.dtype, device=input.device)
        mask = self._rows(func(ones, p, True))  # kept entries 1 / (1 - p), dropped 0
        return input.mul_(mask) if inplace else input * mask


class Replicas:
    """This process's place in data-parallel training (see the module docstring).

    Use :meth:`current`: it returns ``None`` in a single process, so the training loop's hooks
    vanish there.
    """

    def __init__(self):
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.same_draws = os.environ.get("MRVI_PYRO_SAME_DRAWS", "1") != "0"

    @classmethod
    def current(cls) -> Replicas | None:
        """The replicas of a distributed launch with more than one rank, else ``None``."""
        return cls() if ensure_process_group() else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """Under CUDA without an explicit index, each rank's own GPU (``LOCAL_RANK``; ranks
        share the GPUs round-robin when there are fewer GPUs than local ranks)."""
        if device.type == "cuda" and device.index is None:
            local = int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))
            return torch.device("cuda", local % torch.cuda.device_count())
        return device

    def check_training(self, module, data, arguments: dict) -> None:
        """Same data, model and arguments on every rank, and ``batch_size`` divisible by the
        world size; otherwise the same ``ValueError`` on every rank."""
        config = getattr(module, "config", None)
        description = {
            "n_obs": int(len(data)),
            "counts": _digest(getattr(data, "fingerprint", None)),
            "annotations": _digest([getattr(data, "obs_signature", None),
                                    getattr(getattr(data, "registry", None), "__dict__", None)]),
            "model": _digest([type(module).__name__, config,
                              [(n, tuple(p.shape)) for n, p in module.named_parameters()]]),
            **{k: v for k, v in sorted(arguments.items())},
        }
        check_same_everywhere(description, "the training data, model or arguments")
        batch_size = int(arguments["batch_size"])
        if batch_size % self.world_size:
            lower = batch_size - batch_size % self.world_size
            raise ValueError(
                f"batch_size={batch_size} is the global minibatch and must be divisible by the world size "
                f"({self.world_size} ranks) so every rank takes the same number of cells; use e.g. "
                f"batch_size={lower or self.world_size} or {lower + self.world_size}."
            )

    def broadcast_parameters(self, tensors: list[torch.Tensor]) -> None:
        """Start every rank from rank 0's weights."""
        broadcast_([t.data for t in tensors])

    def shard(self, positions: np.ndarray) -> tuple[np.ndarray, float, SameDraws]:
        """This rank's slice of a global minibatch, its share of the loss and its draws context.

        Returns ``(local_positions, share, draws)``: the contiguous slice of ``positions``,
        ``len(slice) / len(positions)``, and a :class:`SameDraws` context. A rank left without
        cells (a last minibatch shorter than the world size) computes one cell with share 0, so
        it still takes the same random draws and joins the same all-reduce.
        """
        m = len(positions)
        start, stop = self.rank * m // self.world_size, (self.rank + 1) * m // self.world_size
        share = (stop - start) / m
        if stop == start:
            start, stop = min(start, m - 1), min(start, m - 1) + 1
        draws = SameDraws(m, start, stop - start) if self.same_draws else contextlib.nullcontext()
        return positions[start:stop], share, draws

    def seed(self, seed: int) -> None:
        """Seed torch's generator for the run: ``seed`` on every rank (the draws of
        :class:`SameDraws`), or, with ``MRVI_PYRO_SAME_DRAWS=0``, a different stream per rank
        (each rank draws only for its own cells: faster, equal in distribution, not bit-equal
        to one process)."""
        torch.manual_seed(seed if self.same_draws else hash((int(seed), self.rank)) % 2**63)

    def all_reduce_gradients(self, params: list[torch.Tensor]) -> None:
        """Sum the gradients of ``params`` (the trainable parameter tensors) across ranks with
        one all-reduce. A gradient missing on some ranks counts as zeros there; one missing on
        every rank stays missing (``None``), so that Adam skips that parameter as it does in one
        process (e.g. the prior's while the KL weight is 0)."""
        if not params:
            return
        present = torch.tensor([p.grad is not None for p in params], dtype=params[0].dtype, device=params[0].device)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        all_reduce_([*(p.grad for p in params), present])  # the presence counts ride in the same buffer
        for p, count in zip(params, present.tolist()):
            if count == 0:
                p.grad = None

    def all_reduce_sum(self, values) -> np.ndarray:
        return all_reduce_sum(values)

    def broadcast_object(self, value):
        return broadcast_object(value)

    def gather_object(self, value) -> list | None:
        return gather_object(value)


# ----- sharded analyses --------------------------------------------------------------------------
def cell_range(n_cells: int, batch_size: int) -> slice:
    """This rank's contiguous range of ``n_cells`` cells, in whole chunks of ``batch_size``
    (the whole range outside a distributed launch)."""
    if not ensure_process_group():
        return slice(0, n_cells)
    n_chunks = -(-n_cells // batch_size)
    r, w = dist.get_rank(), dist.get_world_size()
    first, last = r * n_chunks // w, (r + 1) * n_chunks // w
    return slice(min(first * batch_size, n_cells), min(last * batch_size, n_cells))


class CellPartition:
    """The cells one rank of an analysis evaluates, and how per-cell results are combined.

    The analysis functions (:func:`mrvi_pyro.explore.local_sample_distances`,
    :func:`mrvi_pyro.da.sample_log_probs`,
    :func:`mrvi_pyro.admissibility.outlier_cell_sample_pairs`,
    :func:`mrvi_pyro.de.differential_expression`) take one: they compute the rows
    :attr:`cells` (a contiguous range of whole chunks of ``batch_size``, so every rank computes
    exactly the chunks one process computes), share what every rank needs
    (:meth:`all_gather`, :meth:`all_reduce_`) and assemble per-cell outputs on rank 0
    (:meth:`gather`). :meth:`whole` is the single-process partition: all cells, and every
    combination is the identity.

    Parameters
    ----------
    n_cells
        Number of cells of the analysis.
    batch_size
        Chunk size; the ranges are whole chunks.
    sharded
        Split across the ranks of the current launch (False: one process has all cells).
    """

    def __init__(self, n_cells: int, batch_size: int, sharded: bool):
        self.n_cells, self.sharded = int(n_cells), bool(sharded)
        self.cells = cell_range(self.n_cells, int(batch_size)) if sharded else slice(0, self.n_cells)

    @classmethod
    def current(cls, n_cells: int, batch_size: int, *, module=None, data=None,
                arguments: dict | None = None) -> CellPartition:
        """This rank's share inside a distributed launch, the whole range otherwise.

        Inside a launch the ranks first check (one ``all_gather_object``) that they analyse the
        same cells of the same data (``data``'s counts fingerprint and annotations) with the same
        weights (a digest of ``module``'s state) and the same ``arguments``; otherwise every
        rank raises the same ``ValueError``.
        """
        partition = cls(n_cells, batch_size, sharded=ensure_process_group())
        if partition.sharded:
            state = {} if module is None else module.state_dict()
            weights = hashlib.sha256()
            for name, tensor in state.items():
                weights.update(name.encode())
                weights.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            check_same_everywhere({
                "n_cells": int(n_cells), "batch_size": int(batch_size),
                "counts": _digest(getattr(data, "fingerprint", None)),
                "annotations": _digest(getattr(data, "obs_signature", None)),
                "weights": weights.hexdigest()[:16],
                **{k: v if isinstance(v, (int, float, str, bool, type(None))) else _digest(v)
                   for k, v in sorted((arguments or {}).items())},
            }, "the analysis data, model weights or arguments")
        return partition

    @classmethod
    def whole(cls, n_cells: int) -> CellPartition:
        return cls(n_cells, 1, sharded=False)

    @property
    def is_main(self) -> bool:
        """Whether this rank assembles and returns the results (rank 0, or the only process)."""
        return not self.sharded or dist.get_rank() == 0

    @property
    def n_local(self) -> int:
        return self.cells.stop - self.cells.start

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rows of every rank concatenated (all cells), on every rank."""
        return all_gather_rows(tensor) if self.sharded else tensor

    def gather(self, array: np.ndarray) -> np.ndarray | None:
        """Rows of every rank concatenated on rank 0; ``None`` on the other ranks."""
        return gather_rows(array) if self.sharded else array

    def all_reduce_(self, tensors: list[torch.Tensor]) -> None:
        """Sum ``tensors`` (e.g. group sums and counts) over the ranks, in place."""
        if self.sharded:
            all_reduce_(tensors)

    def broadcast(self, value):
        """Rank 0's ``value`` (a small picklable object) on every rank."""
        return broadcast_object(value) if self.sharded else value

    def barrier(self) -> None:
        if self.sharded:
            dist.barrier()


def _gather_sizes(n: int) -> list[int]:
    sizes = torch.tensor([n], dtype=torch.int64, device=_reduce_device())
    out = [torch.zeros_like(sizes) for _ in range(dist.get_world_size())]
    dist.all_gather(out, sizes)
    return [int(s) for s in out]


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` (rows may differ in number) in rank order, on every
    rank."""
    sizes = _gather_sizes(tensor.shape[0])
    device = _reduce_device()
    padded = torch.zeros((max(sizes), *tensor.shape[1:]), dtype=tensor.dtype, device=device)
    padded[: tensor.shape[0]] = tensor.to(device)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)]).to(tensor.device)


def gather_rows(array: np.ndarray) -> np.ndarray | None:
    """Concatenate every rank's numpy ``array`` in rank order on rank 0 (``None`` elsewhere).

    Gathered with ``gather_object`` (pickled, so any dtype works; memory on rank 0 is the
    assembled result)."""
    parts = gather_object(np.ascontiguousarray(array))
    return np.concatenate(parts) if parts is not None else None


# ----- launching ---------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_rank(local_rank: int, fn, args: tuple, nproc: int, port: int, backend: str, threads: int | None,
              result_dir: str, timeout_s: float) -> None:
    os.environ.update({"RANK": str(local_rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(nproc),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    if threads is not None:
        torch.set_num_threads(threads)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=local_rank, world_size=nproc,
                            timeout=timedelta(seconds=timeout_s))
    try:
        result = fn(*args)
        if local_rank == 0:
            with open(os.path.join(result_dir, "result.pkl"), "wb") as f:
                pickle.dump(result, f)
        # Every rank's collectives complete before any rank tears its process group down: a rank
        # tearing down while a peer's last collective was still in flight aborted that peer once
        # (SIGABRT, "terminate called without an active exception", gloo, 2 ranks on a loaded
        # 2-core machine).
        dist.barrier()
    except Exception as err:  # hand the exception itself to the launching process
        with contextlib.suppress(Exception), open(os.path.join(result_dir, f"error{local_rank}.pkl"), "wb") as f:
            pickle.dump(err, f)
        raise
    finally:
        dist.destroy_process_group()


def _root_cause(result_dir: str, failed_rank: int) -> BaseException | None:
    """The exception of the rank that caused a launch to fail: a saved exception that is not
    a collective's broken connection (what the other ranks see once a rank dies), preferring
    the rank the launcher saw fail first."""
    errors = {}
    for name in os.listdir(result_dir):
        if name.startswith("error"):
            with contextlib.suppress(Exception), open(os.path.join(result_dir, name), "rb") as f:
                errors[int(name[5:-4])] = pickle.load(f)

    def secondary(err):
        return isinstance(err, RuntimeError) and (
            isinstance(err, getattr(dist, "DistError", ()))
            or any(word in str(err) for word in ("gloo", "NCCL", "Connection"))
        )

    ranks = [failed_rank] + sorted(r for r in errors if r != failed_rank)
    primary = [errors[r] for r in ranks if r in errors and not secondary(errors[r])]
    return primary[0] if primary else errors.get(failed_rank)


def launch(fn, nproc: int, *args, backend: str | None = None, threads: int | None = None,
           timeout_s: float = 1800.0):
    """Run ``fn(*args)`` on ``nproc`` local ranks of a fresh process group; return rank 0's result.

    Each rank is a new process (``torch.multiprocessing`` with the spawn method, so ``fn`` and
    ``args`` must be picklable: a module-level function; in a script, call ``launch`` under
    ``if __name__ == "__main__":``). The group uses a free local port, gloo on CPU or NCCL
    with one GPU per rank (``backend=None`` picks NCCL when there are at least ``nproc`` GPUs).
    When a rank fails, the others are stopped and its exception is raised here (e.g. the
    ``ValueError`` of a bad input; the rank's traceback is chained as the cause).

    Parameters
    ----------
    fn
        Function run on every rank; it trains or analyses with :class:`mrvi_pyro.MRVI` as in one
        process (see the module docstring).
    nproc
        Number of ranks (>= 1).
    backend
        ``"gloo"``, ``"nccl"`` or None (automatic).
    threads
        torch threads per rank (default: the cores divided among the ranks, at least 1).
    timeout_s
        Collective timeout.
    """
    import torch.multiprocessing as mp

    if isinstance(nproc, bool) or not isinstance(nproc, (int, np.integer)) or nproc < 1:
        raise ValueError(f"nproc must be a positive integer (the number of ranks); got {nproc!r}.")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= nproc else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo', 'nccl' or None; got {backend!r}.")
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // nproc)
    result_dir = tempfile.mkdtemp(prefix="mrvi_pyro_launch_")
    try:
        try:
            mp.start_processes(_run_rank, args=(fn, args, int(nproc), _free_port(), backend, threads, result_dir,
                                                float(timeout_s)), nprocs=int(nproc), start_method="spawn")
        except mp.ProcessRaisedException as failure:
            cause = _root_cause(result_dir, failure.error_index)
            if cause is None:
                raise
            raise cause from failure
        with open(os.path.join(result_dir, "result.pkl"), "rb") as f:
            return pickle.load(f)
    finally:
        shutil.rmtree(result_dir, ignore_errors=True)


__all__ = [
    "CellPartition", "Replicas", "SameDraws", "all_gather_rows", "all_reduce_", "all_reduce_sum", "broadcast_",
    "broadcast_object", "cell_range", "check_same_everywhere", "ensure_process_group", "gather_object", "gather_rows",
    "launch", "rank", "world_size",
]
