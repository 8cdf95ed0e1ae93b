"""Tiny models shared by the model, KV-cache, generation and HF tests: one small config and a weight
randomiser, so every test file builds the same shapes the same way."""

from __future__ import annotations

import torch

from moe.config import ModelConfig

V = 64


def tiny(**overrides) -> ModelConfig:
    values = {"name": "tiny", "vocab_size": V, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
              "ffn_dim": 64, "max_seq_len": 64, "expert_backend": "loop"}
    values.update(overrides)
    return ModelConfig(**values)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights of std 0.1 with norms around one (and non-zero biases): logits spread enough that greedy choices
    are not near-ties, and a swapped tensor shows."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model.eval()
