"""Packing windows and the validation split against brute-force slicing of the token stream."""

import numpy as np
import pytest

from moe.data.packing import n_windows, split_windows, window


@pytest.mark.parametrize("n_tokens", [5, 17, 64, 65, 100])
@pytest.mark.parametrize("seq_len", [1, 4, 16])
def test_windows_tile_the_stream(n_tokens, seq_len):
    stream = list(np.random.default_rng(n_tokens).integers(0, 1000, n_tokens))
    tokens = np.asarray(stream, dtype=np.uint16)
    n = n_windows(n_tokens, seq_len)
    # Brute force: the number of start positions i*T with a full T+1 window behind them.
    assert n == sum(1 for i in range(n_tokens) if i * seq_len + seq_len + 1 <= n_tokens)
    for i in range(n):
        inputs, labels = window(tokens, i, seq_len)
        assert inputs.tolist() == stream[i * seq_len : (i + 1) * seq_len]
        assert labels.tolist() == stream[i * seq_len + 1 : (i + 1) * seq_len + 1]  # inputs shifted by one
        assert inputs.dtype == np.int64
        if i + 1 < n:
            # Consecutive windows share exactly one token: this window's last label is the next one's first input.
            assert labels[-1] == window(tokens, i + 1, seq_len)[0][0]
    with pytest.raises(IndexError):
        window(tokens, n, seq_len)


@pytest.mark.parametrize("n,val_fraction,expected_val", [(100, 0.1, 10), (100, 0.0, 0), (10, 0.01, 1), (1, 0.5, 0)])
def test_split_is_a_seeded_partition(n, val_fraction, expected_val):
    train, val = split_windows(n, val_fraction, np.random.default_rng(7))
    assert len(val) == expected_val
    assert sorted(train.tolist() + val.tolist()) == list(range(n))
    again_train, again_val = split_windows(n, val_fraction, np.random.default_rng(7))
    assert (again_val == val).all() and (again_train == train).all()


def test_split_depends_on_seed():
    vals = {tuple(split_windows(1000, 0.05, np.random.default_rng(seed))[1]) for seed in range(5)}
    assert len(vals) == 5


def test_split_rejects_bad_fraction():
    with pytest.raises(ValueError, match="val_fraction"):
        split_windows(10, 1.0, np.random.default_rng(0))
