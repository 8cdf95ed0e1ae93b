"""The token cache: content equals a brute-force per-document encoding, reuse, and crash safety."""

import numpy as np
import pytest

from moe.data import token_cache
from moe.data.sources import Source, resolve_source
from moe.data.token_cache import cache_paths, token_dtype, tokenize_source
from moe.data.tokenizer import eos_id, tokenizer_hash, train_tokenizer


@pytest.fixture
def setup(tmp_path, helpers):
    docs = helpers.make_documents(60, seed=2)
    source = resolve_source(Source(str(helpers.write_jsonl(tmp_path / "d.jsonl", docs))))
    tokenizer = train_tokenizer(docs, 350)
    return docs, source, tokenizer, tmp_path / "cache"


def build(source, tokenizer, cache_dir):
    return tokenize_source(
        source, tokenizer, eos_id(tokenizer), tokenizer_hash(tokenizer), cache_dir, show_progress=False
    )


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


def test_second_build_reads_the_cache(setup, monkeypatch):
    _docs, source, tokenizer, cache_dir = setup
    first, _ = build(source, tokenizer, cache_dir)

    def must_not_encode(*args):
        raise AssertionError("re-tokenized although cached")

    monkeypatch.setattr(token_cache, "_encode_with_eos", must_not_encode)
    second, _ = build(source, tokenizer, cache_dir)
    assert second.tolist() == first.tolist()


def test_crash_mid_write_leaves_nothing_trusted(setup, monkeypatch):
    docs, source, tokenizer, cache_dir = setup
    monkeypatch.setattr(token_cache, "_CHUNK_BYTES", 100)
    real_encode, calls = token_cache._encode_with_eos, []

    def crash_on_third_chunk(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_encode(*args)

    monkeypatch.setattr(token_cache, "_encode_with_eos", crash_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        build(source, tokenizer, cache_dir)
    bin_path, meta_path = cache_paths(cache_dir, source, tokenizer_hash(tokenizer))
    assert not bin_path.exists() and not meta_path.exists()
    assert not [p for p in bin_path.parent.iterdir() if p.suffix == ".tmp"]

    monkeypatch.setattr(token_cache, "_encode_with_eos", real_encode)
    tokens, _ = build(source, tokenizer, cache_dir)
    assert tokens.tolist() == oracle_stream(docs, tokenizer)


@pytest.mark.parametrize("damage", ["no metadata", "short array"])
def test_incomplete_entry_is_rebuilt(setup, damage):
    docs, source, tokenizer, cache_dir = setup
    build(source, tokenizer, cache_dir)
    bin_path, meta_path = cache_paths(cache_dir, source, tokenizer_hash(tokenizer))
    if damage == "no metadata":
        meta_path.unlink()
    else:
        bin_path.write_bytes(bin_path.read_bytes()[:-2])
    tokens, _ = build(source, tokenizer, cache_dir)
    assert tokens.tolist() == oracle_stream(docs, tokenizer)


def test_key_changes_with_tokenizer(setup):
    docs, source, tokenizer, cache_dir = setup
    other = train_tokenizer(docs, 300)
    assert cache_paths(cache_dir, source, tokenizer_hash(tokenizer)) != cache_paths(
        cache_dir, source, tokenizer_hash(other)
    )


@pytest.mark.parametrize(
    "n_vocab,dtype", [(256, np.uint16), (65536, np.uint16), (65537, np.uint32), (152064, np.uint32)]
)
def test_token_dtype(n_vocab, dtype):
    assert token_dtype(n_vocab) == dtype
    assert np.iinfo(token_dtype(n_vocab)).max >= n_vocab - 1
