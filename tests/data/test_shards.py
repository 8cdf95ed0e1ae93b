"""One token cache entry per shard: a folder or glob is tokenized file by file, and the stream the data module
reads is the same as one file holding every document would give; an interrupted preparation (SIGKILL) keeps its
finished shards; an added file is the only one tokenized; a source cached whole before shards existed keeps its
entry; the resume fingerprint's checksum is the whole stream's."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from moe.data import Source, TextDataModule, token_cache
from moe.data.datasets import ShardedArray, TokenFile
from moe.data.sources import Shard, resolve_source
from moe.data.token_cache import cache_paths, tokenize_shard
from moe.data.tokenizer import eos_id, load_tokenizer, tokenizer_hash

SEQ_LEN = 16


def shard_folder(tmp_path, helpers, n_files=5, docs_per_file=12):
    folder = tmp_path / "shards"
    folder.mkdir()
    docs = helpers.make_documents(n_files * docs_per_file, seed=3)
    for i in range(n_files):
        helpers.write_jsonl(folder / f"part-{i:03d}.jsonl", docs[i * docs_per_file : (i + 1) * docs_per_file])
    return folder, docs


def module(path, tmp_path, tokenizer, source: dict | None = None, **overrides):
    """A data module over the one source `path` (with the Source settings `source`), set up for fit."""
    kwargs = dict(sources=[Source(str(path), **(source or {}))], tokenizer=tokenizer, seq_len=SEQ_LEN, batch_size=2,
                  num_workers=0, num_proc=1, cache_dir=str(tmp_path / "cache"))
    data = TextDataModule(**{**kwargs, **overrides})
    data.setup("fit")
    return data


def stream(data, source=0):
    return np.asarray(data.corpus.files[source].open()[0 : data.corpus.files[source].n_tokens]).tolist()


def count_tokenized(monkeypatch):
    """Record the description of every shard tokenized (not read from the cache) from now on."""
    tokenized = []
    real = token_cache._tokenize

    def recording(shard, *args):
        tokenized.append(Path(shard.description).name)
        return real(shard, *args)

    monkeypatch.setattr(token_cache, "_tokenize", recording)
    return tokenized


@pytest.mark.parametrize("num_proc", [1, 2])
def test_shards_read_as_the_stream_of_one_file_holding_every_document(tmp_path, helpers, tokenizer_file, num_proc):
    folder, docs = shard_folder(tmp_path, helpers)
    sharded = module(folder, tmp_path, tokenizer_file, num_proc=num_proc)
    assert len(sharded.corpus.files[0].files) == 5  # an entry per file
    whole = module(helpers.write_jsonl(tmp_path / "all.jsonl", docs), tmp_path, tokenizer_file)
    assert len(whole.corpus.files[0].files) == 1
    assert stream(sharded) == stream(whole)
    # Windows across shard boundaries, validation split, mixture: the same samples, batch for batch.
    for k in range(0, 60, 7):
        assert sharded.train_dataloader().dataset[k]["input_ids"].tolist() == \
            whole.train_dataloader().dataset[k]["input_ids"].tolist()
    assert [v.tolist() for v in sharded.corpus.val_windows] == [v.tolist() for v in whole.corpus.val_windows]
    # The resume fingerprint's checksum is the whole stream's, combined from the shards' without reading them.
    assert sharded.fingerprint()["token_cache"][0][1] == whole.fingerprint()["token_cache"][0][1]
    assert sharded.unigram_baseline() == pytest.approx(whole.unigram_baseline(), rel=1e-12)


def test_sharded_array_reads_across_boundaries(tmp_path, monkeypatch):
    files = []
    for i, (start, stop) in enumerate([(0, 5), (5, 6), (6, 20)]):
        np.arange(start, stop, dtype=np.uint16).tofile(tmp_path / f"{i}.bin")
        files.append(TokenFile(str(tmp_path / f"{i}.bin"), "uint16", stop - start))
    monkeypatch.setattr(ShardedArray, "MAX_OPEN", 2)  # shards are mapped when read, two at a time here
    array, whole = ShardedArray(files), np.arange(20)
    assert len(array) == 20
    for start in range(21):
        for stop in range(start, 21):
            assert array[start:stop].tolist() == whole[start:stop].tolist()
    positions = np.array([[19, 0, 5], [6, 4, 5]])
    assert array[positions].tolist() == whole[positions].tolist()
    with pytest.raises(IndexError):
        array[np.array([20])]


def test_an_added_file_is_the_only_one_tokenized(tmp_path, helpers, tokenizer_file, monkeypatch):
    folder, _ = shard_folder(tmp_path, helpers)
    module(folder, tmp_path, tokenizer_file)
    tokenized = count_tokenized(monkeypatch)
    helpers.write_jsonl(folder / "part-005.jsonl", helpers.make_documents(12, seed=11))
    grown = module(folder, tmp_path, tokenizer_file)
    assert tokenized == ["part-005.jsonl"] and len(grown.corpus.files[0].files) == 6


KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    from moe.data import Source, TextDataModule, parallel_tokenize, token_cache

    folder, cache, tokenizer = sys.argv[1:4]
    token_cache._CHUNK_BYTES = 200  # several chunks per shard
    real, chunks = parallel_tokenize.encode_with_eos, []

    def dies_inside_the_third_shard(*args):
        chunks.append(1)
        # Shards 1 and 2 took their chunks; the third has written some of its array when the OOM killer strikes.
        if len(chunks) == chunks_before_third + 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args)

    chunks_before_third = int(sys.argv[4])
    parallel_tokenize.encode_with_eos = dies_inside_the_third_shard
    TextDataModule(sources=[Source(folder)], tokenizer=tokenizer, seq_len=16, batch_size=2, num_workers=0,
                   num_proc=1, cache_dir=cache).setup("fit")
""")


