"""Files several processes share: atomic replacement and ``fcntl.flock`` locks (stdlib only).

One bottom module for the host (state and env files, the watchdog's owners and lock, the image
build lock) and for code that runs inside worker containers (ready files, cassettes, the LM's run
limits, ledger and markers). It imports nothing from provisioner, so every layer may use it.

* :func:`atomic_write` — readers see the old or the new content, never a mix; a writer killed
  mid-write leaves at most a hidden ``.<name>.*.tmp`` beside the file, never a half file in place.
* :func:`locked` — hold an exclusive lock on a lock file (blocking); :func:`flocked` — the same on
  an fd that stays open (the ledger keeps its lock file open across appends).
* :func:`try_lock` — take the lock without waiting, or learn that someone holds it.

``flock`` locks belong to the open file description: they are shared by threads of a process,
released when the last fd closes or the holder dies (also on ``kill -9``), and work across
processes and containers that bind-mount the same directory on one host. Written here rather
than taken from a library (filelock, portalocker) because the callers need what those hide: the
fd (group-shared modes chosen at open, locking the temp file of a write in progress) and no
lock-file deletion (a deleted lock file breaks mutual exclusion for a process that opened it).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

TEMP_SUFFIX = ".tmp"


def atomic_write(
    path: Path,
    data: str | bytes,
    *,
    mode: int = 0o644,
    fsync: bool = False,
    hold_lock: bool = False,
) -> Path:
    """Replace ``path`` with ``data`` (``str`` is written as UTF-8) atomically; returns ``path``.

    The parent directory is created. ``mode``: the file's permission bits, set exactly (the umask
    does not apply; e.g. ``0o600`` for a file holding a secret, readable by its owner from the
    first byte). ``fsync``: flush to disk before the rename (durable across a power cut).
    ``hold_lock``: hold an exclusive ``flock`` on the temporary file while it is written and
    renamed, so a reader can tell a write in progress (locked) from an abandoned one (see
    :func:`try_lock`). The temporary file is ``.<name>.<random>.tmp`` beside ``path``.

    Raises:
        OSError: the directory or file cannot be written (nothing is left behind).
    """
    payload = data.encode("utf-8") if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        if hold_lock:
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.fchmod(fd, mode)
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view):]
        if fsync:
            os.fsync(fd)
        os.replace(tmp, path)  # still locked (hold_lock): the temp name never exists unlocked
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)
    return path


@contextlib.contextmanager
def flocked(fd: int) -> Iterator[int]:
    """Hold an exclusive ``flock`` on the open ``fd`` for the block (waits for it); yields ``fd``."""
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield fd
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


@contextlib.contextmanager
def locked(path: Path, *, mode: int = 0o666, on_open: Callable[[int], object] | None = None) -> Iterator[int]:
    """Hold the exclusive lock of the lock file ``path`` for the block (created with ``mode``,
    less the umask, when missing; never deleted); waits for it. ``on_open(fd)`` runs before the
    lock is taken (e.g. to make the file group-writable). Yields the fd."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)
    try:
        if on_open is not None:
            on_open(fd)
        with flocked(fd):
            yield fd
    finally:
        os.close(fd)


def try_lock(path: Path, *, create: bool = True) -> int | None:
    """Take the exclusive lock of ``path`` without waiting.

    Returns the fd that holds it (close it to release; the lock also ends with the process), or
    ``None`` when another open file holds it. ``create=False``: do not create a missing file.

    Raises:
        FileNotFoundError: ``path`` is missing and ``create`` is false.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC if create else os.O_RDONLY | os.O_CLOEXEC
    fd = os.open(path, flags, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd
