"""Export a Lightning checkpoint of `LanguageModel` to an HF model directory (weights, config.json, tokenizer).

The directory loads with transformers' AutoModelForCausalLM and AutoTokenizer, so lm-evaluation-harness (its
`hf` model), vLLM or any HF tool can use a checkpoint trained here.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer

from moe.config import ModelConfig
from moe.hf import save_hf_checkpoint
from moe.hf_tokenizer import save_hf_tokenizer
from moe.model import Transformer

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")


def load_lightning_checkpoint(path: str | Path) -> tuple[Transformer, Tokenizer | None]:
    """The model (fp32, CPU) and tokenizer stored in a checkpoint written by `LanguageModel`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    if "model_config" not in checkpoint or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a checkpoint written by moe's LanguageModel (no model_config/state_dict)")
    config = ModelConfig(**checkpoint["model_config"])
    with torch.device("meta"):
        model = Transformer(config)
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state, strict=True, assign=True)
    model.rotary.to_empty(device="cpu")  # non-persistent RoPE buffer: not in the checkpoint
    model.rotary.reset_parameters()
    tokenizer = Tokenizer.from_str(checkpoint["tokenizer"]) if checkpoint.get("tokenizer") else None
    return model.float(), tokenizer


def export_to_hf(checkpoint: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    model, tokenizer = load_lightning_checkpoint(checkpoint)
    out_dir = save_hf_checkpoint(model, out_dir, dtype=dtype)
    if tokenizer is not None:
        eos = next((t for t in EOS_CANDIDATES if tokenizer.token_to_id(t) is not None), None)
        if eos is None:
            raise ValueError(f"the checkpoint's tokenizer has none of the end-of-text tokens {EOS_CANDIDATES}")
        save_hf_tokenizer(tokenizer, out_dir, eos, model_max_length=model.config.max_seq_len)
    return out_dir
