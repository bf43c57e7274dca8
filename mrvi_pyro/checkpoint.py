"""Training checkpoints that resume exactly.

A checkpoint directory (``train(..., checkpoint_dir=PATH)``) holds two files, rewritten after
every epoch:

- ``state.pt`` -- tensors only, read back with ``torch.load(..., weights_only=True)``: the
  module's ``state_dict``, the state of the optimiser (``torch.optim.Adam``'s layout, one state per
  parameter tensor), torch's random state (and CUDA's on a GPU), and the train/validation split;
- ``checkpoint.json`` -- a format tag, the identity of the run (module configuration, training
  arguments that change the result, a fingerprint of the data: the counts fingerprint taken by
  :func:`mrvi_pyro.data.validate_counts` and a hash of the sample/nuisance/label codes), the
  number of completed epochs, the history rows, the early-stopping state, and the states of the
  numpy ``Generator`` that draws the minibatch order, of numpy's global generator and of
  Python's ``random``.

In data-parallel training (:mod:`mrvi_pyro.distributed`) rank 0 alone checks, reads and writes
the directory (:class:`RankZeroCheckpoint`): after every epoch it gathers the random states of
every rank (each rank may draw from its own stream) and stores them beside its own (``rank_*``
entries, ranks 1 to W - 1, and ``world_size`` in the metadata); the write is followed by a
collective, so no rank starts the next epoch before the checkpoint is complete. On resume rank 0
broadcasts what it read and every rank restores its own random states, so a resumed run of W
ranks ends where the uninterrupted one does. The world size is part of the identity: a
checkpoint of W ranks is resumed by W ranks only (the per-rank slices of every minibatch and the
per-rank random streams depend on it), anything else is refused naming both sizes.

Each write builds both files in a temporary sibling directory that then replaces the old one
(:mod:`mrvi_pyro._safe_io`), so a kill at any moment leaves the previous complete checkpoint or
the new one. Resuming refuses a checkpoint whose identity differs from the current call and
names what differs; a non-empty directory that is not a checkpoint is refused and never touched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ._safe_io import remove_stale_siblings, staged_directory

FORMAT = "mrvi_pyro.checkpoint"
FORMAT_VERSION = 1
STATE_FILE = "state.pt"
METADATA_FILE = "checkpoint.json"
_LONG = 32
"""Lists longer than this (gene names, category lists) enter the identity as a hash."""


@dataclass
class TrainingState:
    """Everything the training loop needs to continue after ``epoch`` completed epochs."""

    epoch: int
    rows: list
    best: float
    since_best: int
    stopped_early: bool
    module: dict
    optimizer: dict
    train_indices: np.ndarray
    validation_indices: np.ndarray
    torch_rng: torch.Tensor
    cuda_rng: torch.Tensor | None
    minibatch_rng: dict
    numpy_rng: list
    python_rng: list
    other_ranks: list = field(default_factory=list)
    """Random states of ranks 1 to W - 1 of a data-parallel run (dicts with ``torch_rng``,
    ``cuda_rng``, ``numpy_rng``, ``python_rng``); the fields above are rank 0's."""

    @property
    def random_states(self) -> dict:
        """This state's own random states (what :attr:`other_ranks` holds per rank)."""
        return {"torch_rng": self.torch_rng, "cuda_rng": self.cuda_rng, "numpy_rng": self.numpy_rng,
                "python_rng": self.python_rng}

    def for_rank(self, rank: int, world_size: int) -> "TrainingState":
        """The state that rank ``rank`` of ``world_size`` resumes from: the shared state with
        that rank's random states."""
        if 1 + len(self.other_ranks) != world_size:
            raise ValueError(f"the checkpoint holds the random states of {1 + len(self.other_ranks)} rank(s), "
                             f"not {world_size}.")
        own = self.random_states if rank == 0 else self.other_ranks[rank - 1]
        return dataclasses.replace(self, **own, other_ranks=[])

    @classmethod
    def capture(cls, *, epoch, rows, best, since_best, stopped_early, module, optimizer, train_indices,
                validation_indices, minibatch_rng: np.random.Generator, device: torch.device) -> "TrainingState":
        """The state at the end of an epoch (random states read now)."""
        numpy_state = np.random.get_state()
        python_state = random.getstate()
        return cls(
            epoch=epoch, rows=[dict(row) for row in rows], best=float(best), since_best=int(since_best),
            stopped_early=bool(stopped_early), module=module.state_dict(), optimizer=optimizer.state_dict(),
            train_indices=train_indices, validation_indices=validation_indices,
            torch_rng=torch.get_rng_state(),
            cuda_rng=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            minibatch_rng=minibatch_rng.bit_generator.state,
            numpy_rng=[numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
            python_rng=[python_state[0], list(python_state[1]), python_state[2]],
        )

    def restore_random_states(self, minibatch_rng: np.random.Generator, device: torch.device) -> None:
        """Set torch's, numpy's and Python's random states and the minibatch generator's."""
        torch.set_rng_state(self.torch_rng)
        if device.type == "cuda" and self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng, device)
        minibatch_rng.bit_generator.state = self.minibatch_rng
        name, keys, *rest = self.numpy_rng
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
        version, internal, gauss_next = self.python_rng
        random.setstate((version, tuple(internal), gauss_next))


