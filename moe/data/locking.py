"""Crash- and race-safe cache files: atomic writes (temp file + os.replace) and an inter-process file lock.

A reader either sees a complete file or none: a crash mid-write leaves only a temp file, which is never trusted.
The lock only saves duplicate work (several ranks tokenizing the same shard); correctness comes from the atomic
rename. The lock is `filelock`'s (fcntl on POSIX, msvcrt on Windows), released by the operating system when its
holder dies, with a timeout: a process that waits longer than `MOE_LOCK_TIMEOUT` seconds (default one hour, longer
than tokenizing any one shard) stops with a message naming the lock and who holds it, instead of hanging.

Cache files are written readable by everyone the umask allows (0644 under the usual 022), as files opened with
`open()` are, so a team can share `MOE_CACHE_DIR`; `tempfile.mkstemp` alone would leave them 0600.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import filelock

from moe.errors import InputError

# A check of a file is remembered by the file's stat record (size, mtime, ctime, inode) only when its last change is at
# least this long before the check: a write within the same timestamp tick (coarse on some file systems) would leave
# the record unchanged.
RACY_NS = 2_000_000_000
DEFAULT_LOCK_TIMEOUT_S = 3600.0


def now_ns() -> int:
    """The wall clock in nanoseconds, the clock of mtime and ctime (a function so that tests can move it)."""
    return time.time_ns()


def lock_timeout() -> float:
    value = os.environ.get("MOE_LOCK_TIMEOUT", "")
    try:
        return float(value) if value else DEFAULT_LOCK_TIMEOUT_S
    except ValueError:
        raise InputError(f"$MOE_LOCK_TIMEOUT={value!r} is not a number of seconds") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file


@contextlib.contextmanager
def file_lock(path: Path, timeout: float | None = None) -> Iterator[None]:
    """Hold the lock `path` (created if needed) for the block. While held, `path.holder` names this process
    (host, pid, since when), so that a process that gives up waiting can say who it waited for."""
    path.parent.mkdir(parents=True, exist_ok=True)
    timeout = lock_timeout() if timeout is None else timeout
    holder = path.with_name(path.name + ".holder")
    lock = filelock.FileLock(str(path), mode=_FILE_MODE)
    try:
        lock.acquire(timeout=timeout)
    except filelock.Timeout:
        try:
            who = holder.read_text().strip()
        except OSError:
            who = "another process (unknown)"
        raise InputError(f"waited {timeout:.0f} s for the cache lock {path}, held by {who}; if that process is gone "
                         f"(a dead process frees its lock), another is still working on the same entry: wait for it, "
                         "raise $MOE_LOCK_TIMEOUT, or point $MOE_CACHE_DIR elsewhere") from None
    try:
        with contextlib.suppress(OSError):  # only for the message above
            holder.write_text(f"{socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[BinaryIO]:
    """Write to a temp file beside `path`; it replaces `path` only if the block finishes without an exception."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_output(path) as handle:
        handle.write(data)
