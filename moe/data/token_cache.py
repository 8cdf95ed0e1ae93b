"""Tokenized shards cached on disk as memory-mapped token arrays, keyed by shard content and tokenizer.

Each shard of a source (a file of a folder or glob; the whole of the embedded corpus or of an HF dataset) becomes
one flat array `doc0 EOS doc1 EOS ...` (uint16 when the vocabulary fits, else uint32), the count of each token id in
it, and a metadata JSON. The array and counts are written first and the JSON last, each atomically, so the JSON is
the commit marker: an entry without it (a crash mid-way) is rebuilt, never trusted, while the shards finished
before a crash are kept, and adding a shard to a source tokenizes only that one. A source's stream is its shards'
arrays in order. The counts give the unigram baseline without another pass over the corpus. Tokenization runs in
`num_proc` processes (parallel_tokenize.py), reading and writing while they encode.

The metadata holds the CRC-32 of the array and its largest id, so that an array changed after it was written (other
valid ids written into it, a copy of another entry, a truncation) is found and rebuilt rather than trained on, and
`max_token_id` is the array's, not a stale claim. Verifying reads the whole array (about 0.35 s per GB from the page
cache on 2 cores, more from a cold disk, on every rank), so it is done when the array's stat record (size, mtime,
ctime, inode, device) differs from the one of its last verification, kept in a `.verified` file beside it: any write
or replacement of the file changes its ctime, which tools that preserve mtime cannot set back. An unchanged file is
trusted without reading it. Entries written before checksums existed get theirs computed and written on first use.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from moe.data import locking
from moe.data.datasets import TokenFile
from moe.data.locking import atomic_output, atomic_write_bytes, file_lock
from moe.data.parallel_tokenize import encode_chunks
from moe.data.sources import DataError, ResolvedSource, Shard
from moe.data.tokenizer import n_token_ids

# The key's format version. Entries without a checksum (before it was added) keep their key: they are upgraded in
# place, since re-tokenizing a large corpus takes hours.
CACHE_FORMAT = 1
# Documents are batched by bytes: large enough to keep every core busy, small enough to bound the memory of ids.
_CHUNK_BYTES = 4 << 20
# Tokens per read when verifying an array: bounds the memory of a pass over a corpus of any size.
_SCAN_TOKENS = 1 << 24


@dataclass
class TokenCacheMeta:
    n_tokens: int
    n_docs: int
    dtype: str
    max_token_id: int
    source: str
    source_hash: str
    bytes: int
    tokenizer_hash: str
    crc32: int | None = None
    """zlib CRC-32 of the array's bytes; None in entries written before checksums (computed on first use)."""


def counts_path(bin_path: Path) -> Path:
    """Where the count of each id in a cache entry's array is kept."""
    return bin_path.with_suffix(".counts.npy")


def token_dtype(n_vocab: int) -> np.dtype:
    return np.dtype(np.uint16) if n_vocab <= 1 << 16 else np.dtype(np.uint32)


def cache_paths(cache_dir: Path, shard_key: str, tokenizer_hash: str) -> tuple[Path, Path]:
    key = hashlib.sha256(f"{CACHE_FORMAT}\0{shard_key}\0{tokenizer_hash}".encode()).hexdigest()[:32]
    stem = cache_dir / "tokens" / key
    return stem.with_suffix(".bin"), stem.with_suffix(".json")


def load_cached(
    bin_path: Path, meta_path: Path, n_vocab: int | None = None
) -> tuple[tuple[np.memmap, TokenCacheMeta] | None, str | None]:
    """The cached array and its verified metadata, else (None, why the entry cannot be used): why is None when
    there is no entry (never built, or a crash before its metadata was written), else a sentence naming the file.

    An entry is refused when its metadata is unreadable, its array is not the size the metadata says, the array's
    CRC-32 or largest id differ from the metadata's, or it holds an id of `n_vocab` or more (not this tokenizer's).
    """
    if not meta_path.is_file() or not bin_path.is_file():
        return None, None
    meta = _read_meta(meta_path)
    if meta is None:
        return None, f"metadata {meta_path} is unreadable (truncated, or not a token cache's JSON)"
    dtype = np.dtype(meta.dtype)
    size = bin_path.stat().st_size
    if size != meta.n_tokens * dtype.itemsize:
        return None, f"{bin_path} has {size} bytes, but its metadata says {meta.n_tokens} tokens of {meta.dtype}"
    tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(meta.n_tokens,))
    stamp = bin_path.with_suffix(".verified")
    if meta.crc32 is not None and _read_stamp(stamp) == {"stat": _stat_record(bin_path), "crc32": meta.crc32}:
        return (tokens, meta), None  # unchanged since it was last verified
    started, record = locking.now_ns(), _stat_record(bin_path)
    crc, largest = _scan(tokens)
    if meta.crc32 is not None and crc != meta.crc32:
        return None, (f"{bin_path} does not match its checksum (CRC-32 {crc:08x}, metadata {meta.crc32:08x}): it "
                      "was changed after it was written")
    if largest != meta.max_token_id:
        return None, (f"{bin_path} holds ids up to {largest}, but its metadata says {meta.max_token_id}: it was "
                      "changed after it was written")
    if n_vocab is not None and largest >= n_vocab:
        return None, f"{bin_path} holds token id {largest}, beyond the tokenizer's {n_vocab} ids"
    if meta.crc32 is None:  # written before checksums: record it, so that later changes are found
        meta = replace(meta, crc32=crc)
        with contextlib.suppress(OSError):  # a read-only cache still works, verified at every open
            atomic_write_bytes(meta_path, _meta_json(meta))
    # A write in the same timestamp tick as the file's last change would leave its stat record unchanged, so only a
    # file whose last change is well before this verification is marked verified (as for source hashes).
    newest = max(bin_path.stat().st_mtime_ns, bin_path.stat().st_ctime_ns)
    if _stat_record(bin_path) == record and newest < started - locking.RACY_NS:
        with contextlib.suppress(OSError):
            atomic_write_bytes(stamp, json.dumps({"stat": record, "crc32": crc}).encode())
    return (tokens, meta), None