def checkpoint_rule(path: Path) -> str | None:
    """``replaceable`` rule of checkpoint directories: only a mrvi_pyro checkpoint is replaced."""
    foreign = sorted({p.name for p in path.iterdir()} - {STATE_FILE, METADATA_FILE})
    if foreign:
        return f"is not a mrvi_pyro checkpoint (it holds {foreign[:5]})"
    try:
        tagged = json.loads((path / METADATA_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        tagged = False
    if not tagged:
        return f"is not a mrvi_pyro checkpoint (no {METADATA_FILE} written by mrvi_pyro)"
    if not (path / STATE_FILE).is_file():
        return f"is an incomplete checkpoint (no {STATE_FILE})"
    return None


def data_identity(data) -> dict:
    """What identifies the training data: its size, the counts fingerprint taken when the data
    were validated, and a hash of the per-cell sample, nuisance and label codes."""
    codes = hashlib.sha256()
    for index in (data.sample_index, data.batch_index, getattr(data, "label_index", None)):
        codes.update(b"-" if index is None else np.ascontiguousarray(index, dtype=np.int64).tobytes())
    return {"n_cells": len(data), "counts": list(getattr(data, "fingerprint", ())), "codes": codes.hexdigest()}


def _plain(value, hash_long: bool = False):
    """``value`` as JSON types; with ``hash_long``, lists longer than 32 become a hash (so an
    identity stays small however many genes there are)."""
    if isinstance(value, dict):
        return {str(k): _plain(v, hash_long) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(v, hash_long) for v in value]
        if hash_long and len(items) > _LONG:
            return "sha256:" + hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]
        return items
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if value is None or isinstance(value, str):
        return value
    return str(value)


def _differences(saved, current, path: str = "") -> list[str]:
    """Human-readable list of where two identities differ."""
    if isinstance(saved, dict) and isinstance(current, dict):
        found = []
        for key in sorted(set(saved) | set(current)):
            where = f"{path}.{key}" if path else key
            if key not in saved or key not in current:
                found.append(f"{where} is only in the {'current call' if key in current else 'checkpoint'}")
            else:
                found += _differences(saved[key], current[key], where)
        return found
    if saved == current:
        return []
    shown = all(isinstance(v, (int, float, bool, type(None))) or (isinstance(v, str) and len(v) < 40)
                for v in (saved, current))
    return [f"{path} (checkpoint {saved!r}, now {current!r})" if shown else f"{path} differs"]


class TrainingCheckpoint:
    """The checkpoint directory of one training run.

    Construction checks the directory before anything is trained: it must be new, empty, or a
    mrvi_pyro checkpoint whose identity equals ``identity`` (``ValueError`` otherwise, naming
    what differs; nothing is changed). Leftovers of writes killed half-way are removed.

    Parameters
    ----------
    path
        The checkpoint directory.
    identity
        JSON-able description of the run: what must be equal for a resume to be exact.
    """

    def __init__(self, path: str | os.PathLike, identity: dict):
        self.path = Path(path)
        self.identity = _plain(identity, hash_long=True)
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"checkpoint_dir {self.path} is an existing file, not a directory; choose another path.")
        if self.path.is_dir() and any(self.path.iterdir()):
            reason = checkpoint_rule(self.path)
            if reason is not None:
                raise ValueError(
                    f"checkpoint_dir {self.path} {reason}; choose a new or empty directory (nothing was changed)."
                )
            self.metadata = self._read_metadata()
            saved = int(self.metadata.get("world_size", 1))
            current = int(self.identity.get("training", {}).get("world_size", 1))
            if saved != current:
                raise ValueError(
                    f"checkpoint_dir {self.path} was written by a run on {saved} rank(s) and this run has "
                    f"{current}; resume it with the same number of ranks ({_launch_hint(saved)}): each rank's "
                    "slice of every minibatch and its random stream depend on it (the checkpoint was left as it is)."
                )
            differences = _differences(self.metadata.get("identity"), self.identity)
            data = [d.split()[0] for d in differences if d.startswith("data.")]
            if data:  # one phrase for the data, first
                differences = [f"the data differ ({', '.join(data)}: other cells, counts or sample/batch/label "
                               "codes)"] + [d for d in differences if not d.startswith("data.")]
            if differences:
                raise ValueError(
                    f"checkpoint_dir {self.path} holds a checkpoint of another training run, so it cannot be "
                    f"resumed: {'; '.join(differences[:6])}. Resume with the original settings and data, or "
                    "choose a new checkpoint_dir (the checkpoint was left as it is)."
                )
        else:
            self.metadata = None
        if self.path.parent.is_dir():
            remove_stale_siblings(self.path)

    @property
    def epoch(self) -> int:
        """Completed epochs in the checkpoint (0 when there is none yet)."""
        return 0 if self.metadata is None else int(self.metadata["epoch"])

    def _read_metadata(self) -> dict:
        try:
            metadata = json.loads((self.path / METADATA_FILE).read_text())
            if metadata.get("format_version", 0) > FORMAT_VERSION:
                raise ValueError(f"checkpoint_dir {self.path} was written by a newer mrvi_pyro; upgrade the package.")
            int(metadata["epoch"])
            return metadata
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"checkpoint_dir {self.path} has a damaged {METADATA_FILE} ({err}).") from None

    def read(self) -> TrainingState | None:
        """The saved state, or None when the directory holds no checkpoint yet."""
        if self.metadata is None:
            return None
        try:
            tensors = torch.load(self.path / STATE_FILE, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for foreign or unsafe files
            raise ValueError(f"checkpoint_dir {self.path}: {STATE_FILE} cannot be loaded safely ({err}).") from None
        meta = self.metadata
        others = [
            {"torch_rng": torch_rng, "cuda_rng": cuda_rng, "numpy_rng": numpy_rng, "python_rng": python_rng}
            for torch_rng, cuda_rng, numpy_rng, python_rng in zip(
                tensors.get("rank_torch_rng", []),
                tensors.get("rank_cuda_rng", [None] * len(tensors.get("rank_torch_rng", []))),
                meta.get("rank_numpy_rng", []), meta.get("rank_python_rng", []))
        ]
        return TrainingState(
            epoch=int(meta["epoch"]), rows=meta["rows"], best=float(meta["best"]),
            since_best=int(meta["since_best"]), stopped_early=bool(meta["stopped_early"]),
            module=tensors["module"], optimizer=tensors["optimizer"],
            train_indices=tensors["train_indices"].numpy(), validation_indices=tensors["validation_indices"].numpy(),
            torch_rng=tensors["torch_rng"], cuda_rng=tensors.get("cuda_rng"),
            minibatch_rng=meta["minibatch_rng"], numpy_rng=meta["numpy_rng"], python_rng=meta["python_rng"],
            other_ranks=others,
        )

    def write(self, state: TrainingState) -> None:
        """Replace the checkpoint with ``state`` atomically (old or new, never a mix)."""
        tensors = {
            "module": {k: v.detach().cpu() for k, v in state.module.items()},
            "optimizer": _to_cpu(state.optimizer),
            "train_indices": torch.from_numpy(np.asarray(state.train_indices, dtype=np.int64)),
            "validation_indices": torch.from_numpy(np.asarray(state.validation_indices, dtype=np.int64)),
            "torch_rng": state.torch_rng,
        }
        if state.cuda_rng is not None:
            tensors["cuda_rng"] = state.cuda_rng
        others = state.other_ranks
        if others:
            tensors["rank_torch_rng"] = [r["torch_rng"] for r in others]
            if state.cuda_rng is not None:
                tensors["rank_cuda_rng"] = [r["cuda_rng"] for r in others]
        metadata = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "identity": self.identity, "epoch": state.epoch,
            "rows": _plain(state.rows), "best": state.best, "since_best": state.since_best,
            "stopped_early": state.stopped_early, "minibatch_rng": state.minibatch_rng,
            "numpy_rng": state.numpy_rng, "python_rng": state.python_rng, "world_size": 1 + len(others),
        }
        if others:
            metadata["rank_numpy_rng"] = [r["numpy_rng"] for r in others]
            metadata["rank_python_rng"] = [r["python_rng"] for r in others]
        with staged_directory(self.path, overwrite=True, what="checkpoint_dir", replaceable=checkpoint_rule) as staging:
            torch.save(tensors, staging / STATE_FILE)
            (staging / METADATA_FILE).write_text(json.dumps(metadata))
        self.metadata = metadata


