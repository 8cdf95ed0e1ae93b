"""Packing a token stream into fixed-length training windows, and the held-out validation split.

The stream is `doc0 EOS doc1 EOS ...`; window i is `tokens[i*T : i*T + T + 1]`, its first T tokens the inputs and
its last T the labels, so consecutive windows share exactly one token and no token is wasted on padding (GPT-2 /
LLaMA style packing; documents cross window boundaries and attend across EOS, as in those models).
"""

from __future__ import annotations

import numpy as np


def n_windows(n_tokens: int, seq_len: int) -> int:
    return max(0, (n_tokens - 1) // seq_len)


def window(tokens: np.ndarray, index: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and labels (each T tokens, int64) of window `index`."""
    chunk = np.asarray(tokens[index * seq_len : index * seq_len + seq_len + 1], dtype=np.int64)
    if chunk.shape[0] != seq_len + 1:
        raise IndexError(f"window {index} runs past the end of a {len(tokens)}-token stream")
    return chunk[:-1], chunk[1:]


def split_windows(n: int, val_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train and validation window indices: a random `val_fraction` of the n windows is held out."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = 0 if val_fraction == 0 else min(n - 1, max(1, round(val_fraction * n)))
    n_val = max(n_val, 0)
    order = rng.permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])