def _chunks_per_shard(path: Path) -> int:
    """Chunks of 200 bytes of text (token_cache's chunking) the shard's documents make."""
    from moe.data import token_cache
    from moe.data.readers import read_documents
    from moe.data.sources import Shard

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(token_cache, "_CHUNK_BYTES", 200)
        return sum(1 for _ in token_cache._chunks(Shard("", 0, lambda: read_documents(path), str(path))))


def test_a_killed_preparation_keeps_its_finished_shards(tmp_path, helpers, tokenizer_file, monkeypatch):
    folder, _ = shard_folder(tmp_path, helpers)
    chunks_before_third = sum(_chunks_per_shard(folder / f"part-{i:03d}.jsonl") for i in range(2))
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, str(folder), str(tmp_path / "cache"), tokenizer_file,
                             str(chunks_before_third)], capture_output=True, text=True, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    leftovers = list((tmp_path / "cache" / "tokens").glob(".*.tmp"))
    assert leftovers, "the third shard's array was being written"  # a partial file, never trusted
    tokenized = count_tokenized(monkeypatch)
    resumed = module(folder, tmp_path, tokenizer_file)
    assert tokenized == [f"part-{i:03d}.jsonl" for i in range(2, 5)]  # the first two were kept
    fresh = module(folder, tmp_path / "fresh", tokenizer_file)
    assert stream(resumed) == stream(fresh)


def test_a_source_cached_whole_before_shards_keeps_its_entry(tmp_path, helpers, tokenizer_file, monkeypatch):
    # Before per-shard caching, a folder was one entry keyed by the folder's content hash: it is still used.
    folder, _ = shard_folder(tmp_path, helpers)
    source = resolve_source(Source(str(folder)))
    tok = load_tokenizer(tokenizer_file)
    whole_shard = Shard(source.content_hash, source.n_bytes, source.documents, source.description)
    tokenize_shard(whole_shard, tok, eos_id(tok), tokenizer_hash(tok), tmp_path / "cache")
    tokenized = count_tokenized(monkeypatch)
    data = module(folder, tmp_path, tokenizer_file)
    assert tokenized == [] and len(data.corpus.files[0].files) == 1
    bin_path, _ = cache_paths(tmp_path / "cache", source.content_hash, tokenizer_hash(tok))
    assert data.corpus.files[0].paths == [str(bin_path)]


def test_cache_files_are_readable_by_the_team(tmp_path, helpers, tokenizer_file):
    folder, _ = shard_folder(tmp_path, helpers, n_files=2)
    old = os.umask(0o022)
    try:
        module(folder, tmp_path, tokenizer_file)
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    assert files and all(stat.S_IMODE(p.stat().st_mode) & 0o044 == 0o044 for p in files), \
        [(p.name, oct(p.stat().st_mode)) for p in files]


def test_a_lock_held_too_long_names_its_holder(tmp_path, monkeypatch):
    from moe.data import locking
    from moe.errors import InputError

    lock = tmp_path / "entry.lock"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from pathlib import Path
        from moe.data.locking import file_lock
        with file_lock(Path({str(lock)!r})):
            print("held", flush=True)
            time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setenv("MOE_LOCK_TIMEOUT", "0.5")
        waited = rf"waited for the cache lock {lock}, held by .* pid {holder.pid} .*, which has shown no sign of life"
        with pytest.raises(InputError, match=waited), locking.file_lock(lock):
            pass
    finally:
        holder.kill()
        holder.wait()
    with locking.file_lock(lock, timeout=5):  # a dead holder frees it
        pass