def _launch_hint(world_size: int) -> str:
    if world_size == 1:
        return "in one process"
    return (f"torchrun --nproc-per-node {world_size}, mrvi_pyro.distributed.launch(fn, {world_size}) or "
            f"mrvi-pyro fit --nproc {world_size}")


def open_checkpoint(path: str | os.PathLike, identity: dict, max_epochs: int, replicas=None
                    ) -> tuple["TrainingCheckpoint | RankZeroCheckpoint", TrainingState | None]:
    """The checkpoint of a training run and the state to resume from (None: start afresh).

    In one process: :class:`TrainingCheckpoint` and what it holds. With ``replicas``
    (:class:`mrvi_pyro.distributed.Replicas`), rank 0 alone opens and reads the directory and
    broadcasts the outcome: every rank gets a :class:`RankZeroCheckpoint` and the state with its
    own random states, or raises the same error (no hang).
    """

    def opened():
        checkpoint = TrainingCheckpoint(path, identity)
        if checkpoint.epoch > max_epochs:
            raise ValueError(
                f"checkpoint_dir {path} holds {checkpoint.epoch} completed epochs, more than "
                f"max_epochs={max_epochs}; pass max_epochs >= {checkpoint.epoch} to resume it."
            )
        return checkpoint, checkpoint.read()

    if replicas is None:
        return opened()
    checkpoint, state, failure = None, None, None
    if replicas.is_main:
        try:
            checkpoint, state = opened()
        except Exception as err:  # every rank raises it, below
            failure = err
    state, message = replicas.broadcast_object((state, _describe(failure)))
    _raise_everywhere(failure, message, "open the checkpoint")
    if state is not None:
        state = state.for_rank(replicas.rank, replicas.world_size)
    return RankZeroCheckpoint(checkpoint, replicas), state


