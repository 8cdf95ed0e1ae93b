"""Pre-tokenized shards in, and our token caches out, in the layout nanoGPT and OLMo use: flat arrays of token ids
(uint16 when the vocabulary fits, else uint32), one file per shard, documents separated by the EOS id.

In: a source whose files are `.bin` or `.npy` arrays trains on them directly, without copying. A `.npy` with a NumPy
header says its own type and shape; a raw one (OLMo's memory-mapped .npy, nanoGPT's .bin) is read as
`Source.token_dtype`. Each file is scanned once for the checks and statistics a tokenized shard gets from its
cache entry (CRC-32, largest id, the count of each id), kept under the cache folder by the file's content hash, so
that its ids are checked against the tokenizer and the model's vocabulary before step 1.

Out: `export_tokens` writes every source's stream of a prepared corpus as raw `.bin` shards plus a metadata.json
(dtype, EOS id, tokenizer hash, tokens per file) and the tokenizer, which this module reads back as a source.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import shutil
import zlib
from pathlib import Path

import numpy as np

from moe.data.datasets import TokenFile
from moe.data.locking import atomic_output, atomic_write_bytes
from moe.data.sources import DataError
from moe.data.token_cache import TokenCacheMeta
from moe.data.tokenizer import tokenizer_hash

_SCAN_TOKENS = 1 << 24  # tokens per read: bounds memory on any file size
_NUMPY_MAGIC = b"\x93NUMPY"
PRETOKENIZED = "pre-tokenized"  # the tokenizer hash such a shard's metadata carries: it was not tokenized here


def _layout(path: Path, token_dtype: str) -> tuple[int, np.dtype, int]:
    """(byte offset of the ids, their type, how many) of a token array file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        if f.read(len(_NUMPY_MAGIC)) == _NUMPY_MAGIC:
            f.seek(0)
            try:
                version = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, _fortran_order, dtype = read_header(f)
            except ValueError as error:
                raise DataError(f"{path}: a damaged NumPy header ({error})") from None
            offset = f.tell()
            if len(shape) != 1 or dtype.name not in ("uint16", "uint32"):
                raise DataError(f"{path}: a NumPy array of shape {shape} and type {dtype}; pre-tokenized shards are "
                                "1-d uint16 or uint32 arrays of token ids")
            if offset + shape[0] * dtype.itemsize != size:
                raise DataError(f"{path}: its header says {shape[0]} ids of {dtype}, but the file has {size} bytes "
                                "(truncated?)")
            return offset, dtype, shape[0]  # its byte order too (">u2"): kept in the dtype's str
    dtype = np.dtype(token_dtype)
    exported = _exported_dtype(path.parent)
    if exported is not None and exported != dtype.name:
        raise DataError(f"{path}: its folder's metadata.json (written by moe export-tokens) says the ids are "
                        f"{exported}, but Source.token_dtype is {dtype.name}; set token_dtype: {exported}")
    if size == 0 or size % dtype.itemsize:
        raise DataError(f"{path}: {size} bytes is not a whole number of {dtype} token ids; if the shards are another "
                        "type, set Source.token_dtype")
    if dtype == np.uint16:
        _refuse_uint32_read_as_uint16(path, np.memmap(path, dtype=np.uint16, mode="r"))
    return 0, dtype, size // dtype.itemsize


def _exported_dtype(folder: Path) -> str | None:
    """The ids' type `export_tokens` recorded in the folder's metadata.json, if it wrote one: read once per version
    of the file, not once per shard of a folder of thousands."""
    try:
        changed = (folder / "metadata.json").stat().st_mtime_ns
    except OSError:
        return None
    return _read_exported_dtype(folder / "metadata.json", changed)


@functools.lru_cache(maxsize=16)
def _read_exported_dtype(path: Path, changed: int) -> str | None:
    try:
        dtype = json.loads(path.read_text()).get("dtype")
    except (OSError, ValueError, AttributeError):
        return None
    return dtype if isinstance(dtype, str) else None


