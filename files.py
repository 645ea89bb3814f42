"""Safe file writes and locks, the lowest layer: it imports nothing from the project.

Every file the tool writes goes through :func:`write_atomic` (temporary file, flush, fsync, rename), so a crash or a
full disk never leaves a half-written file in place of a good one. :func:`lock` and :func:`acquire_lock` keep two
processes from writing the same run folder or data root at once: an exclusive ``flock`` on a lock file, which the
operating system releases when its process ends, so a lock left by a killed process is taken over on the next try.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch


class DiskFull(OSError):
    """A file could not be written because its disk is full (``errno.ENOSPC``); ``path`` is the file. Nothing was
    replaced: the file that was there before (if any) is intact."""

    def __init__(self, path: Path, detail: str = "the disk is full") -> None:
        super().__init__(errno.ENOSPC, f"could not write {path}: {detail}")
        self.path = Path(path)


# torch.save reports a failed write of its zip container as a RuntimeError ("[enforce fail at inline_container.cc:...]
# PytorchStreamWriter failed writing file data/0: file write failed"), not as an OSError: a full disk, in practice.
_TORCH_WRITE_FAILED = ("PytorchStreamWriter failed writing", "inline_container.cc")
_NEARLY_FULL = 64 * 2**20  # bytes free below which a write that failed without an errno is taken for a full disk


def free_bytes(folder: Path) -> int:
    """Bytes free for this user on ``folder``'s file system (0 when it cannot be asked)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0


def write_atomic(path: Path, write) -> None:
    """Call ``write(f)`` on a temporary file beside ``path`` and rename it into place once it is on disk. On an
    ``OSError`` (e.g. a full disk), or torch's RuntimeError for a write that failed, the temporary file is removed,
    ``path`` is untouched and the error names ``path``: :class:`DiskFull` for a full disk, else an ``OSError``. On any
    other exception (a Ctrl-C included) the temporary file is removed too and the exception goes on unchanged."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as err:
        torch_failed = isinstance(err, RuntimeError) and any(m in str(err) for m in _TORCH_WRITE_FAILED)
        if isinstance(err, RuntimeError) and not torch_failed:
            _remove(tmp)
            raise
        free = free_bytes(path.parent)  # measured before the temporary file gives its space back
        _remove(tmp)
        if (not torch_failed and err.errno == errno.ENOSPC) or (torch_failed and free < _NEARLY_FULL):
            raise DiskFull(path) from err
        if torch_failed:
            detail = str(err).strip().splitlines()[-1][:200]
            raise OSError(
                errno.EIO,
                f"could not write {path}: torch could not write it ({detail}); {free / 2**20:.0f} MiB free there",
            ) from err
        raise OSError(err.errno, f"could not write {path}: {err.strerror or err}") from err
    except BaseException:  # a Ctrl-C, or any other error inside write(): nothing half-written is left beside path
        _remove(tmp)
        raise
    os.replace(tmp, path)


def _remove(tmp: Path) -> None:
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    write_atomic(path, lambda f: np.save(f, array))


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode()))


def save_torch_atomic(obj, path: Path) -> None:
    write_atomic(path, lambda f: torch.save(obj, f))


class LockError(Exception):
    """Another live process holds the lock; the message names it and says what to do."""


class Lock:
    """A held lock (from :func:`acquire_lock`); :meth:`release` frees it (ending the process frees it too)."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self._fd: int | None = fd
        self._pid = os.getpid()

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Free the lock; the lock file stays (removing it could let two processes lock two different files)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            if os.getpid() == self._pid:  # a forked child (a DataLoader worker) shares the lock: never unlock it there
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __del__(self) -> None:  # a Lock dropped without release() (e.g. an exception's frames) still frees it
        with contextlib.suppress(Exception):
            self.release()

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(path: Path) -> tuple[str, str]:
    """The pid and host the holder wrote into the lock file ("" when unknown)."""
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    pid, _, host = text.partition(" ")
    return (pid, host) if pid.isdigit() else ("", "")


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        return False
    return True


def acquire_lock(path: Path, what: str) -> Lock:
    """Take the exclusive lock ``path`` (created if needed) for as long as the returned :class:`Lock` is held.

    ``what`` names the locked thing for the message (e.g. "The run folder runs/x"). Raises :class:`LockError` when
    another live process holds it; a lock whose process has died is free (the OS released it) and is taken over.
    An ``OSError`` creating the lock file (read-only folder, ...) is passed on.
    """
    path = Path(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        locked = _try_flock(fd)
        pid, host = ("", "") if locked else _holder(path)
        if not locked and pid == str(os.getpid()) and host == socket.gethostname():
            gc.collect()  # held by this process: perhaps by a Lock nobody can reach any more (freed by its __del__)
            locked = _try_flock(fd)
    except BaseException:
        os.close(fd)
        raise
    if not locked:
        os.close(fd)
        holder = f"pid {pid} on host {host or 'unknown'}" if pid else "holder unknown"
        raise LockError(
            f"{what} is in use by another process ({holder}, lock file {path}): wait for it to finish, or stop it "
            "first. A lock whose process has ended is taken over by itself; if none is running and this persists "
            "(e.g. a network file system), delete the lock file."
        )
    with contextlib.suppress(OSError):  # who holds it, for the message another process gets
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    return Lock(path, fd)


@contextlib.contextmanager
def lock(path: Path, what: str) -> Iterator[Lock]:
    """``with lock(path, what):`` holds the lock for the block; see :func:`acquire_lock`."""
    held = acquire_lock(path, what)
    try:
        yield held
    finally:
        held.release()


DATA_LOCK_NAME = ".largeloss.lock"
LOCK_WAIT_S = 3600.0  # how long a process waits for another that is writing the same derived files


@contextlib.contextmanager
def data_lock(folder: Path, what: str, lock_file: Path | None = None, wait_s: float | None = None) -> Iterator[None]:
    """Hold ``folder/.largeloss.lock`` (or ``lock_file``) for the block, so two processes never write the same derived
    files at once. While another process holds it, wait (saying so once) up to ``wait_s`` (``LOCK_WAIT_S``), then
    raise ``LockError``. A lock left by a killed process is free (see ``acquire_lock``)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = lock_file if lock_file is not None else folder / DATA_LOCK_NAME
    wait = LOCK_WAIT_S if wait_s is None else wait_s
    deadline = time.monotonic() + wait
    said = False
    while True:
        try:
            held = acquire_lock(path, what)
            break
        except LockError as err:
            if not said and wait > 0:
                print(f"{err} Waiting for it (up to {wait:.0f} s) ...", flush=True)
                said = True
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)
    try:
        yield
    finally:
        held.release()
