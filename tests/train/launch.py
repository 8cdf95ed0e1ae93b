"""What the tests that start training processes share: a free port for torch.distributed, full weights from
sharded ones, and a small corpus whose tokenizer and token cache are built once, before the processes start, so
that none of them trains a tokenizer."""

from __future__ import annotations

import json
import random
import socket
from pathlib import Path

import torch

from moe.data import Source, TextDataModule


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def code_corpus(folder: Path, seq_len: int, batch_size: int) -> tuple[Path, Path, int]:
    """16 JSON lines documents of code-like words in folder/corpus.jsonl, tokenized (vocab_size 300, val_fraction 0.1)
    into folder/cache; returns the two paths and the number of batches in one epoch."""
    rng = random.Random(0)
    words = ["def", "return", "class", "import", "self", "value", "index", "for", "in", "if", "else", "print"]
    path = folder / "corpus.jsonl"
    with open(path, "w") as f:
        f.writelines(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(20, 40)))}) + "\n" for _ in range(16))
    data = TextDataModule([Source(str(path))], vocab_size=300, seq_len=seq_len, batch_size=batch_size, num_workers=0,
                          val_fraction=0.1, cache_dir=str(folder / "cache"))
    data.setup("fit")
    return path, folder / "cache", data.batches_per_epoch()


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as a full, plain tensor, DTensor shards gathered (a collective: every process must call it)."""
    from torch.distributed.tensor import DTensor

    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for name, p in model.named_parameters()}
