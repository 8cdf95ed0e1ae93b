"""Byte-level BPE tokenizer after the LLaMA-1 recipe (Touvron et al. 2023, section 2.1), or any `tokenizer.json`.

LLaMA-1: BPE, all numbers split into individual digits, and bytes as the fallback for unknown UTF-8 characters.
With the `tokenizers` library the byte fallback comes from the ByteLevel pre-tokenizer/decoder: every byte is in
the initial alphabet, so no input is ever unknown and decode(encode(x)) == x. `<|endoftext|>` ends every document.

Training is cached on disk under a key of the training data and the settings, and guarded by a file lock plus an
atomic rename: LightningCLI reads `n_vocab` in every process right after building the DataModule, so several
processes may ask for the same tokenizer at once; one trains, the others wait and load its file. A cached file that
cannot be read (truncated, overwritten) is trained again; a given one that cannot be read is an InputError naming it.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moe.data.locking import atomic_write_bytes, file_lock
from moe.errors import InputError

EOS_TOKEN = "<|endoftext|>"
# Spellings of the end-of-text token in common HF tokenizers (GPT-2/Qwen, LLaMA-3, LLaMA-1/2 and Mistral, Gemma).
EOS_CANDIDATES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>")
# Bump when the recipe changes, so that old cached tokenizers are not reused for it.
RECIPE_VERSION = "llama1-bytelevel-bpe-v1"


def train_tokenizer(texts: Iterable[str], vocab_size: int, show_progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE on `texts`; deterministic for the same texts in the same order. `show_progress`
    shows the trainer's own progress bars (counting words and pairs, computing merges)."""
    if vocab_size < 256 + 1:
        raise ValueError(f"vocab_size must cover the 256 bytes and the EOS token, got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(path: str) -> Tokenizer:
    """A `tokenizer.json`, or a directory holding one (e.g. an HF model directory)."""
    file = Path(path)
    if file.is_dir():
        file = file / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"tokenizer not found: {path!r} (expected a tokenizer.json or a folder with one)")
    return _from_file(file)


def _from_file(file: Path) -> Tokenizer:
    """`Tokenizer.from_file`, with its error on a damaged file made an InputError that names the file."""
    try:
        return Tokenizer.from_file(os.fspath(file))
    except Exception as error:  # noqa: BLE001 - `tokenizers` raises a bare Exception ("expected value at line 1")
        raise InputError(f"{file}: not a readable tokenizer.json ({error})") from None


def eos_id(tokenizer: Tokenizer) -> int:
    for token in EOS_CANDIDATES:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    raise InputError(f"the tokenizer has none of the end-of-text tokens {EOS_CANDIDATES}")


def n_token_ids(tokenizer: Tokenizer) -> int:
    """Embedding rows the tokenizer needs: one more than its largest id. Usually its vocabulary size, but a
    tokenizer.json may leave gaps (e.g. special tokens placed beyond the base vocabulary), and a model sized by
    the count alone would index past its embedding on those ids."""
    largest = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)
    return max(tokenizer.get_vocab_size(), largest + 1)


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()


def cached_trained_tokenizer(
    cache_dir: Path, data_key: str, vocab_size: int, texts: Callable[[], Iterable[str]], show_progress: bool = False
) -> Tokenizer:
    """Train once per (data, vocab size, recipe) and reuse the file; safe when several processes race."""
    key = hashlib.sha256(f"{RECIPE_VERSION}\0{vocab_size}\0{data_key}".encode()).hexdigest()[:24]
    path = cache_dir / "tokenizers" / key / "tokenizer.json"
    if (tokenizer := _load_cached(path)) is not None:
        return tokenizer
    with file_lock(path.with_suffix(".lock")):
        if (tokenizer := _load_cached(path, warn=True)) is not None:  # another process trained it meanwhile
            return tokenizer
        trained = train_tokenizer(texts(), vocab_size, show_progress)
        atomic_write_bytes(path, trained.to_str(pretty=False).encode())
    # Loaded from the file, as a later run will: its serialization, and so tokenizer_hash, is the file's.
    return _from_file(path)


def _load_cached(path: Path, warn: bool = False) -> Tokenizer | None:
    if not path.is_file():
        return None
    try:
        return _from_file(path)
    except InputError as error:
        if warn:
            warnings.warn(f"cached tokenizer {error}; training it again", stacklevel=3)
        return None
