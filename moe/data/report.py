"""The pre-training data table, in the shape of LLaMA-1's Table 1 (Touvron et al. 2023): per source its sampling
proportion, epochs over the planned tokens and disk size, plus the training sequences and tokens behind them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SourceRow:
    name: str
    proportion: float
    train_sequences: int
    val_sequences: int
    seq_len: int
    disk_bytes: int

    @property
    def train_tokens(self) -> int:
        return self.train_sequences * self.seq_len

    def epochs(self, planned_tokens: int) -> float:
        return planned_tokens * self.proportion / self.train_tokens


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def human_count(n: float) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000 or unit == "B":
            return f"{n:.0f}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    raise AssertionError


def format_report(rows: list[SourceRow], planned_tokens: int | None, tokenizer_line: str) -> str:
    header = ["Dataset", "Sampling prop.", "Train seqs", "Train tokens", "Val seqs", "Epochs", "Disk size"]
    table = [header]
    for row in rows:
        epochs = f"{row.epochs(planned_tokens):.2f}" if planned_tokens and row.train_sequences else "-"
        table.append(
            [
                row.name,
                f"{100 * row.proportion:.1f}%",
                human_count(row.train_sequences),
                human_count(row.train_tokens),
                human_count(row.val_sequences),
                epochs,
                human_bytes(row.disk_bytes),
            ]
        )
    table.append(
        [
            "Total",
            "100.0%",
            human_count(sum(r.train_sequences for r in rows)),
            human_count(sum(r.train_tokens for r in rows)),
            human_count(sum(r.val_sequences for r in rows)),
            "-",
            human_bytes(sum(r.disk_bytes for r in rows)),
        ]
    )
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
        for line in table
    ]
    rule = "-" * len(lines[0])
    planned = f"planned tokens: {human_count(planned_tokens)}" if planned_tokens else "planned tokens: unknown"
    return "\n".join([tokenizer_line, planned, rule, lines[0], rule, *lines[1:-1], rule, lines[-1]])


# Tokens per read of the unigram baseline's counting, bounding its memory on any corpus size.
_BASELINE_CHUNK_TOKENS = 1 << 24


def unigram_baseline(token_arrays: list, token_counts: list[np.ndarray], train_windows: list, val_windows: list,
                     weights: list[float], n_vocab: int, seq_len: int) -> float:
    """Cross-entropy (nats/token) of the validation labels under the training unigram distribution.

    Each source's unigram is add-one smoothed and the sources are mixed by weight, as the model sees them. A
    model that has not beaten this number has learnt nothing beyond token frequencies. Per source: its token array,
    the count of each id in it (kept by the token cache since tokenizing, so the corpus is not read again), and the
    indices of its training and validation windows of seq_len + 1 tokens. Only the validation windows and the few
    tokens outside every window are read.
    """
    V, T = n_vocab, seq_len
    total_weight = sum(weights)
    probabilities = np.zeros(V)
    val_counts = np.zeros(V)
    for tokens, all_counts, train, val, weight in zip(token_arrays, token_counts, train_windows, val_windows, weights):
        n = len(train) + len(val)
        # The labels of all windows are tokens[1 : n*T + 1]: every token but the first and the tail past the last
        # window (fewer than T). Those of the validation windows taken away leave the training labels.
        counts = np.zeros(V)
        counts[: len(all_counts)] += all_counts
        counts -= np.bincount(np.asarray(tokens[0:1]), minlength=V)
        counts -= np.bincount(np.asarray(tokens[n * T + 1 : len(tokens)]), minlength=V)
        source_val_counts = np.zeros(V)
        per_chunk = max(1, _BASELINE_CHUNK_TOKENS // T)
        for first in range(0, len(val), per_chunk):
            labels = tokens[val[first : first + per_chunk, None] * T + 1 + np.arange(T)]  # [windows, T]
            source_val_counts += np.bincount(labels.ravel(), minlength=V)
        counts -= source_val_counts
        probabilities += weight / total_weight * (counts + 1) / (counts.sum() + V)
        val_counts += source_val_counts
    if val_counts.sum() == 0:
        raise ValueError("no validation tokens (TextDataModule.val_fraction is 0)")
    return float(-(val_counts * np.log(probabilities)).sum() / val_counts.sum())
