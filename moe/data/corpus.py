"""A corpus ready to train on: sources -> tokenizer -> cached token arrays -> each source's windows split into
training and validation -> the mixture schedule over the training windows. Plain Python, no Lightning: the data
module (datamodule.py) adds batches, processes and resume on top.

Everything here follows from (sources, tokenizer, seq_len, val_fraction, seed); `fingerprint` names those parts
so that a resume onto a different corpus can be refused.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from moe.data.checksum import combined_crc32
from moe.data.datasets import SourceTokens, TokenFile
from moe.data.mixture import SCHEDULE_VERSION, MixtureSchedule
from moe.data.packing import n_windows, split_windows
from moe.data.pretokenized import scan_while_hashing, token_shard
from moe.data.report import SourceRow, unigram_baseline
from moe.data.sources import DataError, ResolvedSource, Source, resolve_source
from moe.data.streaming import PLACEHOLDER_WINDOWS
from moe.data.token_cache import (
    TokenCacheMeta,
    cache_paths,
    counts_path,
    load_cached,
    token_counts,
    tokenize_source,
)
from moe.data.tokenizer import cached_trained_tokenizer, eos_id, load_tokenizer, n_token_ids, tokenizer_hash
from moe.errors import InputError

# The tokenizer is trained on at most this much text, shared among the sources by weight: BPE merges settle
# long before a large corpus is exhausted, and training time grows with the text.
TOKENIZER_TRAINING_BYTES = 1 << 30
_VAL_SPLIT_STREAM = 0  # SeedSequence tag; the mixture schedule uses 1 and 2


class TokenCorpus:
    """The sources of a mixture, tokenized and split; `prepare()` builds (or reads from the cache) what the
    datasets need: each source's shard arrays, its training and validation windows, and the mixture schedule."""

    def __init__(self, sources: list[Source], tokenizer: str | None, vocab_size: int, seq_len: int,
                 val_fraction: float, seed: int, cache_dir: Path, corpus_max_bytes: int | None, num_proc: int = 1):
        self.sources = sources
        self.tokenizer_path = tokenizer
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.val_fraction = val_fraction
        self.seed = seed
        self.cache_dir = cache_dir
        self.corpus_max_bytes = corpus_max_bytes
        self.num_proc = num_proc
        self.show_progress = True  # of tokenizer training: only the one process that trains it shows anything
        self._resolved: list[ResolvedSource] | None = None
        self._tokenizer: Tokenizer | None = None
        self._n_vocab: int | None = None
        self.files: list[SourceTokens | None] = []  # per source, its shards' arrays (None for a streaming source)
        self.metas: list[list[TokenCacheMeta]] = []  # ... and their metadata
        self.counts_paths: list[list[Path]] = []  # ... and where the count of each id in them is kept
        self.train_windows: list[np.ndarray] = []
        self.val_windows: list[np.ndarray] = []
        self.schedule: MixtureSchedule | None = None
        self._crcs: list[int] | None = None

    # ---- tokenizer ----------------------------------------------------------------------------------------------
    def resolved_sources(self) -> list[ResolvedSource]:
        if self._resolved is None:
            hashes = self.cache_dir / "hashes"
            scan = functools.partial(scan_while_hashing, cache_dir=self.cache_dir)  # pre-tokenized shards: one read
            self._resolved = [resolve_source(s, self.corpus_max_bytes, hashes, scan) for s in self.sources]
        return self._resolved

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            if self.tokenizer_path is not None:
                self._tokenizer = load_tokenizer(self.tokenizer_path)
            else:
                sources = self.resolved_sources()
                for source in sources:
                    if source.token_dtype is not None:
                        raise InputError(f"source {source.description!r} holds pre-tokenized shards: give the "
                                         "tokenizer that wrote them (TextDataModule.tokenizer), none can be trained "
                                         "on token ids")
                    if source.streaming:
                        raise InputError(f"source {source.description!r} is streamed while training: give a "
                                         "tokenizer (TextDataModule.tokenizer), since none is trained on a stream")
                data_key = "\0".join(f"{s.content_hash}:{w.weight}" for s, w in zip(sources, self.sources))
                self._tokenizer = cached_trained_tokenizer(
                    self.cache_dir, data_key, self.vocab_size, lambda: self._tokenizer_training_texts(sources),
                    show_progress=self.show_progress,
                )
        return self._tokenizer

    def _tokenizer_training_texts(self, sources: list[ResolvedSource]):
        """The sample the tokenizer is trained on: each source's first documents, up to its weight's share of
        TOKENIZER_TRAINING_BYTES, with a progress bar in bytes of the sample."""
        total_weight = sum(s.weight for s in self.sources)
        budgets = [min(r.n_bytes, TOKENIZER_TRAINING_BYTES * s.weight / total_weight)
                   for r, s in zip(sources, self.sources)]
        with tqdm(total=int(sum(budgets)), unit="B", unit_scale=True, desc="reading the tokenizer's training sample",
                  disable=not self.show_progress, leave=False) as progress:
            for resolved, budget in zip(sources, budgets):
                for text in resolved.documents():
                    yield text
                    progress.update(min(len(text), max(0, int(budget))))
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
            if source.streaming:  # read while training (streaming.py): no arrays, no held-out windows
                self.files.append(None)
                self.metas.append([])
                self.counts_paths.append([])
                self.train_windows.append(PLACEHOLDER_WINDOWS)
                self.val_windows.append(np.zeros(0, dtype=np.int64))
                continue
            shards = self._shards(source, tokenizer, eos, token_hash, show_progress)
            files = SourceTokens(tuple(file for file, _, _ in shards))
            n = n_windows(files.n_tokens, self.seq_len)
            if n == 0:
                raise DataError(
                    f"source {source.name!r} ({source.description}) has {files.n_tokens} tokens, fewer than one "
                    f"sequence of seq_len + 1 = {self.seq_len + 1}; add text to it, lower TextDataModule.seq_len, "
                    "or leave it out"
                )
            rng = np.random.default_rng([self.seed, _VAL_SPLIT_STREAM, index])
            train, val = split_windows(n, self.val_fraction, rng)
            self.files.append(files)
            self.metas.append([meta for _, meta, _ in shards])
            self.counts_paths.append([path for _, _, path in shards])
            self.train_windows.append(train)
            self.val_windows.append(val)
        self.schedule = MixtureSchedule(self.train_windows, [s.weight for s in self.sources], self.seed)

    def _shards(self, source: ResolvedSource, tokenizer: Tokenizer, eos: int, token_hash: str,
                show_progress: bool) -> list[tuple[TokenFile, TokenCacheMeta, Path]]:
        """(token file, its metadata, where its id counts are kept) for each shard of a source: pre-tokenized shards
        as they are, text tokenized (or read from the cache)."""
        if source.token_dtype is not None:
            shards = [token_shard(Path(s.description), s.key, source.token_dtype, self.cache_dir)
                      for s in source.shards]
            self._check_pretokenized(shards)
            return shards
        entries = self._whole_source_entry(source, token_hash) or tokenize_source(
            source, tokenizer, eos, token_hash, self.cache_dir, show_progress, self.num_proc)
        return [(file, meta, counts_path(Path(file.path))) for file, meta in entries]

    def _whole_source_entry(self, source: ResolvedSource, token_hash: str) -> list | None:
        """The one-array cache entry of a source of several files, as written before sources were tokenized shard
        by shard: still valid for the same content, so it is used rather than tokenizing every shard again."""
        if len(source.shards) == 1 and source.shards[0].key == source.content_hash:
            return None  # a file given alone: its shard's key is the source's, its entry is found either way
        entry, _ = load_cached(*cache_paths(self.cache_dir, source.content_hash, token_hash), self.n_vocab)
        if entry is None:
            return None
        tokens, meta = entry
        return [(TokenFile(str(tokens.filename), meta.dtype, meta.n_tokens), meta)]

    def _check_pretokenized(self, shards: list) -> None:
        for file, meta, _ in shards:
            if meta.max_token_id >= self.n_vocab:
                raise DataError(f"{file.path}: holds token id {meta.max_token_id}, beyond the {self.n_vocab} ids of "
                                f"the tokenizer {self.tokenizer_path}; pre-tokenized shards need the tokenizer that "
                                "wrote them (TextDataModule.tokenizer)")

    def _require_prepared(self) -> None:
        if not self.prepared:
            raise RuntimeError("call setup() first")

    @property
    def streaming(self) -> bool:
        return any(s.streaming for s in self.resolved_sources())

    @property
    def n_train(self) -> int:
        """Training windows of the cached sources (a stream's are not known ahead)."""
        return sum(len(w) for w, f in zip(self.train_windows, self.files) if f is not None)

    @property
    def n_val(self) -> int:
        return sum(len(w) for w in self.val_windows)

    def describe_train_windows(self) -> str:
        return ", ".join(f"{r.description}: {len(w)}" for r, w in zip(self.resolved_sources(), self.train_windows)
                         if not r.streaming)

    def max_token_id(self) -> int:
        self._require_prepared()
        # A stream's ids come from the tokenizer, which the data module checks against the model.
        return max((meta.max_token_id for metas in self.metas for meta in metas), default=0)

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
            # Per source, the CRC-32 of its whole stream, combined from its shards' without reading them.
            "token_cache": [[r.name, "stream" if r.streaming else f"{crc:08x}"]
                            for r, crc in zip(self.resolved_sources(), self._stream_crcs())],
        }

    def _stream_crcs(self) -> list[int]:
        """Computed once: a checkpoint saves the fingerprint every time (about 2 ms per shard to combine)."""
        if self._crcs is None:
            self._crcs = [combined_crc32([(m.crc32, m.n_tokens * np.dtype(m.dtype).itemsize) for m in metas])
                          for metas in self.metas]
        return self._crcs

    # ---- statistics ---------------------------------------------------------------------------------------------
    def source_rows(self) -> list[SourceRow]:
        """The rows of the data report (report.py), one per source."""
        self._require_prepared()
        total = sum(s.weight for s in self.sources)
        return [SourceRow(r.name + (" (stream)" if r.streaming else ""), s.weight / total,
                          0 if r.streaming else len(train), len(val), self.seq_len, r.n_bytes)
                for r, s, train, val in zip(self.resolved_sources(), self.sources, self.train_windows,
                                            self.val_windows)]

    def unigram_baseline(self) -> float:
        """Cross-entropy (nats/token) of the validation labels under the training unigram distribution
        (`moe.data.report.unigram_baseline`)."""
        self._require_prepared()
        # Over the cached sources: their validation windows are the validation set (a stream holds none out).
        cached = [i for i, files in enumerate(self.files) if files is not None]
        counts = [sum(self._padded(token_counts(file.open(), meta, path))
                      for file, meta, path in zip(self.files[i].files, self.metas[i], self.counts_paths[i]))
                  for i in cached]
        return unigram_baseline([self.files[i].open() for i in cached], counts,
                                [self.train_windows[i] for i in cached], [self.val_windows[i] for i in cached],
                                [self.sources[i].weight for i in cached], self.n_vocab, self.seq_len)

    def _padded(self, counts: np.ndarray) -> np.ndarray:
        return np.pad(counts, (0, max(0, self.n_vocab - len(counts))))
