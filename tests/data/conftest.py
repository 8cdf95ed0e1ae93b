"""Tiny corpora written to tmp dirs, shared by the data tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "it",
    "an",
    "be",
    "this",
    "are",
    "def",
    "return",
    "class",
    "import",
]


def make_documents(n_docs: int, seed: int = 0, words_per_doc: tuple[int, int] = (20, 80)) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        words = [
            rng.choice(WORDS) if rng.random() < 0.85 else str(rng.randrange(10**6))
            for _ in range(rng.randint(*words_per_doc))
        ]
        docs.append(" ".join(words) + rng.choice([".", "\n", "!\n"]))
    return docs


def write_text_folder(root: Path, docs: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (root / f"doc{i:04d}.txt").write_text(doc, encoding="utf-8")
    return root


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, list[str]]:
    """A JSONL file of 200 short documents and the documents themselves."""
    docs = make_documents(200)
    return write_jsonl(tmp_path / "corpus" / "docs.jsonl", docs), docs


@pytest.fixture
def helpers():
    """The corpus writers above, for tests that need their own files (importlib mode cannot import conftest)."""
    from types import SimpleNamespace

    return SimpleNamespace(make_documents=make_documents, write_text_folder=write_text_folder, write_jsonl=write_jsonl)


@pytest.fixture
def tokenizer_file(tmp_path) -> str:
    """A 320-id BPE trained on tiny documents, saved as tmp_path/tokenizer.json."""
    from moe.data.tokenizer import train_tokenizer

    path = tmp_path / "tokenizer.json"
    train_tokenizer(make_documents(50, seed=9), 320).save(str(path))
    return str(path)
