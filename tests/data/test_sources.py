"""Reading text, JSONL, Parquet, folders, globs, HF datasets and the stdlib corpus; bad input names its file."""

import json
import os
import re
import sysconfig
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moe.data import locking
from moe.data.sources import DataError, Source, resolve_source, stdlib_files


def documents(path, **kwargs):
    return list(resolve_source(Source(str(path), **kwargs)).documents())


def test_text_jsonl_parquet_folder_and_glob(tmp_path, helpers):
    docs = helpers.make_documents(12, seed=1)
    helpers.write_text_folder(tmp_path / "txt", docs[:4])
    helpers.write_jsonl(tmp_path / "mixed" / "b.jsonl", docs[4:8], field="content")
    pq.write_table(pa.table({"content": docs[8:], "n": list(range(4))}), tmp_path / "mixed" / "a.parquet")

    assert documents(tmp_path / "txt") == docs[:4]
    assert documents(tmp_path / "txt" / "doc0002.txt") == [docs[2]]
    assert documents(tmp_path / "mixed" / "b.jsonl", text_field="content") == docs[4:8]
    assert documents(tmp_path / "mixed" / "a.parquet", text_field="content") == docs[8:]
    # A folder is read in sorted order of relative names: a.parquet before b.jsonl.
    assert documents(tmp_path / "mixed", text_field="content") == docs[8:] + docs[4:8]
    assert documents(tmp_path / "txt" / "doc000[13].txt") == [docs[1], docs[3]]


def test_content_hash_follows_content_not_location(tmp_path, helpers):
    docs = helpers.make_documents(3)
    a = resolve_source(Source(str(helpers.write_text_folder(tmp_path / "a", docs))))
    b = resolve_source(Source(str(helpers.write_text_folder(tmp_path / "b", docs))))
    c = resolve_source(Source(str(helpers.write_text_folder(tmp_path / "c", docs[:2] + [docs[2] + "x"]))))
    assert a.content_hash == b.content_hash != c.content_hash
    assert a.n_bytes == sum(len(d.encode()) for d in docs)


BAD_FILES = {
    "empty.txt": b"",
    "binary.txt": b"\x7fELF\x02\x01\x01\x00\x00\x00",
    "utf16.txt": "hello world".encode("utf-16"),
    "utf16be.txt": "hello world".encode("utf-16-be"),
    "latin1.txt": "caf\xe9 cr\xe8me".encode("latin-1"),
    "empty.jsonl": b"\n\n",
    "bad.parquet": b"PAR1 not really",
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_is_named(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(BAD_FILES[name])
    with pytest.raises(DataError, match=re.escape(str(path))):
        documents(path)
    # Inside a folder the error names the same file, not the folder.
    (tmp_path / "good.txt").write_text("fine")
    with pytest.raises(DataError, match=re.escape(str(path))):
        documents(tmp_path)


BAD_JSONL = [
    ('{"text": "a"}\n{"text": "b"}\n{"text": "trunc', 3, "truncated"),
    ('{"text": "a"}\n["text", "b"]\n', 2, "object"),
    ('{"text": "a"}\n\n{"body": "b"}\n', 3, "no field 'text'"),
    ('{"text": 5}\n', 1, "not a string"),
    ('{"text": "a"}\n{"text": "\xe9"}\n', 2, "UTF-8"),
]


@pytest.mark.parametrize("content,line,reason", BAD_JSONL)
def test_bad_jsonl_names_file_and_line(tmp_path, content, line, reason):
    path = tmp_path / "data.jsonl"
    path.write_bytes(content.encode("latin-1") if "\xe9" in content else content.encode())
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:{line}:.*{reason}"):
        documents(path)


def test_parquet_missing_column(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"body": ["x"]}), path)
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}.*'text'"):
        documents(path)


@pytest.mark.parametrize("path", ["does/not/exist.txt", "does/not/*.jsonl"])
def test_missing_path_is_named(tmp_path, path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / path))):
        documents(tmp_path / path)


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no files"):
        documents(tmp_path / "empty")


def test_stdlib_corpus_is_sorted_capped_and_free_of_tests():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files(2_000_000)
    names = [f.relative_to(root).as_posix() for f in files]
    assert names == sorted(names) and len(names) > 20
    assert sum(f.stat().st_size for f in files) <= 2_000_000
    assert not any(part in ("test", "tests", "site-packages") for n in names for part in n.split("/"))
    uncapped = stdlib_files(None)
    assert len(uncapped) > len(files) and uncapped[: len(files)] == files
    source = resolve_source(Source("stdlib"), stdlib_max_bytes=2_000_000)
    assert source.content_hash == resolve_source(Source("stdlib"), stdlib_max_bytes=2_000_000).content_hash
    assert next(source.documents()) == files[0].read_text()


