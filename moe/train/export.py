"""Export a Lightning checkpoint of `LanguageModel` to an HF model directory (weights, config.json, tokenizer).

The directory loads with transformers' AutoModelForCausalLM and AutoTokenizer, so lm-evaluation-harness (its
`hf` model), vLLM or any HF tool can use a checkpoint trained here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moe.data.tokenizer import eos_id
from moe.hf import save_hf_checkpoint
from moe.hf_tokenizer import save_hf_tokenizer
from moe.train.checkpoint import load_lightning_checkpoint


def export_to_hf(checkpoint: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    model, tokenizer = load_lightning_checkpoint(checkpoint)
    out_dir = save_hf_checkpoint(model, out_dir, dtype=dtype)
    if tokenizer is not None:
        eos = tokenizer.id_to_token(eos_id(tokenizer))  # the token the data module put between documents
        save_hf_tokenizer(tokenizer, out_dir, eos, model_max_length=model.config.max_seq_len)
    return out_dir
