"""A corpus ready to train on: sources -> tokenizer -> cached token arrays -> each source's windows split into
training and validation -> the mixture schedule over the training windows. Plain Python, no Lightning: the data
module (datamodule.py) adds batches, processes and resume on top.

Everything here follows from (sources, tokenizer, seq_len, val_fraction, seed); `fingerprint` names those parts
so that a resume onto a different corpus can be refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from moe.data.datasets import TokenFile
from moe.data.mixture import SCHEDULE_VERSION, MixtureSchedule
from moe.data.packing import n_windows, split_windows
from moe.data.report import SourceRow, unigram_baseline
from moe.data.sources import DataError, ResolvedSource, Source, resolve_source
from moe.data.token_cache import TokenCacheMeta, tokenize_source
from moe.data.tokenizer import cached_trained_tokenizer, eos_id, load_tokenizer, n_token_ids, tokenizer_hash
from moe.errors import InputError

# The tokenizer is trained on at most this much text, shared among the sources by weight: BPE merges settle
# long before a large corpus is exhausted, and training time grows with the text.
TOKENIZER_TRAINING_BYTES = 1 << 30
_VAL_SPLIT_STREAM = 0  # SeedSequence tag; the mixture schedule uses 1 and 2


class TokenCorpus:
    """The sources of a mixture, tokenized and split; `prepare()` builds (or reads from the cache) what the
    datasets need: one token file per source, its training and validation windows, and the mixture schedule."""

    def __init__(self, sources: list[Source], tokenizer: str | None, vocab_size: int, seq_len: int,
                 val_fraction: float, seed: int, cache_dir: Path, corpus_max_bytes: int | None):
        self.sources = sources
        self.tokenizer_path = tokenizer
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.val_fraction = val_fraction
        self.seed = seed
        self.cache_dir = cache_dir
        self.corpus_max_bytes = corpus_max_bytes
        self._resolved: list[ResolvedSource] | None = None
        self._tokenizer: Tokenizer | None = None
        self._n_vocab: int | None = None
        self.files: list[TokenFile] = []
        self.metas: list[TokenCacheMeta] = []
        self.train_windows: list[np.ndarray] = []
        self.val_windows: list[np.ndarray] = []
        self.schedule: MixtureSchedule | None = None

    # ---- tokenizer ----------------------------------------------------------------------------------------------
    def resolved_sources(self) -> list[ResolvedSource]:
        if self._resolved is None:
            hashes = self.cache_dir / "hashes"
            self._resolved = [resolve_source(s, self.corpus_max_bytes, hashes) for s in self.sources]
        return self._resolved

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            if self.tokenizer_path is not None:
                self._tokenizer = load_tokenizer(self.tokenizer_path)
            else:
                sources = self.resolved_sources()
                data_key = "\0".join(f"{s.content_hash}:{w.weight}" for s, w in zip(sources, self.sources))
                self._tokenizer = cached_trained_tokenizer(
                    self.cache_dir, data_key, self.vocab_size, lambda: self._tokenizer_training_texts(sources)
                )
        return self._tokenizer

    def _tokenizer_training_texts(self, sources: list[ResolvedSource]):
        total_weight = sum(s.weight for s in self.sources)
        for resolved, source in zip(sources, self.sources):
            budget = TOKENIZER_TRAINING_BYTES * source.weight / total_weight
            for text in resolved.documents():
                yield text
                budget -= len(text)
                if budget <= 0:
                    break

    @property
    def n_vocab(self) -> int:
        """Ids the model's embedding must cover."""
        if self._n_vocab is None:
            self._n_vocab = n_token_ids(self.tokenizer)
        return self._n_vocab

    @property
    def eos_id(self) -> int:
        try:
            return eos_id(self.tokenizer)
        except InputError as error:
            raise InputError(f"{self.tokenizer_path or 'the trained tokenizer'}: {error}") from None

    def describe_tokenizer(self) -> str:
        return self.tokenizer_path or f"byte-level BPE trained here (vocab_size {self.vocab_size})"

    # ---- token arrays and windows -------------------------------------------------------------------------------
    @property
    def prepared(self) -> bool:
        return self.schedule is not None

    def prepare(self, show_progress: bool) -> None:
        if self.prepared:
            return
        tokenizer, sources = self.tokenizer, self.resolved_sources()
        eos, token_hash = self.eos_id, tokenizer_hash(tokenizer)
        for index, source in enumerate(sources):
            tokens, meta = tokenize_source(source, tokenizer, eos, token_hash, self.cache_dir, show_progress)
            n = n_windows(meta.n_tokens, self.seq_len)
            if n == 0:
                raise DataError(
                    f"source {source.name!r} ({source.description}) has {meta.n_tokens} tokens, fewer than one "
                    f"sequence of seq_len + 1 = {self.seq_len + 1}; add text to it, lower TextDataModule.seq_len, "
                    "or leave it out"
                )
            rng = np.random.default_rng([self.seed, _VAL_SPLIT_STREAM, index])
            train, val = split_windows(n, self.val_fraction, rng)
            self.files.append(TokenFile(str(tokens.filename), meta.dtype, meta.n_tokens))
            self.metas.append(meta)
            self.train_windows.append(train)
            self.val_windows.append(val)
        self.schedule = MixtureSchedule(self.train_windows, [s.weight for s in self.sources], self.seed)

    def _require_prepared(self) -> None:
        if not self.prepared:
            raise RuntimeError("call setup() first")

    @property
    def n_train(self) -> int:
        return sum(len(w) for w in self.train_windows)

    @property
    def n_val(self) -> int:
        return sum(len(w) for w in self.val_windows)

    def describe_train_windows(self) -> str:
        return ", ".join(f"{r.description}: {len(w)}" for r, w in zip(self.resolved_sources(), self.train_windows))

    def max_token_id(self) -> int:
        self._require_prepared()
        return max(meta.max_token_id for meta in self.metas)

    def fingerprint(self) -> dict:
        """What must match for a stream position to mean the same windows (the data module adds the batch shape)."""
        self._require_prepared()
        return {
            "sources": [[r.name, r.content_hash, s.weight] for r, s in zip(self.resolved_sources(), self.sources)],
            "tokenizer": tokenizer_hash(self.tokenizer),
            "seq_len": self.seq_len,
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "schedule": SCHEDULE_VERSION,
            # The arrays themselves: a cache rebuilt from the same source and tokenizer is identical, one with
            # other content (another tokenizer version, a foreign copy) would feed other tokens at the same position.
            "token_cache": [[r.name, f"{m.crc32:08x}"] for r, m in zip(self.resolved_sources(), self.metas)],
        }

    # ---- statistics ---------------------------------------------------------------------------------------------
    def source_rows(self) -> list[SourceRow]:
        """The rows of the data report (report.py), one per source."""
        self._require_prepared()
        total = sum(s.weight for s in self.sources)
        return [SourceRow(r.name, s.weight / total, len(train), len(val), self.seq_len, r.n_bytes)
                for r, s, train, val in zip(self.resolved_sources(), self.sources, self.train_windows,
                                            self.val_windows)]

    def unigram_baseline(self) -> float:
        """Cross-entropy (nats/token) of the validation labels under the training unigram distribution
        (`moe.data.report.unigram_baseline`)."""
        self._require_prepared()
        weights = [s.weight for s in self.sources]
        return unigram_baseline([f.open() for f in self.files], self.train_windows, self.val_windows, weights,
                                self.n_vocab, self.seq_len)
