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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from moe.data.content_hash import FileReader, hash_files
from moe.data.readers import DataError, read_documents

STDLIB = "stdlib"
# Pre-tokenized shards: raw or NumPy-format token arrays, and the index or metadata files tools write beside them.
TOKEN_SUFFIXES = {".bin", ".npy"}
INDEX_SUFFIXES = (".idx", ".csv", ".csv.gz", ".json", ".txt.gz", ".md")
TOKEN_DTYPES = ("uint16", "uint32")
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
    data_files: str | list[str] | None = None
    """For "hf:" sources: the files of the dataset to load (datasets.load_dataset's data_files), e.g. a glob of
    parquet shards, or local files with "hf:json" / "hf:parquet"."""
    revision: str | None = None
    """For "hf:" sources: the dataset's git revision (branch, tag or commit) on the Hub."""
    streaming: bool = False
    """For "hf:" sources: read the dataset as a stream, tokenized on the fly in the DataLoader workers, instead of
    downloading and tokenizing it whole before training."""
    token_dtype: str = "uint16"
    """For pre-tokenized shards (.bin/.npy token arrays, nanoGPT / OLMo layout) without a NumPy header: the ids'
    type, uint16 or uint32. A .npy file with a header says its own."""


@dataclass
class Shard:
    """A part of a source tokenized to its own cache entry: one file of a folder or glob, or the whole of a source
    that is not a list of files (the embedded corpus, an HF dataset)."""

    key: str
    """Hash of the shard's content (and name): with the tokenizer's hash, the key of its token cache entry."""
    n_bytes: int
    documents: Callable[[], Iterator[str]]
    """Fresh iterator over the documents, in a fixed order."""
    description: str


@dataclass
class ResolvedSource:
    """A source bound to concrete content: name, hash of that content, its bytes on disk and its shards, whose
    documents in order are the source's."""

    name: str
    content_hash: str
    n_bytes: int
    shards: list[Shard]
    description: str
    token_dtype: str | None = None
    """Set for a source of pre-tokenized shards (each shard a token array file, not text): their ids' type."""
    streaming: bool = False
    """Read as a stream while training (streaming.py): no shards, nothing tokenized before step 1."""

    def documents(self) -> Iterator[str]:
        for shard in self.shards:
            yield from shard.documents()


def resolve_source(
    source: Source, stdlib_max_bytes: int | None = None, hash_cache: Path | None = None,
    scan_tokens: Callable[[Path, str], FileReader | None] | None = None,
) -> ResolvedSource:
    """Bind `source` to its files; `hash_cache` is a folder where content hashes of unchanged files are kept.
    `scan_tokens(path, token_dtype)` gives what else reads a pre-tokenized shard while it is hashed."""
    if not source.weight > 0:  # NaN too
        raise DataError(f"Source.weight={source.weight} must be positive (source {source.path!r})")
    if source.path == STDLIB:
        files, root = stdlib_files(stdlib_max_bytes), Path(sysconfig.get_paths()["stdlib"])
        name = source.name or "python-stdlib"
        description = f"Python {sysconfig.get_python_version()} stdlib"
        return _local_source(name, files, root, source.text_field, description, hash_cache, one_shard=True)
    if source.streaming:
        return _stream_source(source)
    if source.path.startswith(HF_PREFIX):
        return _hf_source(source)
    files, root = _expand_local_path(source.path)
    name = source.name or (Path(source.path).name or source.path)
    token_files = pretokenized_files(files, source.path)
    if token_files is not None:
        if source.token_dtype not in TOKEN_DTYPES:
            raise DataError(f"Source.token_dtype={source.token_dtype!r} must be one of {TOKEN_DTYPES} (source "
                            f"{source.path!r})")
        # The type is part of the key: the same bytes read as uint16 or uint32 are other tokens.
        also_read = None if scan_tokens is None else lambda path: scan_tokens(path, source.token_dtype)
        resolved = _local_source(name, token_files, root, f"tokens:{source.token_dtype}", source.path, hash_cache,
                                 also_read=also_read)
        resolved.token_dtype = source.token_dtype
        return resolved
    return _local_source(name, files, root, source.text_field, source.path, hash_cache)


