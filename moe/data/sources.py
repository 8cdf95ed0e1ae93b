"""Text sources: local text / JSONL / Parquet files, folders and globs, HF datasets, and the embedded corpus.

A `Source` is what the user writes in a config; `resolve_source` turns it into a `ResolvedSource` that knows its
content hash (the cache key), its size on disk, and how to stream its documents. Bad input fails loudly and names
the file (and for JSONL the line), because a silently skipped file is a silently different training run.

The embedded corpus is the running Python's standard library: it exists on every machine with no network, so the
quickstart downloads nothing (the same idea as training on one's own source code in nanoGPT's shakespeare_char
spirit: small, real, always there).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from moe.data import locking
from moe.data.locking import atomic_write_bytes
from moe.data.readers import DataError, read_documents

STDLIB = "stdlib"
HF_PREFIX = "hf:"
# Test suites are skipped: they are a large, repetitive and unrepresentative share of the stdlib.
_STDLIB_SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


@dataclass
class Source:
    """One entry of the training mixture."""

    path: str
    """"stdlib" (the embedded corpus), a file, folder or glob of .txt/.jsonl/.parquet, or "hf:<name>[:<config>]"."""
    weight: float = 1.0
    """Sampling weight; weights are normalised over all sources."""
    text_field: str = "text"
    """Field holding the text in JSONL, Parquet and HF records."""
    split: str = "train"
    """Split of an HF dataset."""
    name: str | None = None
    """Label in the report; defaults to the path's last component."""


@dataclass
class ResolvedSource:
    """A source bound to concrete content: name, hash of that content, its bytes on disk and a document stream."""

    name: str
    content_hash: str
    n_bytes: int
    documents: Callable[[], Iterator[str]]
    """Fresh iterator over the documents, in a fixed order."""
    description: str


def resolve_source(
    source: Source, stdlib_max_bytes: int | None = None, hash_cache: Path | None = None
) -> ResolvedSource:
    """Bind `source` to its files; `hash_cache` is a folder where content hashes of unchanged files are kept."""
    if not source.weight > 0:  # NaN too
        raise DataError(f"Source.weight={source.weight} must be positive (source {source.path!r})")
    if source.path == STDLIB:
        files, root = stdlib_files(stdlib_max_bytes), Path(sysconfig.get_paths()["stdlib"])
        name = source.name or "python-stdlib"
        description = f"Python {sysconfig.get_python_version()} stdlib"
        return _local_source(name, files, root, source.text_field, description, hash_cache)
    if source.path.startswith(HF_PREFIX):
        return _hf_source(source)
    files, root = _expand_local_path(source.path)
    name = source.name or (Path(source.path).name or source.path)
    return _local_source(name, files, root, source.text_field, source.path, hash_cache)


def stdlib_files(max_bytes: int | None = None) -> list[Path]:
    """The stdlib's .py files in sorted order, without test suites and empty files, up to `max_bytes` in total."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _STDLIB_SKIPPED_DIRS and not d.startswith(".")]
        found += [Path(directory, n) for n in names if n.endswith(".py") and not n.startswith("test_")]
    chosen, total = [], 0
    for path in sorted(found, key=lambda p: p.relative_to(root).as_posix()):
        size = path.stat().st_size
        if size == 0 or not _is_utf8(path):
            continue  # unlike user data, the embedded corpus just leaves out what it cannot use
        if max_bytes is not None and total + size > max_bytes:
            if total > 0:
                break
            continue
        chosen.append(path)
        total += size
    return chosen


def _is_utf8(path: Path) -> bool:
    try:
        path.read_bytes().decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _expand_local_path(path: str) -> tuple[list[Path], Path]:
    if any(c in path for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(path, recursive=True) if Path(p).is_file())
        if not files:
            raise FileNotFoundError(f"no files match the pattern {path!r}")
        return files, Path(os.path.commonpath([str(f.parent) for f in files]))
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"data source not found: {path!r}")
    if root.is_file():
        return [root], root.parent
    files = sorted(
        (
            p
            for p in root.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        ),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not files:
        raise DataError(f"folder {path!r} contains no files")
    return files, root


def _local_source(
    name: str, files: list[Path], root: Path, text_field: str, description: str, hash_cache: Path | None = None
) -> ResolvedSource:
    # Hashing reads every byte (minutes for a multi-GB corpus, on every rank, on every start), so the hash is
    # remembered under a key of the files' stat records (path, size, mtime, ctime, inode): an unchanged corpus is
    # not read again. ctime cannot be set back by tools that preserve mtime (cp -p, rsync, touch -d), and a record
    # is only stored for files older than locking.RACY_NS, so a write in the same timestamp tick as the hash is not missed.
    started = locking.now_ns()
    stats = _stat_key(files, root, text_field)
    record = hash_cache / f"{stats}.json" if hash_cache is not None else None
    if record is not None and (remembered := _read_hash_record(record)) is not None:
        content_hash, n_bytes = remembered
    else:
        content_hash, n_bytes = _hash_files(files, root, text_field)
        newest = max(max(p.stat().st_mtime_ns, p.stat().st_ctime_ns) for p in files)
        if record is not None and _stat_key(files, root, text_field) == stats and newest < started - locking.RACY_NS:
            atomic_write_bytes(record, json.dumps({"content_hash": content_hash, "n_bytes": n_bytes}).encode())

    def documents() -> Iterator[str]:
        for path in files:
            yield from read_documents(path, text_field)

    return ResolvedSource(name, content_hash, n_bytes, documents, description)


def _read_hash_record(record: Path) -> tuple[str, int] | None:
    """A remembered (content hash, bytes), or None when there is none or it is damaged (then hashed again and
    rewritten: the record is only a cache of what the files give)."""
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
    return content_hash, n_bytes


def _stat_key(files: list[Path], root: Path, text_field: str) -> str:
    digest = hashlib.sha256(f"stat\0{text_field}\0{root.resolve()}\0".encode())
    for path in files:
        st = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        digest.update(f"{st.st_ctime_ns}\0{st.st_ino}\0{st.st_dev}\0".encode())
    return digest.hexdigest()[:32]


def _hash_files(files: list[Path], root: Path, text_field: str) -> tuple[str, int]:
    """Content hash of the files (relative names and bytes) and their total size."""
    digest = hashlib.sha256(f"local\0{text_field}\0".encode())
    n_bytes = 0
    for path in files:
        # Relative names are hashed so a renamed or reordered file changes the key but a moved folder does not.
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
                n_bytes += len(block)
        digest.update(b"\0")
    return digest.hexdigest(), n_bytes


def _hf_source(source: Source) -> ResolvedSource:
    import datasets

    name, _, config = source.path[len(HF_PREFIX) :].partition(":")
    dataset = datasets.load_dataset(name, config or None, split=source.split)
    if source.text_field not in dataset.column_names:
        raise DataError(f"{source.path}: no column {source.text_field!r} (columns: {dataset.column_names})")
    # The fingerprint is datasets' own hash of the data and its processing, the HF analogue of hashing bytes.
    key = f"hf\0{source.path}\0{source.split}\0{source.text_field}\0{dataset._fingerprint}"
    text_field = source.text_field

    def documents() -> Iterator[str]:
        for batch in dataset.select_columns([text_field]).iter(batch_size=1024):
            yield from (text for text in batch[text_field] if text)

    return ResolvedSource(
        name=source.name or name,
        content_hash=hashlib.sha256(key.encode()).hexdigest(),
        n_bytes=int(dataset.data.nbytes),
        documents=documents,
        description=f"{source.path} ({source.split})",
    )
