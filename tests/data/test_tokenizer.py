"""The LLaMA-1-style BPE: digits split, lossless byte fallback, determinism, loading, concurrent training."""

import hashlib
import json
import random
import re
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor

import pytest

from moe.data.tokenizer import (
    EOS_TOKEN,
    cached_trained_tokenizer,
    eos_id,
    load_tokenizer,
    train_tokenizer,
)
from moe.errors import InputError

TRAINING_TEXT = [
    "In 1987 the price rose to 12345 dollars, and by 2023 it was 3.14159 times higher.",
    "def add(a, b):\n    return a + b  # 42\n",
    "the quick brown fox jumps over the lazy dog 0123456789 " * 3,
] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TRAINING_TEXT, vocab_size=400)


def random_unicode(seed: int, n: int = 200) -> str:
    rng = random.Random(seed)
    # Any code point except surrogates, which are not encodable as UTF-8 and so not text.
    points = [
        rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0, 0xD800), rng.randrange(0xE000, 0x110000)])
        for _ in range(n)
    ]
    return "".join(map(chr, points))


ROUND_TRIP = [
    "plain ascii text",
    "emoji 🦙🔥👩‍👩‍👧 and flags 🇫🇷",
    "中文字符和日本語のテキスト, 한국어",
    "control \x00\x01\x07\x1b[31m\t\r\n\x7f chars",
    "  leading and trailing spaces  \n\n",
    "numbers 1234567890 and 3.14e-10",
    *[random_unicode(seed) for seed in range(5)],
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_decode_encode_round_trip(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert eos_id(tokenizer) not in ids


@pytest.mark.parametrize("text", ["12345", "year 2023!", "x=1000000;y=3.14159", "the 42 answers", "0123456789 0"])
def test_every_digit_is_its_own_token(tokenizer, text):
    tokens = tokenizer.encode(text, add_special_tokens=False).tokens
    digit_tokens = [t for t in tokens if any(c.isdigit() for c in t)]
    assert all(len(t) == 1 for t in digit_tokens), tokens
    # Every digit of the text appears as one token, in order.
    assert "".join(digit_tokens) == "".join(c for c in text if c.isdigit())


def test_vocab_and_eos(tokenizer):
    # A corpus this small runs out of merges before 400; the size never exceeds what was asked for.
    assert 300 < tokenizer.get_vocab_size() <= 400
    assert tokenizer.token_to_id(EOS_TOKEN) == eos_id(tokenizer) == 0
    # Merges were learnt: a frequent word is fewer tokens than bytes.
    assert len(tokenizer.encode("the quick brown fox").ids) < len("the quick brown fox")


# Rust's HashMaps are seeded per process, so ties in BPE merge counts could differ between processes; fresh
# interpreters check that they do not. The child stubs the `moe` packages so it imports the tokenizer module alone,
# not torch and Lightning.
CHILD = """
import hashlib, json, sys, types
for name in ("moe", "moe.data"):
    package = types.ModuleType(name); package.__path__ = [name.replace(".", "/")]; sys.modules[name] = package
from moe.data.tokenizer import train_tokenizer
print(hashlib.sha256(train_tokenizer(json.load(sys.stdin), 400).to_str().encode()).hexdigest())
"""


def test_training_is_deterministic_across_processes(tokenizer):
    outputs = {
        subprocess.run(
            [sys.executable, "-c", CHILD], input=json.dumps(TRAINING_TEXT), capture_output=True, text=True, check=True
        ).stdout.strip()
        for _ in range(2)
    }
    assert outputs == {hashlib.sha256(tokenizer.to_str().encode()).hexdigest()}


def test_load_from_file_and_directory(tokenizer, tmp_path):
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    for path in (tmp_path / "tokenizer.json", tmp_path):
        loaded = load_tokenizer(str(path))
        assert loaded.encode("fox 123").ids == tokenizer.encode("fox 123").ids
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("damage", ["truncated", "not UTF-8"])
def test_unreadable_tokenizer_file_is_an_input_error_naming_it(tokenizer, tmp_path, damage):
    path = tmp_path / "tokenizer.json"
    text = tokenizer.to_str().encode()
    path.write_bytes(text[: len(text) // 2] if damage == "truncated" else b"\xff\xfe" + text)
    for given in (path, tmp_path):
        with pytest.raises(InputError, match=f"^{re.escape(str(path))}: not a readable tokenizer.json"):
            load_tokenizer(str(given))


@pytest.mark.parametrize("damage", ["truncated", "not UTF-8", "empty"])
def test_unreadable_cached_tokenizer_is_trained_again(tmp_path, damage):
    first = cached_trained_tokenizer(tmp_path, "key", 400, lambda: TRAINING_TEXT)
    (path,) = (tmp_path / "tokenizers").rglob("tokenizer.json")
    text = path.read_bytes()
    path.write_bytes({"truncated": text[: len(text) // 2], "not UTF-8": b"\xff\xfe" + text, "empty": b""}[damage])
    with pytest.warns(UserWarning, match=f"cached tokenizer {re.escape(str(path))}: not a readable .*; training it again"):
        again = cached_trained_tokenizer(tmp_path, "key", 400, lambda: TRAINING_TEXT)
    assert again.to_str() == first.to_str() and path.read_bytes() == text


def test_foreign_tokenizer_without_eos_is_rejected():
    from tokenizers import Tokenizer, models

    with pytest.raises(ValueError, match="end-of-text"):
        eos_id(Tokenizer(models.BPE()))


def _train_in_process(cache_dir: str) -> str:
    tokenizer = cached_trained_tokenizer(__import__("pathlib").Path(cache_dir), "key", 400, lambda: TRAINING_TEXT)
    return tokenizer.to_str()


def test_concurrent_training_agrees_and_leaves_one_file(tmp_path):
    with ProcessPoolExecutor(2) as pool:
        results = list(pool.map(_train_in_process, [str(tmp_path)] * 2))
    assert results[0] == results[1]
    files = sorted(p.name for p in (tmp_path / "tokenizers").rglob("*") if p.is_file())
    assert files == ["tokenizer.json", "tokenizer.lock", "tokenizer.lock.holder"]
