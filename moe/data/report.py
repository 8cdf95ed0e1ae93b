"""The pre-training data table, in the shape of LLaMA-1's Table 1 (Touvron et al. 2023): per source its sampling
proportion, epochs over the planned tokens and disk size, plus the training sequences and tokens behind them."""

from __future__ import annotations

from dataclasses import dataclass


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
        epochs = f"{row.epochs(planned_tokens):.2f}" if planned_tokens else "-"
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