def _describe(error: BaseException | None) -> tuple[str, str] | None:
    return None if error is None else (type(error).__name__, str(error))


def _raise_everywhere(error: BaseException | None, message: tuple[str, str] | None, what: str) -> None:
    """Re-raise rank 0's ``error`` there and the same message on the other ranks (a
    ``ValueError`` stays a ``ValueError``; anything else is a ``RuntimeError``)."""
    if error is not None:
        raise error
    if message is not None:
        kind, text = message
        if kind == "ValueError":
            raise ValueError(text)
        raise RuntimeError(f"rank 0 could not {what} ({kind}: {text}).")


class RankZeroCheckpoint:
    """The checkpoint of a data-parallel run: rank 0 writes, gathering every rank's random states.

    Made by :func:`open_checkpoint`. :meth:`write` is a collective: every rank calls it after
    every epoch with its :class:`TrainingState`; rank 0 writes the shared state with the random
    states of all ranks (:meth:`TrainingCheckpoint.write`, atomic), then tells every rank whether
    the write succeeded, so no rank moves on before it is complete and a failed write stops every
    rank with the same error.
    """

    def __init__(self, checkpoint: TrainingCheckpoint | None, replicas):
        self.checkpoint, self.replicas = checkpoint, replicas

    def write(self, state: TrainingState) -> None:
        gathered = self.replicas.gather_object(state.random_states)
        failure = None
        if self.replicas.is_main:
            try:
                self.checkpoint.write(dataclasses.replace(state, other_ranks=gathered[1:]))
            except Exception as err:  # every rank raises it, below
                failure = err
        message = self.replicas.broadcast_object(_describe(failure))
        _raise_everywhere(failure, message, "write the checkpoint")


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value
