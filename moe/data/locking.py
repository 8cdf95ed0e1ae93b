"""Crash- and race-safe cache files: atomic writes (temp file + os.replace) and an inter-process file lock.

A reader either sees a complete file or none: a crash mid-write leaves only a temp file, which is never trusted.
The lock only saves duplicate work (several ranks tokenizing the same shard); correctness comes from the atomic
rename. The lock is `filelock`'s (fcntl on POSIX, msvcrt on Windows), released by the operating system when its
holder dies. Its holder keeps a heartbeat; a waiter whose holder has shown no sign of life for `MOE_LOCK_TIMEOUT`
seconds (default one hour) stops with a message naming the lock and who holds it, instead of hanging.

Cache files are written readable by everyone the umask allows (0644 under the usual 022), as files opened with
`open()` are, so a team can share `MOE_CACHE_DIR`; `tempfile.mkstemp` alone would leave them 0600.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import threading
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
    """Hold the lock `path` (created if needed) for the block.

    While held, `path.holder` names this process (host, pid, since when) and is touched every HEARTBEAT_S seconds;
    a waiter gives up only when the holder has shown no sign of life for `timeout` seconds (a hung process: a dead
    one frees the lock), so tokenizing one large shard for hours is waited for. A lock this process may not create
    or open (a cache folder shared read-only, a teammate's lock file) is done without: the lock only saves
    duplicate work, the atomic writes keep the cache correct."""
    timeout = lock_timeout() if timeout is None else timeout
    holder = path.with_name(path.name + ".holder")
    lock = filelock.FileLock(str(path), mode=_FILE_MODE)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _acquire(lock, holder, path, timeout)
        locked = True
    except PermissionError:
        locked = False
    if not locked:
        yield
        return
    alive = threading.Event()
    heartbeat = threading.Thread(target=_beat, args=(holder, alive), daemon=True)
    try:
        with contextlib.suppress(OSError):  # only for a waiter's message
            holder.write_text(f"{socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        heartbeat.start()
        yield
    finally:
        alive.set()
        if heartbeat.is_alive():
            heartbeat.join()
        lock.release()


HEARTBEAT_S = 30.0


def _acquire(lock: filelock.FileLock, holder: Path, path: Path, timeout: float) -> None:
    while True:
        try:
            lock.acquire(timeout=min(timeout, HEARTBEAT_S))
            return
        except filelock.Timeout:
            try:
                silent = time.time() - holder.stat().st_mtime
                who = holder.read_text().strip()
            except OSError:
                silent, who = timeout, "another process (unknown)"
            if silent >= timeout:
                raise InputError(f"waited for the cache lock {path}, held by {who}, which has shown no sign of life "
                                 f"for {silent:.0f} s ($MOE_LOCK_TIMEOUT={timeout:.0f}); if it hangs, stop it, or "
                                 "point $MOE_CACHE_DIR elsewhere") from None


def _beat(holder: Path, done: threading.Event) -> None:
    while not done.wait(HEARTBEAT_S):
        with contextlib.suppress(OSError):
            os.utime(holder)


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
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        if isinstance(error, OSError) and error.filename is None:  # a write or fsync: a full disk, a quota
            raise OSError(error.errno, error.strerror or str(error), str(path)) from error
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_output(path) as handle:
        handle.write(data)
