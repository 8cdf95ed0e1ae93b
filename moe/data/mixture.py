"""Deterministic mixture schedule: global sample index k -> (source, window index), with O(1) random access.

Every source but the largest gets exactly floor(w_s * N) of the first N samples whenever N is a multiple of
`block_size`, computed in exact rational arithmetic; the largest source takes the rest. So the realised proportion
of a source is off by less than one sample at every block boundary, however small its weight: a source of weight
1e-4 appears once every ~10,000 samples, not rounded to 0 or 1 per block (which skews small weights by up to half
a sample per block) and without growing the block to 1 / weight samples. Inside a block the slots are shuffled
from the seed, and the n-th sample of source s is found by arithmetic: floor(w_s * b * block_size) samples of s
precede block b, and the sample's rank among its block's source-s slots finishes it. Within a source, the n-th
sample is position n % N of a seeded permutation of its N training windows for source-epoch n // N: every window
exactly once per epoch, in a fresh order each epoch. Nothing depends on what was read before, so a resumed run,
another rank or a DataLoader worker computes the same mapping from k alone.
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import lru_cache

import numpy as np

DEFAULT_BLOCK_SIZE = 4096
# Part of the resume fingerprint: a checkpoint taken under another schedule names other batches.
SCHEDULE_VERSION = 2
# SeedSequence entropy tags that keep the random streams of different purposes apart.
_BLOCK_STREAM, _EPOCH_STREAM = 1, 2


class MixtureSchedule:
    """Maps global sample indices to (source index, training window index)."""

    def __init__(self, train_windows: list[np.ndarray], weights: list[float], seed: int, block_size: int | None = None):
        if len(train_windows) != len(weights) or not weights:
            raise ValueError("need one weight per source and at least one source")
        if any(len(w) == 0 for w in train_windows):
            raise ValueError("every source needs at least one training window")
        if any(w <= 0 for w in weights):
            raise ValueError(f"weights must be positive, got {weights}")
        self.train_windows = train_windows
        total = sum(Fraction(w) for w in weights)
        self.fractions = [Fraction(w) / total for w in weights]  # exact, so every platform floors alike
        self.weights = [float(f) for f in self.fractions]
        self.seed = seed
        self.largest = int(np.argmax(self.weights))
        # The largest source's count in a block is block_size minus the others' floors, each of which can exceed
        # its exact share by less than one; a block where the largest gets at least that many slots stays valid.
        n_others = len(weights) - 1
        self.block_size = block_size or max(DEFAULT_BLOCK_SIZE, math.ceil(n_others / self.weights[self.largest]))
        if self.fractions[self.largest] * self.block_size < n_others:
            raise ValueError(f"block size {self.block_size} is too small for {len(weights)} sources")
        self._make_caches()

    def _make_caches(self) -> None:
        self._block_order = lru_cache(maxsize=4)(self._block_order_uncached)
        self._epoch_permutation = lru_cache(maxsize=2 * len(self.weights))(self._epoch_permutation_uncached)

    # The lru_cache wrappers do not pickle (spawned DataLoader workers, ddp_spawn): drop and rebuild them.
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_block_order", "_epoch_permutation")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._make_caches()

    def samples_before(self, n_samples: int) -> np.ndarray:
        """Samples of each source among the first `n_samples` (a multiple of block_size) of the stream."""
        counts = np.array([f.numerator * n_samples // f.denominator for f in self.fractions], dtype=np.int64)
        counts[self.largest] = n_samples - (counts.sum() - counts[self.largest])
        return counts

    def _block_order_uncached(self, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Source of every slot in the block, each slot's rank among its source's slots, and per source the
        samples of it before the block."""
        before = self.samples_before(block * self.block_size)
        counts = self.samples_before((block + 1) * self.block_size) - before
        sources = np.repeat(np.arange(len(counts)), counts)
        sources = np.random.default_rng([self.seed, _BLOCK_STREAM, block]).permutation(sources)
        ranks = np.empty_like(sources)
        for s in range(len(counts)):
            ranks[sources == s] = np.arange(counts[s])
        return sources, ranks, before

    def _epoch_permutation_uncached(self, source: int, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, _EPOCH_STREAM, source, epoch])
        return rng.permutation(len(self.train_windows[source]))

    def source_ordinal(self, k: int) -> tuple[int, int]:
        """(source s, n) where sample k is the n-th sample of source s in the stream."""
        block, slot = divmod(k, self.block_size)
        sources, ranks, before = self._block_order(block)
        source = int(sources[slot])
        return source, int(before[source]) + int(ranks[slot])

    def __call__(self, k: int) -> tuple[int, int]:
        if k < 0:
            raise IndexError(f"sample index must be non-negative, got {k}")
        source, n = self.source_ordinal(k)
        epoch, position = divmod(n, len(self.train_windows[source]))
        return source, int(self.train_windows[source][self._epoch_permutation(source, epoch)[position]])
