"""Normalisation layers: RMSNorm (Zhang & Sennrich 2019) as Llama uses it, and LayerNorm with or without
learnable parameters (OLMo-1B uses none)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the weight, as HF's LlamaRMSNorm does, so bf16
    training keeps a full-precision variance and imported checkpoints match bit for bit in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def build_norm(norm_type: str, dim: int, eps: float) -> nn.Module:
    if norm_type == "rmsnorm":
        return RMSNorm(dim, eps)
    if norm_type == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    if norm_type == "layernorm_nonparam":
        return nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
    raise ValueError(f"unknown norm_type {norm_type!r}")
