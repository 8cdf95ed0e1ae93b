"""The mixture schedule against brute-force counting over many samples."""

import math
import pickle
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest

from moe.data.mixture import MixtureSchedule


def windows_of(sizes):
    # Non-contiguous window ids, as after a validation split, so a schedule returning positions would be caught.
    return [np.arange(0, 3 * n, 3) + 1000 * s for s, n in enumerate(sizes)]


@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [1, 1], [0.05, 0.95]])
def test_proportions_over_many_samples(weights):
    schedule = MixtureSchedule(windows_of([50, 7, 300][: len(weights)]), weights, seed=3, block_size=1000)
    n = 10_537  # deliberately not a whole number of blocks
    counts = Counter(schedule(k)[0] for k in range(n))
    for s, w in enumerate(weights):
        assert abs(counts[s] / n - w / sum(weights)) < 0.005


@pytest.mark.parametrize("sizes,weights", [([37], [1.0]), ([20, 9, 5], [0.6, 0.3, 0.1])])
def test_every_window_once_per_source_epoch(sizes, weights):
    train_windows = windows_of(sizes)
    schedule = MixtureSchedule(train_windows, weights, seed=11, block_size=64)
    per_source = {s: [] for s in range(len(sizes))}
    for k in range(3000):
        source, window_id = schedule(k)
        per_source[source].append(window_id)
    for s, seen in per_source.items():
        n = sizes[s]
        epochs = [seen[e * n : (e + 1) * n] for e in range(len(seen) // n)]
        assert len(epochs) >= 2
        for epoch in epochs:
            assert sorted(epoch) == train_windows[s].tolist()
        assert epochs[0] != epochs[1]  # a fresh order each epoch


def test_single_source_epochs_are_aligned_to_sample_index():
    train_windows = windows_of([40])
    schedule = MixtureSchedule(train_windows, [1.0], seed=0)
    for epoch in range(3):
        assert sorted(schedule(k)[1] for k in range(40 * epoch, 40 * (epoch + 1))) == train_windows[0].tolist()


def test_random_access_matches_sequential():
    schedule = MixtureSchedule(windows_of([13, 29]), [0.4, 0.6], seed=5, block_size=32)
    sequential = [schedule(k) for k in range(500)]
    fresh = MixtureSchedule(windows_of([13, 29]), [0.4, 0.6], seed=5, block_size=32)
    order = np.random.default_rng(0).permutation(500)
    assert {int(k): fresh(int(k)) for k in order} == dict(enumerate(sequential))


def test_seed_determines_schedule():
    def stream(seed):
        schedule = MixtureSchedule(windows_of([13, 29]), [0.4, 0.6], seed=seed)
        return [schedule(k) for k in range(300)]

    def per_source_order(samples):
        return [[w for s, w in samples if s == source] for source in (0, 1)]

    assert stream(1) == stream(1)
    # Both random choices follow the seed: which source fills each slot, and each source's window order.
    assert [s for s, _ in stream(1)] != [s for s, _ in stream(2)]
    for a, b in zip(per_source_order(stream(1)), per_source_order(stream(2))):
        n = min(len(a), len(b))  # a partial block holds a seed-dependent number of each source's samples
        assert a[:n] != b[:n]


@pytest.mark.parametrize(
    "weights", [[0.0006, 0.9994], [1e-4, 1.0], [0.3, 0.001, 0.699], [1, 1, 1], [0.5, 0.3, 0.2], [7, 0.01, 2, 0.5]]
)
def test_exact_counts_at_every_block_boundary(weights):
    # Brute force in exact arithmetic: at the end of every block each source but the largest has had exactly
    # floor(w * N) of the first N samples; nobody is rounded per block, so tiny weights keep their proportion.
    block = 512
    schedule = MixtureSchedule(windows_of([9] * len(weights)), weights, seed=1, block_size=block)
    shares = [Fraction(w) / sum(Fraction(x) for x in weights) for w in weights]
    largest = max(range(len(weights)), key=lambda s: shares[s])
    counts = Counter()
    for k in range(40 * block):
        counts[schedule(k)[0]] += 1
        if (k + 1) % block == 0:
            for s, share in enumerate(shares):
                if s != largest:
                    assert counts[s] == math.floor(share * (k + 1)), (s, k + 1)


def test_tiny_weight_keeps_block_small_and_is_sampled():
    schedule = MixtureSchedule(windows_of([10, 10]), [1e-6, 1.0], seed=0)
    assert schedule.block_size == 4096  # memory per cached block does not grow as 1 / weight
    assert schedule.samples_before(10**6 + 4096 - 10**6 % 4096)[0] == 1
    assert schedule(3_000_000)[0] in (0, 1)


def test_schedule_pickles_for_spawned_workers():
    schedule = MixtureSchedule(windows_of([13, 29]), [0.4, 0.6], seed=5, block_size=32)
    expected = [schedule(k) for k in range(100)]
    clone = pickle.loads(pickle.dumps(schedule))
    assert [clone(k) for k in range(100)] == expected