def _read_meta(meta_path: Path) -> TokenCacheMeta | None:
    try:
        meta = TokenCacheMeta(**json.loads(meta_path.read_bytes()))
        np.dtype(meta.dtype)
    except (OSError, ValueError, TypeError):  # ValueError covers JSONDecodeError and UnicodeDecodeError
        return None
    numbers = (meta.n_tokens, meta.max_token_id, 0 if meta.crc32 is None else meta.crc32)
    return meta if all(isinstance(n, int) for n in numbers) and meta.n_tokens > 0 else None


def _read_stamp(path: Path) -> dict | None:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):  # missing or damaged: verify again
        return None


def _stat_record(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}:{st.st_dev}"


def _meta_json(meta: TokenCacheMeta) -> bytes:
    return json.dumps(asdict(meta), indent=1).encode()


def _scan(tokens: np.ndarray) -> tuple[int, int]:
    """CRC-32 of the array's bytes and its largest id, reading it once in bounded chunks."""
    crc, largest = 0, 0
    for start in range(0, len(tokens), _SCAN_TOKENS):
        block = np.ascontiguousarray(tokens[start : start + _SCAN_TOKENS])
        crc = zlib.crc32(block, crc)
        largest = max(largest, int(block.max()))
    return crc, largest


def tokenize_source(
    source: ResolvedSource,
    tokenizer: Tokenizer,
    eos_id: int,
    tokenizer_hash: str,
    cache_dir: Path,
    show_progress: bool = True,
    num_proc: int = 1,
) -> list[tuple[TokenFile, TokenCacheMeta]]:
    """Each of the source's shards as a token file with its metadata, from the cache when present and intact,
    else tokenized now (with `num_proc` processes) and cached. One progress bar in bytes covers the source, shown
    from the first shard that is tokenized (a source read wholly from the cache shows none)."""
    bar = _SourceProgress(source, show_progress)
    try:
        entries = []
        for shard in source.shards:
            bar.start_shard(shard.n_bytes)
            tokens, meta = tokenize_shard(shard, tokenizer, eos_id, tokenizer_hash, cache_dir, bar.advance, num_proc)
            # The file, not its memory map: a map holds a file descriptor, and a source may have many thousand shards.
            entries.append((TokenFile(str(tokens.filename), meta.dtype, meta.n_tokens), meta))
            del tokens
            bar.shard_done()
        return entries
    finally:
        bar.close()