def _refuse_uint32_read_as_uint16(path: Path, ids: np.ndarray) -> None:
    """uint32 ids below 65,536 read as uint16 are the ids with a 0 after each, all below the vocabulary: nothing
    else would catch them. Every other id of the first 64K being 0 while the others are not is that pattern (no
    real text repeats one token at every other position)."""
    head = np.asarray(ids[: 1 << 16])
    if len(head) >= 256 and not head[1::2].any() and head[0::2].all():
        raise DataError(f"{path}: every other id is 0, as when uint32 ids are read as uint16; if the shards hold "
                        "uint32 ids, set Source.token_dtype: uint32")


def token_shard(path: Path, key: str, token_dtype: str, cache_dir: Path) -> tuple[TokenFile, TokenCacheMeta, Path]:
    """The token file of a pre-tokenized shard, its metadata (scanned once and kept under `cache_dir` by the
    file's content hash `key`; on first use, while it is hashed: `scan_while_hashing`) and where its id counts are
    kept."""
    offset, dtype, n_tokens = _layout(path, token_dtype)
    record = _record_path(cache_dir, key)
    meta = _read_record(record, n_tokens, dtype)
    if meta is None:  # its hash was remembered, but not this record (another cache folder, a deleted record)
        tokens = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(n_tokens,))
        scan = _Scan()
        for start in range(0, n_tokens, _SCAN_TOKENS):
            scan.update(tokens[start : start + _SCAN_TOKENS])
        meta = scan.keep(record, path, key, dtype, path.stat().st_size)
    return TokenFile(str(path), dtype.str, n_tokens, offset), meta, record.with_suffix(".counts.npy")


def _record_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / "pretokenized" / f"{key}.json"


class _Scan:
    """The CRC-32 of a token array and the count of each id in it, fed block by block."""

    def __init__(self):
        self.crc, self.n_tokens, self.counts = 0, 0, np.zeros(1, dtype=np.int64)

    def update(self, ids: np.ndarray) -> None:
        block = np.ascontiguousarray(ids)
        self.crc = zlib.crc32(block, self.crc)
        self.n_tokens += len(block)
        block_counts = np.bincount(block)
        if len(block_counts) > len(self.counts):
            self.counts = np.pad(self.counts, (0, len(block_counts) - len(self.counts)))
        self.counts[: len(block_counts)] += block_counts

    def keep(self, record: Path, path: Path, key: str, dtype: np.dtype, n_bytes: int) -> TokenCacheMeta:
        """The shard's metadata, written (with its counts) to `record` for the next use."""
        meta = TokenCacheMeta(n_tokens=self.n_tokens, n_docs=0, dtype=dtype.str, max_token_id=len(self.counts) - 1,
                              source=str(path), source_hash=key, bytes=n_bytes, tokenizer_hash=PRETOKENIZED,
                              crc32=self.crc)
        with contextlib.suppress(OSError):  # a read-only cache folder: scanned again next time
            with atomic_output(record.with_suffix(".counts.npy")) as out:
                np.save(out, self.counts, allow_pickle=False)
            atomic_write_bytes(record, json.dumps(meta.__dict__, indent=1).encode())
        return meta


def scan_while_hashing(path: Path, token_dtype: str, cache_dir: Path) -> _HashedScan | None:
    """A reader for content_hash.hash_files that scans a pre-tokenized shard from the bytes read for its content
    hash and keeps its record, so that on first use the file is read once, not once to hash and again in
    `token_shard`. None for a file `_layout` refuses: `token_shard` names the fault, as it would without this."""
    try:
        offset, dtype, n_tokens = _layout(path, token_dtype)
    except DataError:
        return None
    return _HashedScan(path, cache_dir, offset, dtype, n_tokens)


