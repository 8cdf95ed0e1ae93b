"""Reading the Lightning checkpoints `LanguageModel` writes: the resolved architecture as plain values
("model_config"), the model's weights (state_dict keys prefixed "model.") and the tokenizer's JSON ("tokenizer").

One reader for `--model.init_from`, `moe export` and tests, so the checkpoint layout is known in one place.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer

from moe.config import ModelConfig
from moe.errors import InputError
from moe.model import Transformer
from moe.train.checkpoint_io import verify_checkpoint


def read_checkpoint(path: str | Path, map_location: torch.device | str = "cpu", verify: bool = True) -> dict:
    """The checkpoint's contents (memory-mapped, so the weights are read only when used), after checking that the
    file is whole (`verify_checkpoint`; `verify=False` for a file this process has just verified): torch.load
    would map a damaged file's tensors without a word."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if verify:
        verify_checkpoint(path)
    checkpoint = torch.load(path, map_location=map_location, mmap=True, weights_only=False)
    if "model_config" not in checkpoint or "state_dict" not in checkpoint:
        raise InputError(f"{path} is not a checkpoint written by moe's LanguageModel (no model_config/state_dict)")
    return checkpoint


def checkpoint_config(checkpoint: dict) -> ModelConfig:
    return ModelConfig(**checkpoint["model_config"])


def checkpoint_weights(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The Transformer's state dict (the LightningModule's "model." prefix removed)."""
    return {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}


def load_lightning_checkpoint(path: str | Path) -> tuple[Transformer, Tokenizer | None]:
    """The model (fp32, CPU) and tokenizer stored in a checkpoint written by `LanguageModel`."""
    checkpoint = read_checkpoint(path)
    with torch.device("meta"):
        model = Transformer(checkpoint_config(checkpoint))
    model.load_state_dict(checkpoint_weights(checkpoint), strict=True, assign=True)
    model.rotary.to_empty(device="cpu")  # non-persistent RoPE buffer: not in the checkpoint
    model.rotary.reset_parameters()
    tokenizer = Tokenizer.from_str(checkpoint["tokenizer"]) if checkpoint.get("tokenizer") else None
    return model.float(), tokenizer
