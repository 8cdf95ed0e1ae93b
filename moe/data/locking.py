"""Crash- and race-safe cache files: atomic writes (temp file + os.replace) and an inter-process file lock.

A reader either sees a complete file or none: a crash mid-write leaves only a temp file, which is never trusted.
The lock only saves duplicate work (several ranks tokenizing the same source); correctness comes from the atomic
rename, so where `fcntl` is missing (Windows) the lock is a no-op.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

# A check of a file is remembered by the file's stat record (size, mtime, ctime, inode) only when its last change is at
# least this long before the check: a write within the same timestamp tick (coarse on some file systems) would leave
# the record unchanged.
RACY_NS = 2_000_000_000


def now_ns() -> int:
    """The wall clock in nanoseconds, the clock of mtime and ctime (a function so that tests can move it)."""
    return time.time_ns()


try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[BinaryIO]:
    """Write to a temp file beside `path`; it replaces `path` only if the block finishes without an exception."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
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