class _HashedScan:
    def __init__(self, path: Path, cache_dir: Path, offset: int, dtype: np.dtype, n_tokens: int):
        self.path, self.cache_dir, self.dtype, self.n_tokens = path, cache_dir, dtype, n_tokens
        self.header = offset  # bytes of the NumPy header still to pass
        self.rest = b""  # the bytes of an id split between two blocks
        self.scan = _Scan()

    def update(self, block: bytes) -> None:
        skipped = min(self.header, len(block))
        self.header -= skipped
        data = self.rest + block[skipped:]
        whole = len(data) - len(data) % self.dtype.itemsize
        self.rest = data[whole:]
        if whole:
            self.scan.update(np.frombuffer(data, dtype=self.dtype, count=whole // self.dtype.itemsize))

    def finish(self, file_hash: str, n_bytes: int) -> None:
        if self.rest or self.scan.n_tokens != self.n_tokens:
            return  # changed since _layout: not kept, token_shard scans what the file holds then
        record = _record_path(self.cache_dir, file_hash)
        if _read_record(record, self.n_tokens, self.dtype) is None:
            self.scan.keep(record, self.path, file_hash, self.dtype, n_bytes)


def _read_record(record: Path, n_tokens: int, dtype: np.dtype) -> TokenCacheMeta | None:
    try:
        meta = TokenCacheMeta(**json.loads(record.read_bytes()))
    except (OSError, ValueError, TypeError):
        return None
    return meta if (meta.n_tokens, meta.dtype) == (n_tokens, dtype.str) else None


def export_tokens(corpus, out_dir: str | Path) -> list[Path]:
    """Write each source of a prepared `TokenCorpus` as `out_dir/<source name>/part-NNNNN.bin` (one file per shard,
    raw ids), with a metadata.json and the tokenizer.json beside them; returns the folders written. A folder is
    itself a source of pre-tokenized shards (`Source(path=folder, token_dtype=...)`)."""
    out_dir = Path(out_dir)
    written = []
    for resolved, files in zip(corpus.resolved_sources(), corpus.files):
        if files is None:
            raise DataError(f"source {resolved.description!r} is streamed while training: it has no token cache to "
                            "export; leave it out, or tokenize it ahead (streaming: false)")
        # A name like "*.jsonl" (a glob's) would make a folder that reads back as a pattern.
        folder = out_dir / re.sub(r"[^A-Za-z0-9._-]+", "_", resolved.name).strip("_.")
        if folder.exists() and any(folder.iterdir()):
            raise DataError(f"{folder} exists and is not empty; give an empty or new folder")
        folder.mkdir(parents=True, exist_ok=True)
        parts = []
        for index, token_file in enumerate(files.files):
            target = folder / f"part-{index:05d}.bin"
            tokens = token_file.open()
            # Raw ids in this machine's byte order, as they are read back: a pre-tokenized shard's dtype may be
            # "<u2" or ">u2" (from a .npy header), a tokenized one's "uint16".
            native = np.dtype(np.dtype(token_file.dtype).name)
            with atomic_output(target) as out:
                for start in range(0, token_file.n_tokens, _SCAN_TOKENS):
                    out.write(np.ascontiguousarray(tokens[start : start + _SCAN_TOKENS], dtype=native).tobytes())
            parts.append({"file": target.name, "n_tokens": token_file.n_tokens})
        dtypes = {np.dtype(f.dtype).name for f in files.files}
        atomic_write_bytes(folder / "metadata.json", json.dumps({
            "source": resolved.description, "dtype": dtypes.pop() if len(dtypes) == 1 else sorted(dtypes),
            "eos_id": corpus.eos_id, "n_vocab": corpus.n_vocab, "tokenizer_hash": tokenizer_hash(corpus.tokenizer),
            "files": parts,
        }, indent=1).encode())
        tokenizer_json = folder / "tokenizer.json"
        corpus.tokenizer.save(str(tokenizer_json))
        shutil.copymode(folder / "metadata.json", tokenizer_json)
        written.append(folder)
    return written