def test_hf_source_reads_the_text_column(monkeypatch):
    import datasets

    table = datasets.Dataset.from_dict({"text": ["one", "", "two"], "id": [1, 2, 3]})
    calls = []

    def fake_load_dataset(name, config, split, data_files, revision):
        calls.append((name, config, split, data_files, revision))
        return table

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    source = resolve_source(Source("hf:org/name:cfg", split="validation", data_files=["a.parquet"], revision="v1"))
    assert calls == [("org/name", "cfg", "validation", ["a.parquet"], "v1")]
    assert list(source.documents()) == ["one", "two"]
    assert source.name == "org/name"
    with pytest.raises(DataError, match="no column 'body'"):
        resolve_source(Source("hf:org/name", text_field="body"))


def test_nonpositive_weight_rejected(tmp_path):
    with pytest.raises(DataError, match=rf"^Source.weight=0 must be positive \(source '{re.escape(str(tmp_path))}'\)"):
        resolve_source(Source(str(tmp_path), weight=0))


def test_jsonl_extra_fields_and_blank_lines_are_fine(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "a", "meta": [1]}) + "\n\n" + json.dumps({"text": "b"}))
    assert documents(path) == ["a", "b"]


def test_unchanged_files_are_not_hashed_again(tmp_path, helpers, monkeypatch):
    from moe.data import content_hash as hashing

    folder = helpers.write_text_folder(tmp_path / "docs", helpers.make_documents(5))
    cache = tmp_path / "hashes"
    # As if the corpus was written long before this run: only then is its stat record trusted.
    monkeypatch.setattr(locking, "now_ns", lambda: time.time_ns() + 10**11)
    first = resolve_source(Source(str(folder)), hash_cache=cache)
    real_hash = hashing._hash_files

    def must_not_hash(*args):
        raise AssertionError("an unchanged corpus was read again")

    monkeypatch.setattr(hashing, "_hash_files", must_not_hash)
    second = resolve_source(Source(str(folder)), hash_cache=cache)
    assert (second.content_hash, second.n_bytes) == (first.content_hash, first.n_bytes)

    # Same size, mtime set back: the stat record changes anyway (ctime), so the content is hashed again.
    path = folder / "doc0001.txt"
    old = path.stat()
    path.write_text(path.read_text().swapcase())
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert path.stat().st_size == old.st_size
    monkeypatch.setattr(hashing, "_hash_files", real_hash)
    changed = resolve_source(Source(str(folder)), hash_cache=cache)
    assert changed.content_hash != first.content_hash
    assert changed.content_hash == resolve_source(Source(str(folder))).content_hash


@pytest.mark.parametrize("damage", [b"\xff\xfe\x00\x91 not UTF-8", b'{"content_hash": "4f1a', b'{"n_bytes": 3}', b"[1, 2]"])
def test_damaged_hash_record_is_hashed_again_and_rewritten(tmp_path, helpers, monkeypatch, damage):

    folder = helpers.write_text_folder(tmp_path / "docs", helpers.make_documents(5))
    cache = tmp_path / "hashes"
    monkeypatch.setattr(locking, "now_ns", lambda: time.time_ns() + 10**11)
    first = resolve_source(Source(str(folder)), hash_cache=cache)
    (record,) = cache.glob("*.json")
    record.write_bytes(damage)
    with pytest.warns(UserWarning, match=f"source hash cache {re.escape(str(record))} is unreadable"):
        again = resolve_source(Source(str(folder)), hash_cache=cache)
    assert (again.content_hash, again.n_bytes) == (first.content_hash, first.n_bytes)
    written = json.loads(record.read_text())
    assert (written["content_hash"], written["n_bytes"]) == (first.content_hash, first.n_bytes)
    assert written["shards"] == [[shard.key, shard.n_bytes] for shard in first.shards]


def test_fresh_files_are_hashed_every_time(tmp_path, helpers):
    # A file written in the same timestamp tick as its hash could change again without a new mtime: not trusted.
    folder = helpers.write_text_folder(tmp_path / "docs", helpers.make_documents(3))
    resolve_source(Source(str(folder)), hash_cache=tmp_path / "hashes")
    assert not list((tmp_path / "hashes").glob("*.json"))
