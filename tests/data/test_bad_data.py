"""Bad data at TextDataModule.setup: every unusable file is a DataError naming it (and the line, for JSON lines)
whether the tokenizer is trained on the sources or given, and whether the file is a source of its own or one of
several in a folder or glob; a corpus too small for one batch fails at setup instead of running zero steps; and the
vocabulary the model is sized by covers every id of the tokenizer. tests/test_cli_errors.py runs the same through
the command line; tests/data/test_sources.py reads the files one at a time."""

import json
import random
import re
from pathlib import Path

import pytest

from moe.data import DataError, Source, TextDataModule
from moe.data.tokenizer import train_tokenizer

SEQ_LEN, BATCH = 16, 2
RANDOM_BYTES = random.Random(0).randbytes(2048)
TRUNCATED = "".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(3)) + '{"text": "docu'

# name -> (bytes, where after the path, what the message says)
BAD_FILES = {
    "empty.txt": (b"", "", "empty file"),
    "random.dat": (RANDOM_BYTES, "", "contains NUL bytes"),  # not .bin, which names pre-tokenized shards
    "random-no-nul.txt": (RANDOM_BYTES.replace(b"\0", b""), "", "not valid UTF-8"),
    "utf16.txt": ("def return class\n".encode("utf-16"), "", "UTF-16"),
    "utf16-no-bom.txt": ("def return class\n".encode("utf-16-le"), "", "contains NUL bytes"),
    "truncated.jsonl": (TRUNCATED.encode(), ":4", r"malformed JSON \(truncated last line\?\)"),
    "array-line.jsonl": (b'{"text": "a b"}\n["a", "b"]\n', ":2", "expected a JSON object.*got an array"),
    "one-array.json": (b'[\n  {"text": "a b"},\n  {"text": "c d"}\n]\n', ":1", "malformed JSON.*one JSON array"),
}


def module(sources, tmp_path, **overrides):
    kwargs = dict(sources=sources, vocab_size=300, seq_len=SEQ_LEN, batch_size=BATCH, num_workers=0,
                  cache_dir=str(tmp_path / "cache"))
    return TextDataModule(**{**kwargs, **overrides})


@pytest.fixture
def tokenizer_file(tmp_path):
    path = tmp_path / "tokenizer.json"
    train_tokenizer(["def return class import self value count items\n" * 40], 300).save(str(path))
    return str(path)


@pytest.mark.parametrize("tokenizer", ["trained", "given"])
@pytest.mark.parametrize("place", ["file", "folder", "glob"])
@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_fails_setup_naming_it(tmp_path, helpers, tokenizer_file, name, place, tokenizer):
    content, line, reason = BAD_FILES[name]
    folder = helpers.write_text_folder(tmp_path / "corpus", helpers.make_documents(6))
    bad = folder / f"doc0003-{name}"  # between good files, so neither the first nor the last file read
    bad.write_bytes(content)
    source = {"file": str(bad), "folder": str(folder), "glob": str(folder / "doc*")}[place]
    data = module([Source(source)], tmp_path, tokenizer=tokenizer_file if tokenizer == "given" else None)
    with pytest.raises(DataError, match=rf"^{re.escape(str(bad))}{line}: {reason}"):
        data.setup("fit")
    # The files before it are tokenized to entries of their own, kept for the next try; the bad one has none.
    committed = [json.loads(p.read_text())["source"] for p in (tmp_path / "cache").glob("tokens/*.json")]
    assert str(bad) not in committed and all(Path(c).name < bad.name for c in committed), committed


def test_source_shorter_than_one_sequence_fails_setup_naming_it(tmp_path, helpers):
    good = helpers.write_jsonl(tmp_path / "good.jsonl", helpers.make_documents(40))  # the corpus fills batches
    short = tmp_path / "short.txt"
    short.write_text("def f")
    with pytest.raises(DataError, match=rf"\({re.escape(str(short))}\) has \d+ tokens, fewer than one sequence"):
        module([Source(str(good)), Source(str(short))], tmp_path).setup("fit")


def test_corpus_smaller_than_one_batch_fails_setup_naming_its_files(tmp_path):
    # Not a run of zero steps: setup refuses, saying how many sequences each file gave.
    small = tmp_path / "small.txt"
    small.write_text("def return class import self " * 8)
    with pytest.raises(DataError, match=rf"smaller than one batch: .* \({re.escape(str(small))}: \d+\)"):
        module([Source(str(small))], tmp_path, batch_size=64).setup("fit")


def test_vocabulary_covers_every_id_of_a_tokenizer_with_gaps(tmp_path, helpers, tokenizer_file):
    # A tokenizer.json whose end-of-text token sits beyond its base vocabulary: get_vocab_size() counts 286
    # tokens, but every document ends in an id past that, which a model of 286 embeddings cannot look up.
    spec = json.loads(Path(tokenizer_file).read_text())
    gap_id = len(spec["model"]["vocab"]) + 50
    spec["model"]["vocab"]["<|endoftext|>"] = spec["added_tokens"][0]["id"] = gap_id
    (tmp_path / "gaps.json").write_text(json.dumps(spec))
    corpus = helpers.write_jsonl(tmp_path / "docs.jsonl", helpers.make_documents(40))
    data = module([Source(str(corpus))], tmp_path, tokenizer=str(tmp_path / "gaps.json"))
    data.setup("fit")
    assert data.eos_id == data.max_token_id() == gap_id
    assert data.n_vocab == gap_id + 1 > data.tokenizer.get_vocab_size()
