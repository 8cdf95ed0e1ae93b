"""Content hashes of a source's files: the whole source's (its cache and resume key) and each file's (its shard's
token cache key), remembered so that an unchanged corpus is not read again.

Hashing reads every byte (minutes for a multi-GB corpus), so the hashes are remembered under a key of the files'
stat records (path, size, mtime, ctime, inode), and the process that hashes first (rank 0, say) holds a lock while
it does, so that the others read its record instead of hashing too. ctime cannot be set back by tools that preserve
mtime (cp -p, rsync, touch -d), and a record is only stored for files older than locking.RACY_NS, so a write in the
same timestamp tick as the hash is not missed. A changed or added file changes the key, and every file is read
again: hashing is cheap next to tokenizing, which the per-shard cache entries spare for all but the new or changed
files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from moe.data import locking
from moe.data.locking import atomic_write_bytes


class FileReader(Protocol):
    """Something else to do with a file's bytes while they are read for its hash (so they are read once)."""

    def update(self, block: bytes) -> None: ...

    def finish(self, file_hash: str, n_bytes: int) -> None: ...


def hash_files(files: list[Path], root: Path, text_field: str, hash_cache: Path | None = None,
               also_read: Callable[[Path], FileReader | None] | None = None) -> tuple[str, int, list[list]]:
    """(content hash of the files, their total bytes, [hash, bytes] of each file), from the record in `hash_cache`
    when the files are unchanged since it was written. When the files are read, `also_read(path)` may give a reader
    that is fed the same bytes and then the file's own hash (pre-tokenized shards are scanned so)."""
    stats = _stat_key(files, root, text_field)
    record = hash_cache / f"{stats}.json" if hash_cache is not None else None
    if record is not None and (remembered := _read_hash_record(record)) is not None:
        return remembered  # read without the lock: a cache shared read-only needs none
    with locking.file_lock(record.with_suffix(".lock")) if record is not None else contextlib.nullcontext():
        started = locking.now_ns()
        remembered = _read_hash_record(record) if record is not None else None  # another process may have hashed
        if remembered is not None:
            return remembered
        content_hash, n_bytes, shard_hashes = _hash_files(files, root, text_field, also_read)
        newest = max(max(p.stat().st_mtime_ns, p.stat().st_ctime_ns) for p in files)
        unchanged = _stat_key(files, root, text_field) == stats
        if record is not None and unchanged and newest < started - locking.RACY_NS:
            with contextlib.suppress(OSError):  # a read-only cache hashes again next time
                atomic_write_bytes(record, json.dumps({"content_hash": content_hash, "n_bytes": n_bytes,
                                                       "shards": shard_hashes}).encode())
        return content_hash, n_bytes, shard_hashes


def _read_hash_record(record: Path) -> tuple[str, int, list[list]] | None:
    """A remembered (content hash, bytes, [shard hash, shard bytes] per file), or None when there is none or it is
    damaged (then hashed again and rewritten: the record is only a cache of what the files give)."""
    if not record.is_file():
        return None
    try:
        remembered = json.loads(record.read_bytes())
        content_hash, n_bytes = remembered["content_hash"], remembered["n_bytes"]
    except (OSError, ValueError, TypeError, KeyError):  # ValueError: not UTF-8 or not JSON
        content_hash = n_bytes = None
    if not isinstance(content_hash, str) or not isinstance(n_bytes, int):
        warnings.warn(f"source hash cache {record} is unreadable (truncated, or not its JSON); hashing the files "
                      "again", stacklevel=4)
        return None
    shards = remembered.get("shards")
    if not isinstance(shards, list):
        return None  # written before per-file shards: hashed again, quietly
    return content_hash, n_bytes, shards


def _stat_key(files: list[Path], root: Path, text_field: str) -> str:
    digest = hashlib.sha256(f"stat\0{text_field}\0{root.resolve()}\0".encode())
    for path in files:
        st = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        digest.update(f"{st.st_ctime_ns}\0{st.st_ino}\0{st.st_dev}\0".encode())
    return digest.hexdigest()[:32]


def _hash_files(files: list[Path], root: Path, text_field: str,
                also_read: Callable[[Path], FileReader | None] | None = None) -> tuple[str, int, list[list]]:
    """Content hash of the files (relative names and bytes), their total size, and each file's own hash (its name
    and bytes) and size, in one read."""
    prefix = f"local\0{text_field}\0".encode()
    digest = hashlib.sha256(prefix)
    n_bytes, shards = 0, []
    for path in files:
        # Relative names are hashed so a renamed or reordered file changes the key but a moved folder does not. A
        # file's own hash is the whole-source hash of that file alone, so a source of one file keeps the key (and
        # the token cache) it had before sources were split into shards.
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        own = hashlib.sha256(prefix + path.name.encode() + b"\0")
        size = 0
        reader = also_read(path) if also_read is not None else None
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
                own.update(block)
                size += len(block)
                if reader is not None:
                    reader.update(block)
        digest.update(b"\0")
        own.update(b"\0")
        shards.append([own.hexdigest(), size])
        if reader is not None:
            reader.finish(own.hexdigest(), size)
        n_bytes += size
    return digest.hexdigest(), n_bytes, shards