class _SourceProgress:
    """A source's progress bar in bytes of its files, created at the first bytes tokenized. Text and file bytes
    differ (JSON syntax adds bytes, Parquet compresses them), so within a shard the bar moves by text bytes up to the
    shard's file size, and each shard's end moves it to exactly that: it reaches 100% whatever the format."""

    def __init__(self, source: ResolvedSource, show: bool):
        self.source, self.show = source, show
        self.bar: tqdm | None = None
        self.finished = 0  # file bytes of the shards done
        self.shard_bytes = self.in_shard = 0  # the current shard's file bytes, and how far the bar moved in it

    def start_shard(self, n_bytes: int) -> None:
        self.shard_bytes, self.in_shard = n_bytes, 0

    def advance(self, text_bytes: int) -> None:
        if self.bar is None:
            self.bar = tqdm(total=self.source.n_bytes, initial=self.finished, unit="B", unit_scale=True,
                            desc=f"tokenizing {self.source.name}", disable=not self.show)
        step = min(text_bytes, self.shard_bytes - self.in_shard)
        self.in_shard += step
        self.bar.update(step)

    def shard_done(self) -> None:
        if self.bar is not None:
            self.bar.update(self.shard_bytes - self.in_shard)
        self.finished += self.shard_bytes

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def tokenize_shard(shard: Shard, tokenizer: Tokenizer, eos_id: int, tokenizer_hash: str, cache_dir: Path,
                   progress: Callable[[int], None] | None = None,
                   num_proc: int = 1) -> tuple[np.memmap, TokenCacheMeta]:
    """The shard's token array, from the cache when present and intact, else tokenized now and cached.

    A cache that cannot be written (a read-only folder, a full disk) is a `DataError` naming the entry, unless the
    entry is there and intact: a read-only cache of verified entries is fine."""
    bin_path, meta_path = cache_paths(cache_dir, shard.key, tokenizer_hash)
    n_vocab = n_token_ids(tokenizer)
    cached, problem = load_cached(bin_path, meta_path, n_vocab)
    if cached is not None:
        return cached
    try:
        with file_lock(bin_path.with_suffix(".lock")):
            cached, problem = load_cached(bin_path, meta_path, n_vocab)  # another process may have built it meanwhile
            if cached is not None:
                return cached
            if problem is not None:
                warnings.warn(f"token cache: {problem}; rebuilding it from {shard.description}", stacklevel=2)
            return _tokenize(shard, tokenizer, eos_id, tokenizer_hash, bin_path, meta_path, n_vocab, progress,
                             num_proc)
    except OSError as error:
        if not (error.filename and Path(error.filename).resolve().is_relative_to(cache_dir.resolve())):
            raise  # not the cache's: reading the source, say
        why = f"{problem}, and it cannot be rebuilt" if problem else f"{bin_path} cannot be written"
        raise DataError(f"token cache: {why} ({error.strerror or error}: {error.filename}); point $MOE_CACHE_DIR "
                        "or TextDataModule.cache_dir at a writable folder with free space") from error


def _tokenize(shard: Shard, tokenizer: Tokenizer, eos_id: int, tokenizer_hash: str, bin_path: Path,
              meta_path: Path, n_vocab: int, progress: Callable[[int], None] | None,
              num_proc: int) -> tuple[np.memmap, TokenCacheMeta]:
    """Tokenize `shard` into a new cache entry (under its lock) and return it."""
    dtype = token_dtype(n_vocab)
    n_tokens = n_docs = crc = 0
    counts = np.zeros(n_vocab, dtype=np.int64)
    with atomic_output(bin_path) as out:
        for ids, docs, text_bytes in encode_chunks(_chunks(shard), tokenizer, eos_id, num_proc, dtype):
            data = ids.tobytes()
            out.write(data)
            crc = zlib.crc32(data, crc)
            counts += np.bincount(ids, minlength=n_vocab)
            n_tokens += ids.size
            n_docs += docs
            if progress is not None:
                progress(text_bytes)
    max_token_id = int(np.flatnonzero(counts)[-1]) if n_tokens else 0
    meta = TokenCacheMeta(
        n_tokens=n_tokens,
        n_docs=n_docs,
        dtype=dtype.name,
        max_token_id=max_token_id,
        source=shard.description,
        source_hash=shard.key,
        bytes=shard.n_bytes,
        tokenizer_hash=tokenizer_hash,
        crc32=crc,
    )
    _write_counts(counts_path(bin_path), counts[: max_token_id + 1])
    atomic_write_bytes(meta_path, _meta_json(meta))
    # Just written from the bytes checksummed above: not read again (the next open verifies it).
    return np.memmap(bin_path, dtype=dtype, mode="r", shape=(n_tokens,)), meta


def _write_counts(path: Path, counts: np.ndarray) -> None:
    with atomic_output(path) as out:
        np.save(out, counts, allow_pickle=False)


def token_counts(tokens: np.ndarray, meta: TokenCacheMeta, path: Path) -> np.ndarray:
    """How often each id (0 to max_token_id) occurs in a shard's array `tokens`: from the counts kept at `path` since
    it was tokenized or scanned, or, for an entry written before counts were kept (or whose counts file is damaged),
    counted now and written."""
    with contextlib.suppress(OSError, ValueError):
        counts = np.load(path, allow_pickle=False)
        if counts.dtype == np.int64 and counts.shape == (meta.max_token_id + 1,) and int(counts.sum()) == meta.n_tokens:
            return counts
    counts = np.zeros(meta.max_token_id + 1, dtype=np.int64)
    for start in range(0, meta.n_tokens, _SCAN_TOKENS):
        counts += np.bincount(tokens[start : start + _SCAN_TOKENS], minlength=meta.max_token_id + 1)
    with contextlib.suppress(OSError):  # a read-only cache counts again next time
        _write_counts(path, counts)
    return counts


def _chunks(shard: Shard):
    chunk, size = [], 0
    for text in shard.documents():
        chunk.append(text)
        size += len(text)
        if size >= _CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk
