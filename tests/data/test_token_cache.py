"""The token cache: content equals a brute-force per-document encoding, reuse, crash safety, and an array changed
after it was written (other valid ids, ids past the vocabulary, damaged metadata) rebuilt instead of trained on."""

import errno
import json
import os
import time
import zlib

import numpy as np
import pytest

from moe.data import locking, parallel_tokenize, token_cache
from moe.data.sources import DataError, Source, resolve_source
from moe.data.token_cache import cache_paths, token_dtype, tokenize_source
from moe.data.tokenizer import eos_id, tokenizer_hash, train_tokenizer


@pytest.fixture
def setup(tmp_path, helpers):
    docs = helpers.make_documents(60, seed=2)
    source = resolve_source(Source(str(helpers.write_jsonl(tmp_path / "d.jsonl", docs))))
    tokenizer = train_tokenizer(docs, 350)
    return docs, source, tokenizer, tmp_path / "cache"


def build(source, tokenizer, cache_dir):
    ((file, meta),) = tokenize_source(
        source, tokenizer, eos_id(tokenizer), tokenizer_hash(tokenizer), cache_dir, show_progress=False
    )
    return file.open(), meta


def oracle_stream(docs, tokenizer):
    stream = []
    for doc in docs:
        stream += tokenizer.encode(doc, add_special_tokens=False).ids + [eos_id(tokenizer)]
    return stream


@pytest.mark.parametrize("chunk_bytes", [1, 500, 1 << 20])
def test_stream_is_documents_each_followed_by_eos(setup, monkeypatch, chunk_bytes):
    docs, source, tokenizer, cache_dir = setup
    monkeypatch.setattr(token_cache, "_CHUNK_BYTES", chunk_bytes)
    tokens, meta = build(source, tokenizer, cache_dir)
    expected = oracle_stream(docs, tokenizer)
    assert tokens.tolist() == expected
    assert tokens.dtype == np.uint16 and isinstance(tokens, np.memmap)
    assert (meta.n_tokens, meta.n_docs, meta.max_token_id) == (len(expected), len(docs), max(expected))
    assert meta.bytes == source.n_bytes and meta.dtype == "uint16"
    assert meta.crc32 == zlib.crc32(np.asarray(expected, dtype=np.uint16).tobytes())


def test_second_build_reads_the_cache(setup, monkeypatch):
    _docs, source, tokenizer, cache_dir = setup
    first, _ = build(source, tokenizer, cache_dir)

    def must_not_encode(*args):
        raise AssertionError("re-tokenized although cached")

    monkeypatch.setattr(parallel_tokenize, "encode_with_eos", must_not_encode)
    second, _ = build(source, tokenizer, cache_dir)
    assert second.tolist() == first.tolist()


def test_crash_mid_write_leaves_nothing_trusted(setup, monkeypatch):
    docs, source, tokenizer, cache_dir = setup
    monkeypatch.setattr(token_cache, "_CHUNK_BYTES", 100)
    real_encode, calls = parallel_tokenize.encode_with_eos, []

    def crash_on_third_chunk(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_encode(*args)

    monkeypatch.setattr(parallel_tokenize, "encode_with_eos", crash_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        build(source, tokenizer, cache_dir)
    bin_path, meta_path = cache_paths(cache_dir, source.content_hash, tokenizer_hash(tokenizer))
    assert not bin_path.exists() and not meta_path.exists()
    assert not [p for p in bin_path.parent.iterdir() if p.suffix == ".tmp"]

    monkeypatch.setattr(parallel_tokenize, "encode_with_eos", real_encode)
    tokens, _ = build(source, tokenizer, cache_dir)
    assert tokens.tolist() == oracle_stream(docs, tokenizer)


@pytest.mark.parametrize("damage", ["no metadata", "short array", "truncated metadata", "metadata not UTF-8",
                                    "metadata of another kind"])
def test_incomplete_entry_is_rebuilt(setup, damage):
    docs, source, tokenizer, cache_dir = setup
    build(source, tokenizer, cache_dir)
    bin_path, meta_path = cache_paths(cache_dir, source.content_hash, tokenizer_hash(tokenizer))
    named = meta_path
    if damage == "no metadata":  # a crash between the array and its metadata: rebuilt without a word
        meta_path.unlink()
    elif damage == "short array":
        bin_path.write_bytes(bin_path.read_bytes()[:-2])
        named = bin_path
    elif damage == "truncated metadata":
        meta_path.write_bytes(meta_path.read_bytes()[:40])
    elif damage == "metadata not UTF-8":
        meta_path.write_bytes(b"\xff\xfe" + meta_path.read_bytes())
    else:
        meta_path.write_text(json.dumps({"n_tokens": "many"}))
    if damage == "no metadata":
        tokens, _ = build(source, tokenizer, cache_dir)
    else:
        with pytest.warns(UserWarning, match=f"token cache: .*{named}.*; rebuilding it from {source.description}"):
            tokens, _ = build(source, tokenizer, cache_dir)
    assert tokens.tolist() == oracle_stream(docs, tokenizer)
    assert json.loads(meta_path.read_text())["n_tokens"] == len(tokens)


# How the array or its metadata is changed -> what the rebuild's message says.
CHANGES = {
    "other valid ids": "does not match its checksum",  # the same size and largest id: only the checksum tells
    "ids past the vocabulary": "does not match its checksum",
    "max_token_id edited": r"holds ids up to \d+, but its metadata says",
    "ids past the vocabulary, metadata rewritten to match": r"holds token id \d+, beyond the tokenizer's \d+ ids",
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_changed_array_is_found_and_rebuilt(setup, change):
    docs, source, tokenizer, cache_dir = setup
    _, built = build(source, tokenizer, cache_dir)
    bin_path, meta_path = cache_paths(cache_dir, source.content_hash, tokenizer_hash(tokenizer))
    tokens = np.memmap(bin_path, dtype=np.uint16, mode="r+")
    if change == "other valid ids":
        tokens[:200] = tokens[:200][::-1].copy()
    elif change.startswith("ids past the vocabulary"):
        tokens[::7] = built.max_token_id + 50
    tokens.flush()
    meta = json.loads(meta_path.read_text())
    if change == "max_token_id edited":
        meta["max_token_id"] -= 1
    elif change.endswith("rewritten to match"):
        meta.update(max_token_id=int(tokens.max()), crc32=zlib.crc32(np.asarray(tokens).tobytes()))
    meta_path.write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match=f"token cache: {bin_path} {CHANGES[change]}.*; rebuilding it"):
        rebuilt, meta = build(source, tokenizer, cache_dir)
    expected = oracle_stream(docs, tokenizer)
    assert rebuilt.tolist() == expected and meta.max_token_id == max(expected) == built.max_token_id
    assert meta.crc32 == built.crc32


def test_read_only_cache_serves_intact_entries_and_names_a_changed_one(setup, monkeypatch):
    """A cache nobody may write (a shared, read-only folder): verified entries load; one changed after it was
    written cannot be rebuilt there, which is a DataError naming the entry and what to do, not an OSError."""
    _docs, source, tokenizer, cache_dir = setup
    build(source, tokenizer, cache_dir)
    bin_path, _ = cache_paths(cache_dir, source.content_hash, tokenizer_hash(tokenizer))

    def read_only(path):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(token_cache, "file_lock", read_only)
    build(source, tokenizer, cache_dir)  # intact: needs no lock
    tokens = np.memmap(bin_path, dtype=np.uint16, mode="r+")
    tokens[:200] = tokens[:200][::-1].copy()
    tokens.flush()
    with pytest.raises(DataError, match=rf"token cache: {bin_path} does not match its checksum.*cannot be rebuilt "
                                        r"\(Read-only file system: .*\.lock\); point \$MOE_CACHE_DIR"):
        build(source, tokenizer, cache_dir)


def strip_checksum(meta_path):
    meta = json.loads(meta_path.read_text())
    del meta["crc32"]
    meta_path.write_text(json.dumps(meta))


def test_entry_written_before_checksums_gets_one_without_tokenizing_again(setup, monkeypatch):
    docs, source, tokenizer, cache_dir = setup
    _, built = build(source, tokenizer, cache_dir)
    bin_path, meta_path = cache_paths(cache_dir, source.content_hash, tokenizer_hash(tokenizer))
    strip_checksum(meta_path)
    real_encode = parallel_tokenize.encode_with_eos
    monkeypatch.setattr(parallel_tokenize, "encode_with_eos", lambda *args: pytest.fail("re-tokenized a good entry"))
    tokens, meta = build(source, tokenizer, cache_dir)
    assert tokens.tolist() == oracle_stream(docs, tokenizer)
    assert meta.crc32 == json.loads(meta_path.read_text())["crc32"] == built.crc32
    # Such an entry whose ids were changed past its recorded largest id is rebuilt too.
    strip_checksum(meta_path)
    np.memmap(bin_path, dtype=np.uint16, mode="r+")[5] = built.max_token_id + 1
    monkeypatch.setattr(parallel_tokenize, "encode_with_eos", real_encode)
    with pytest.warns(UserWarning, match=f"{bin_path} holds ids up to {built.max_token_id + 1}"):
        tokens, meta = build(source, tokenizer, cache_dir)
    assert tokens.tolist() == oracle_stream(docs, tokenizer) and meta.crc32 == built.crc32


def test_unchanged_array_is_verified_once(setup, monkeypatch):
    # Marked verified only when its last change is older than the verification by locking.RACY_NS (see load_cached):
    # the clock is moved forward instead of waiting.
    docs, source, tokenizer, cache_dir = setup
    monkeypatch.setattr(locking, "now_ns", lambda: time.time_ns() + 10**11)
    build(source, tokenizer, cache_dir)  # written: checksummed while writing, not read
    bin_path, _ = cache_paths(cache_dir, source.content_hash, tokenizer_hash(tokenizer))
    real_scan, scans = token_cache._scan, []
    monkeypatch.setattr(token_cache, "_scan", lambda tokens: scans.append(1) or real_scan(tokens))
    build(source, tokenizer, cache_dir)
    build(source, tokenizer, cache_dir)
    assert len(scans) == 1
    # A write changes the file's stat record (mtime and ctime; mtime is set here as a write a second later would),
    # so the next open reads it again, and finds the change.
    stat = bin_path.stat()
    tokens = np.memmap(bin_path, dtype=np.uint16, mode="r+")
    tokens[:200] = tokens[:200][::-1].copy()
    tokens.flush()
    os.utime(bin_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.warns(UserWarning, match="does not match its checksum"):
        rebuilt, _ = build(source, tokenizer, cache_dir)
    assert len(scans) == 3 and rebuilt.tolist() == oracle_stream(docs, tokenizer)  # outside and inside the lock


def test_key_changes_with_tokenizer(setup):
    docs, source, tokenizer, cache_dir = setup
    other = train_tokenizer(docs, 300)
    assert cache_paths(cache_dir, source.content_hash, tokenizer_hash(tokenizer)) != cache_paths(
        cache_dir, source.content_hash, tokenizer_hash(other)
    )


@pytest.mark.parametrize(
    "n_vocab,dtype", [(256, np.uint16), (65536, np.uint16), (65537, np.uint32), (152064, np.uint32)]
)
def test_token_dtype(n_vocab, dtype):
    assert token_dtype(n_vocab) == dtype
    assert np.iinfo(token_dtype(n_vocab)).max >= n_vocab - 1