def test_old_entries_keep_their_checksum_crc(tmp_path, helpers, tokenizer_file):
    # A single file's shard key is the source's content hash as it was before shards: its entry and checksum stay.
    path = helpers.write_jsonl(tmp_path / "one.jsonl", helpers.make_documents(30))
    data = module(path, tmp_path, tokenizer_file)
    (bin_path,) = data.corpus.files[0].paths
    assert Path(bin_path) == cache_paths(tmp_path / "cache", resolve_source(Source(str(path))).content_hash,
                                         tokenizer_hash(data.tokenizer))[0]
    crc = json.loads(Path(bin_path).with_suffix(".json").read_text())["crc32"]
    assert data.fingerprint()["token_cache"][0][1] == f"{crc:08x}" == f"{zlib.crc32(Path(bin_path).read_bytes()):08x}"


def test_a_lock_holder_that_beats_is_waited_for_past_the_timeout(tmp_path, monkeypatch):
    # Tokenizing one large shard can take hours: a waiter gives up only on a holder that stopped beating.
    from moe.data import locking

    lock = tmp_path / "entry.lock"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from pathlib import Path
        from moe.data import locking
        locking.HEARTBEAT_S = 0.2
        with locking.file_lock(Path({str(lock)!r})):
            print("held", flush=True)
            time.sleep(3)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setenv("MOE_LOCK_TIMEOUT", "1")
        started = time.monotonic()
        with locking.file_lock(lock):
            waited = time.monotonic() - started
        assert waited > 1.5 and holder.wait(timeout=10) == 0
    finally:
        holder.kill()
        holder.wait()


def test_a_cache_this_process_may_not_write_is_read(tmp_path, helpers, tokenizer_file, monkeypatch):
    # A cache folder shared read-only, or a teammate's lock files: what is cached is read, no lock is needed.
    import filelock

    from moe.data import locking

    folder, _ = shard_folder(tmp_path, helpers)
    monkeypatch.setattr(locking, "now_ns", lambda: time.time_ns() + 10**11)  # old files: hash records are kept
    first = module(folder, tmp_path, tokenizer_file)

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "a lock or cache file")

    monkeypatch.setattr(filelock.FileLock, "acquire", refused)
    monkeypatch.setattr(locking.tempfile, "mkstemp", refused)  # every cache write
    again = module(folder, tmp_path, tokenizer_file)
    assert stream(again) == stream(first)
    with locking.file_lock(tmp_path / "elsewhere.lock", timeout=1):  # a lock it may not take is done without
        pass


MANY_SHARDS = textwrap.dedent("""
    import resource, sys
    from moe.data import Source, TextDataModule

    folder, cache, tokenizer = sys.argv[1:4]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (96, hard))  # fewer descriptors than the corpus has shards
    data = TextDataModule(sources=[Source(folder)], tokenizer=tokenizer, seq_len=16, batch_size=2, num_workers=0,
                          num_proc=1, cache_dir=cache, val_fraction=0.2)
    data.setup("fit")
    dataset = data.train_dataloader().dataset
    for k in range(0, len(dataset), 7):
        dataset[k]
    print(len(data.corpus.files[0].files), data.unigram_baseline())
""")


def test_a_source_of_more_shards_than_open_files_allowed(tmp_path, helpers, tokenizer_file):
    folder = tmp_path / "many"
    folder.mkdir()
    docs = helpers.make_documents(300, seed=8)
    for i in range(150):
        (folder / f"{i:03d}.txt").write_text(docs[2 * i] + docs[2 * i + 1])
    run = subprocess.run([sys.executable, "-c", MANY_SHARDS, str(folder), str(tmp_path / "cache"), tokenizer_file],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[0] == "150"


def test_a_folder_of_one_file_in_a_subfolder_cached_whole_before_shards_keeps_its_entry(tmp_path, helpers,
                                                                                          tokenizer_file, monkeypatch):
    # Its one shard is keyed by the file's name, the old entry by its path in the folder: the old one is found.
    folder = tmp_path / "nested"
    helpers.write_jsonl(folder / "sub" / "a.jsonl", helpers.make_documents(40))
    source = resolve_source(Source(str(folder)))
    assert source.shards[0].key != source.content_hash
    tok = load_tokenizer(tokenizer_file)
    whole = Shard(source.content_hash, source.n_bytes, source.documents, source.description)
    tokenize_shard(whole, tok, eos_id(tok), tokenizer_hash(tok), tmp_path / "cache")
    tokenized = count_tokenized(monkeypatch)
    module(folder, tmp_path, tokenizer_file)
    assert tokenized == []