def pretokenized_files(files: list[Path], where: str) -> list[Path] | None:
    """The token array files of a source of pre-tokenized shards, in order (index and metadata files beside them
    are left out: packing needs no document boundaries, the EOS ids in the stream mark them); None for a source of
    text. A mixture of both is refused, naming a file of each."""
    arrays = [f for f in files if f.suffix.lower() in TOKEN_SUFFIXES]
    if not arrays:
        return None
    text = [f for f in files if f.suffix.lower() not in TOKEN_SUFFIXES and not f.name.lower().endswith(INDEX_SUFFIXES)]
    if text:
        raise DataError(f"{where}: holds token arrays ({arrays[0]}) and other files ({text[0]}); give pre-tokenized "
                        "shards and text as separate sources")
    return arrays


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
    name: str, files: list[Path], root: Path, text_field: str, description: str, hash_cache: Path | None = None,
    one_shard: bool = False, also_read: Callable[[Path], FileReader | None] | None = None,
) -> ResolvedSource:
    """A source of local files: a shard per file, or all of them as one shard (`one_shard`, the embedded corpus of
    many small files, where a cache entry per file would cost more than it saves)."""
    content_hash, n_bytes, shard_hashes = hash_files(files, root, text_field, hash_cache, also_read)

    def reader(paths: list[Path]) -> Callable[[], Iterator[str]]:
        def documents() -> Iterator[str]:
            for path in paths:
                yield from read_documents(path, text_field)

        return documents

    if one_shard:
        shards = [Shard(content_hash, n_bytes, reader(files), description)]
    else:
        shards = [Shard(key, size, reader([path]), str(path)) for path, (key, size) in zip(files, shard_hashes)]
    return ResolvedSource(name, content_hash, n_bytes, shards, description)


def _stream_source(source: Source) -> ResolvedSource:
    """A streaming source, named by its settings: a stream is not read before training, so its content cannot be
    hashed; pin Source.revision for a Hub dataset whose content may change."""
    if not source.path.startswith(HF_PREFIX):
        raise DataError(f"Source.streaming is for {HF_PREFIX!r} sources (source {source.path!r}); local files are "
                        f"tokenized ahead, or read as a stream with path {HF_PREFIX}json / {HF_PREFIX}parquet and "
                        "data_files")
    key = json.dumps(["stream", source.path, source.data_files, source.split, source.revision, source.text_field])
    name = source.name or source.path[len(HF_PREFIX) :].partition(":")[0]
    return ResolvedSource(name=name, content_hash=hashlib.sha256(key.encode()).hexdigest(), n_bytes=0, shards=[],
                          description=f"{source.path} ({source.split}, streaming)", streaming=True)


def _hf_source(source: Source) -> ResolvedSource:
    import datasets

    name, _, config = source.path[len(HF_PREFIX) :].partition(":")
    dataset = datasets.load_dataset(name, config or None, split=source.split, data_files=source.data_files,
                                    revision=source.revision)
    if source.text_field not in dataset.column_names:
        raise DataError(f"{source.path}: no column {source.text_field!r} (columns: {dataset.column_names})")
    # The fingerprint is datasets' own hash of the data and its processing, the HF analogue of hashing bytes.
    key = f"hf\0{source.path}\0{source.split}\0{source.text_field}\0{dataset._fingerprint}"
    text_field = source.text_field

    def documents() -> Iterator[str]:
        for batch in dataset.select_columns([text_field]).iter(batch_size=1024):
            yield from (text for text in batch[text_field] if text)

    content_hash, description = hashlib.sha256(key.encode()).hexdigest(), f"{source.path} ({source.split})"
    n_bytes = int(dataset.data.nbytes)
    return ResolvedSource(name=source.name or name, content_hash=content_hash, n_bytes=n_bytes,
                          shards=[Shard(content_hash, n_bytes, documents, description)], description=description)
