"""Shared fixtures of the evaluation tests: the real validation rows in ../shared/evaldata (never copied into the
repository), a small byte-level BPE trained on some of their text, and a seeded tiny MoE model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from eval import task_names
from moe import build_model

# ../shared/evaldata beside the repository (the workspace layout); $MOE_EVAL_DATA where a clone lives elsewhere.
_CANDIDATES = [os.environ.get("MOE_EVAL_DATA"), Path(__file__).resolve().parents[3] / "shared" / "evaldata",
               "/work/shared/evaldata"]
EVALDATA = next((Path(p) for p in _CANDIDATES if p and Path(p).is_dir()), Path(__file__).resolve().parents[3]
                / "shared" / "evaldata")
MAX_SEQ_LEN = 256


def rows(task: str, n: int | None = None) -> list[dict]:
    with open(EVALDATA / task / "validation.jsonl") as f:
        return [json.loads(line) for i, line in enumerate(f) if n is None or i < n]


@pytest.fixture(scope="session")
def evaldata() -> Path:
    if not EVALDATA.is_dir():
        pytest.skip(f"evaluation data not found at {EVALDATA}")
    return EVALDATA


@pytest.fixture(scope="session")
def tokenizer(evaldata) -> Tokenizer:
    texts = [" ".join(str(v) for v in row.values()) for task in task_names() for row in rows(task, 150)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=800, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


@pytest.fixture(scope="session")
def model(tokenizer):
    torch.manual_seed(0)
    return build_model("tiny-moe", vocab_size=tokenizer.get_vocab_size(), max_seq_len=MAX_SEQ_LEN).eval()
