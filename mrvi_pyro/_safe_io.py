"""Writing files without losing the user's data.

Every writer of the package (model saves, zarr stores of analyses, the command line's run
directories) follows the same three rules:

1. An existing non-empty target is refused unless the caller passes ``overwrite=True``.
2. Even with ``overwrite=True``, a target is only replaced when it is something mrvi_pyro
   writes (a zarr store, a saved model, a run directory); anything else is refused and left
   untouched.
3. The new content is written into a temporary sibling directory and swapped in by renaming,
   so after a crash or a kill at any moment the target is either the complete old content or
   the complete new content, never a mix. On Linux the swap is one atomic
   ``renameat2(RENAME_EXCHANGE)``; elsewhere it is two renames.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import secrets
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

LOCK_FILE = ".mrvi_pyro.lock"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def is_zarr_store(path: Path) -> bool:
    """Whether ``path`` is the root of a zarr store (format 2 or 3)."""
    return (path / ".zgroup").is_file() or (path / "zarr.json").is_file()


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_target(path: str | os.PathLike, *, overwrite: bool, what: str,
                 replaceable: Callable[[Path], str | None], flag: str = "overwrite=True") -> Path:
    """Refuse a write to ``path`` unless it is free, or replaceable and ``overwrite`` is set.

    Parameters
    ----------
    path
        The directory about to be written.
    overwrite
        The caller's permission to replace an existing non-empty directory.
    what
        How the error messages name the target (e.g. ``"zarr_path"``).
    replaceable
        Returns None when an existing non-empty ``path`` is something mrvi_pyro wrote (and may
        be replaced), else the reason it is not. Required: no writer may replace a directory
        without saying what it recognises as its own.
    flag
        How the messages name the permission (``"--overwrite"`` on the command line).

    Raises
    ------
    ValueError
        When ``path`` is a file, is not writable, or is a non-empty directory and either
        ``overwrite`` is False or ``replaceable`` objects.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is an existing file, not a directory; choose another path.")
    existing = _nearest_existing(path.parent)
    if not existing.is_dir():
        raise ValueError(f"{what} {path} cannot be created: {existing} is a file, not a directory.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path} cannot be written: no write permission in {existing}.")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise ValueError(
                f"{what} {path} already exists and is not empty; pass {flag} to replace it, "
                "or choose a new path."
            )
        reason = replaceable(path)
        if reason is not None:
            raise ValueError(
                f"{what} {path} is not empty and {reason}, so mrvi_pyro will not replace it, even with "
                f"{flag} (nothing was deleted); choose another path."
            )
    return path


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2``); False where unsupported."""
    try:
        rename = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    return rename(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def sibling(path: Path, tag: str) -> Path:
    """A fresh hidden name beside ``path`` (``.<name>.<tag>-<random>``)."""
    return path.parent / f".{path.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"


def remove_stale_siblings(path: Path) -> None:
    """Remove the temporary siblings of ``path`` (:func:`sibling` names) left by a writer that was
    killed: only those whose process no longer runs; never anything else."""
    name = re.compile(rf"\.{re.escape(path.name)}\.(partial|old)-(\d+)-[0-9a-f]{{8}}")
    for entry in path.parent.iterdir():
        match = name.fullmatch(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and not process_running(int(match.group(2))):
            shutil.rmtree(entry, ignore_errors=True)


def replace_directory(new: Path, path: Path) -> None:
    """Move the directory ``new`` to ``path``, discarding what ``path`` held before.

    The old content is removed only after the new one is in place. A Ctrl-C during the swap
    is delivered once it is complete (:func:`deferred_interrupts`), so no sibling is left.
    """
    with deferred_interrupts():
        if not path.exists():
            os.replace(new, path)
            return
        if path.is_dir() and not any(path.iterdir()):
            os.replace(new, path)  # rename(2) replaces an empty directory atomically
            return
        if _exchange(new, path):
            shutil.rmtree(new)  # now holds the old content
            return
        old = sibling(path, "old")
        os.replace(path, old)
        os.replace(new, path)
        shutil.rmtree(old)


class StagedPath:
    """A checked target and the fresh sibling path its new content is written to first.

    :func:`check_target` runs on construction (before any work). Write to :attr:`staging`
    (not created here), then :meth:`commit` swaps it in place of :attr:`target`, or
    :meth:`discard` removes it and leaves the target untouched.
    """

    def __init__(self, path: str | os.PathLike, *, overwrite: bool, what: str,
                 replaceable: Callable[[Path], str | None], flag: str = "overwrite=True"):
        self.target = check_target(path, overwrite=overwrite, what=what, replaceable=replaceable, flag=flag)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.staging = sibling(self.target, "partial")

    def commit(self) -> Path:
        replace_directory(self.staging, self.target)
        return self.target

    def discard(self) -> None:
        with deferred_interrupts():
            shutil.rmtree(self.staging, ignore_errors=True)


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) until the block has ended, then deliver it.

    Used around the short sequences of renames and removals that must not be cut half-way
    (creating a staging directory, swapping it into place, removing it): an interrupt inside
    them would leave a stray sibling. Every writer goes through :func:`replace_directory` and
    :meth:`StagedPath.discard`, so all of them get this. Outside the main thread (where signal
    handlers cannot be set) it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):
                previous(signal.SIGINT, None)  # Python's default handler raises KeyboardInterrupt
            elif previous == signal.SIG_DFL:
                os.kill(os.getpid(), signal.SIGINT)


@contextlib.contextmanager
def staged_directory(path: str | os.PathLike, *, overwrite: bool, what: str,
                     replaceable: Callable[[Path], str | None],
                     flag: str = "overwrite=True") -> Iterator[Path]:
    """Yield a new temporary sibling directory of ``path``; on success it replaces ``path``.

    The target is checked first (:func:`check_target`). If the block raises (including
    ``KeyboardInterrupt``), the temporary directory is removed and ``path`` is untouched.
    """
    staged = StagedPath(path, overwrite=overwrite, what=what, replaceable=replaceable, flag=flag)
    with deferred_interrupts():
        staged.staging.mkdir()
    try:
        yield staged.staging
    except BaseException:
        staged.discard()
        raise
    staged.commit()  # a Ctrl-C during the swap arrives once the new version is in place


def move_into(source: Path, target: Path) -> None:
    """Move every entry of the directory ``source`` into ``target`` (merging sub-directories;
    files and zarr stores replace their namesakes one rename each), then remove ``source``."""
    target.mkdir(exist_ok=True)
    for entry in sorted(source.iterdir()):
        destination = target / entry.name
        if entry.is_dir() and not is_zarr_store(entry) and destination.is_dir():
            move_into(entry, destination)
        elif entry.is_dir():
            replace_directory(entry, destination)
        else:
            os.replace(entry, destination)
    source.rmdir()


@contextlib.contextmanager
def directory_lock(directory: Path, purpose: str) -> Iterator[Path]:
    """Hold ``directory/.mrvi_pyro.lock`` (created exclusively, holding our pid) for the block.

    A lock held by a live process is a ``ValueError``; one left by a process that no longer
    runs (killed) is taken over.
    """
    lock = directory / LOCK_FILE
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            owner = lock_owner(lock)
            if owner is not None:
                raise ValueError(
                    f"another mrvi-pyro process (pid {owner}) is writing to {directory}; wait for it to finish "
                    f"or choose another output directory (if no such process runs, delete {lock})."
                ) from None
            lock.unlink(missing_ok=True)  # its process is gone
    else:
        raise ValueError(f"could not take the lock {lock}; delete it if no mrvi-pyro process is running.")
    with os.fdopen(fd, "w") as file:
        file.write(f"{os.getpid()} {purpose}\n")
    try:
        yield lock
    finally:
        lock.unlink(missing_ok=True)


def lock_owner(lock: Path) -> int | None:
    """The pid holding ``lock`` if that process still runs, else None."""
    try:
        pid = int(lock.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if process_running(pid) else None


def process_running(pid: int) -> bool:
    """Whether a process with this id exists (also one of another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def zarr_replaceable(path: Path) -> str | None:
    """``replaceable`` rule of zarr targets: only an existing zarr store may be replaced."""
    return None if is_zarr_store(path) else "is not a zarr store"
