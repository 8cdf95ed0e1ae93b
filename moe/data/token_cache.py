"""Tokenized sources cached on disk as memory-mapped token arrays, keyed by source content and tokenizer.

Each source becomes one flat array `doc0 EOS doc1 EOS ...` (uint16 when the vocabulary fits, else uint32) plus a
metadata JSON beside it. The array is written first and the JSON last, both atomically, so the JSON is the commit
marker: a cache entry without it (a crash mid-way) is rebuilt, never trusted. Tokenization feeds chunks of documents
to `Tokenizer.encode_batch`, which runs on all cores in Rust.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from moe.data.locking import atomic_output, atomic_write_bytes, file_lock
from moe.data.sources import ResolvedSource
from moe.data.tokenizer import n_token_ids

CACHE_FORMAT = 1
# Documents are batched by bytes: large enough to keep every core busy, small enough to bound the memory of ids.
_CHUNK_BYTES = 4 << 20


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


def token_dtype(n_vocab: int) -> np.dtype:
    return np.dtype(np.uint16) if n_vocab <= 1 << 16 else np.dtype(np.uint32)


def cache_paths(cache_dir: Path, source: ResolvedSource, tokenizer_hash: str) -> tuple[Path, Path]:
    key = hashlib.sha256(f"{CACHE_FORMAT}\0{source.content_hash}\0{tokenizer_hash}".encode()).hexdigest()[:32]
    stem = cache_dir / "tokens" / key
    return stem.with_suffix(".bin"), stem.with_suffix(".json")


def load_cached(bin_path: Path, meta_path: Path) -> tuple[np.memmap, TokenCacheMeta] | None:
    """The cached array and its metadata, or None when the entry is missing or incomplete."""
    if not meta_path.is_file() or not bin_path.is_file():
        return None
    meta = TokenCacheMeta(**json.loads(meta_path.read_text()))
    dtype = np.dtype(meta.dtype)
    if bin_path.stat().st_size != meta.n_tokens * dtype.itemsize:
        return None
    return np.memmap(bin_path, dtype=dtype, mode="r", shape=(meta.n_tokens,)), meta


def tokenize_source(
    source: ResolvedSource,
    tokenizer: Tokenizer,
    eos_id: int,
    tokenizer_hash: str,
    cache_dir: Path,
    show_progress: bool = True,
) -> tuple[np.memmap, TokenCacheMeta]:
    """The source's token array, from the cache when present, else tokenized now and cached."""
    bin_path, meta_path = cache_paths(cache_dir, source, tokenizer_hash)
    if (cached := load_cached(bin_path, meta_path)) is not None:
        return cached
    with file_lock(bin_path.with_suffix(".lock")):
        if (cached := load_cached(bin_path, meta_path)) is not None:  # built by another process meanwhile
            return cached
        dtype = token_dtype(n_token_ids(tokenizer))
        n_tokens = n_docs = max_token_id = 0
        progress = tqdm(
            total=source.n_bytes, unit="B", unit_scale=True, desc=f"tokenizing {source.name}", disable=not show_progress
        )
        with atomic_output(bin_path) as out:
            for chunk in _chunks(source):
                ids = _encode_with_eos(tokenizer, chunk, eos_id)
                if ids.size and int(ids.max()) >= 1 << (8 * dtype.itemsize):
                    raise ValueError(f"token id {int(ids.max())} does not fit {dtype}")
                out.write(ids.astype(dtype).tobytes())
                n_tokens += ids.size
                n_docs += len(chunk)
                max_token_id = max(max_token_id, int(ids.max()))
                progress.update(sum(len(text.encode()) for text in chunk))
        progress.close()
        meta = TokenCacheMeta(
            n_tokens=n_tokens,
            n_docs=n_docs,
            dtype=dtype.name,
            max_token_id=max_token_id,
            source=source.description,
            source_hash=source.content_hash,
            bytes=source.n_bytes,
            tokenizer_hash=tokenizer_hash,
        )
        atomic_write_bytes(meta_path, json.dumps(asdict(meta), indent=1).encode())
    cached = load_cached(bin_path, meta_path)
    assert cached is not None
    return cached


def _chunks(source: ResolvedSource):
    chunk, size = [], 0
    for text in source.documents():
        chunk.append(text)
        size += len(text)
        if size >= _CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _encode_with_eos(tokenizer: Tokenizer, texts: list[str], eos_id: int) -> np.ndarray:
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    # add_special_tokens=False: an HF tokenizer's post-processor would otherwise add a BOS to every document,
    # while here documents are separated by EOS alone.
    lengths = [len(e.ids) + 1 for e in encodings]
    ids = np.empty(sum(lengths), dtype=np.int64)
    position = 0
    for encoding, length in zip(encodings, lengths):
        ids[position : position + length - 1] = encoding.ids
        ids[position + length - 1] = eos_id
        position += length
    return ids
