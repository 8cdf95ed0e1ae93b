"""Deterministic mixture schedule: global sample index k -> (source, window index), with O(1) random access.

The sample stream is cut into blocks of `block_size` samples. Every block holds exactly the same number of samples
of each source (largest-remainder rounding of weight * block_size), in an order shuffled per block from the seed.
So the n-th sample of source s in the stream is found by arithmetic: block b contributes counts[s] samples, and the
sample's rank among its block's source-s samples finishes it. Within a source, the n-th sample is position
n % N of a seeded permutation of its N training windows for source-epoch n // N: every window exactly once per
epoch, in a fresh order each epoch. Nothing depends on what was read before, so a resumed run, another rank or a
DataLoader worker computes the same mapping from k alone.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

DEFAULT_BLOCK_SIZE = 4096
# SeedSequence entropy tags that keep the random streams of different purposes apart.
_BLOCK_STREAM, _EPOCH_STREAM = 1, 2


def largest_remainder_counts(weights: list[float], total: int) -> np.ndarray:
    """Integer counts summing to `total`, proportional to `weights` (Hamilton's method; ties go to lower index)."""
    shares = np.asarray(weights, dtype=np.float64) / sum(weights) * total
    counts = np.floor(shares).astype(np.int64)
    remainders = shares - counts
    order = sorted(range(len(weights)), key=lambda s: (-remainders[s], s))
    for s in order[: total - int(counts.sum())]:
        counts[s] += 1
    return counts


class MixtureSchedule:
    """Maps global sample indices to (source index, training window index)."""

    def __init__(self, train_windows: list[np.ndarray], weights: list[float], seed: int, block_size: int | None = None):
        if len(train_windows) != len(weights) or not weights:
            raise ValueError("need one weight per source and at least one source")
        if any(len(w) == 0 for w in train_windows):
            raise ValueError("every source needs at least one training window")
        self.train_windows = train_windows
        self.weights = [w / sum(weights) for w in weights]
        self.seed = seed
        # A block must be large enough for the smallest weight to get at least one sample per block.
        smallest_block = math.ceil(1 / min(self.weights))
        self.block_size = block_size or max(DEFAULT_BLOCK_SIZE, smallest_block)
        self.counts = largest_remainder_counts(self.weights, self.block_size)
        if (self.counts == 0).any():
            raise ValueError(f"block size {self.block_size} gives a source no samples; weights {self.weights}")
        self._block_order = lru_cache(maxsize=4)(self._block_order_uncached)
        self._epoch_permutation = lru_cache(maxsize=2 * len(weights))(self._epoch_permutation_uncached)

    def _block_order_uncached(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """Source of every slot in the block, and each slot's rank among its source's slots."""
        sources = np.repeat(np.arange(len(self.counts)), self.counts)
        sources = np.random.default_rng([self.seed, _BLOCK_STREAM, block]).permutation(sources)
        ranks = np.empty_like(sources)
        for s in range(len(self.counts)):
            ranks[sources == s] = np.arange(self.counts[s])
        return sources, ranks

    def _epoch_permutation_uncached(self, source: int, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, _EPOCH_STREAM, source, epoch])
        return rng.permutation(len(self.train_windows[source]))

    def source_ordinal(self, k: int) -> tuple[int, int]:
        """(source s, n) where sample k is the n-th sample of source s in the stream."""
        block, slot = divmod(k, self.block_size)
        sources, ranks = self._block_order(block)
        source = int(sources[slot])
        return source, block * int(self.counts[source]) + int(ranks[slot])

    def __call__(self, k: int) -> tuple[int, int]:
        if k < 0:
            raise IndexError(f"sample index must be non-negative, got {k}")
        source, n = self.source_ordinal(k)
        epoch, position = divmod(n, len(self.train_windows[source]))
        return source, int(self.train_windows[source][self._epoch_permutation(source, epoch)[position]])
