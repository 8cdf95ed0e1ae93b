"""Rotary position embedding (Su et al. 2021, RoFormer) in HF's "rotate half" convention.

HF checkpoints store q/k projections for this convention (the first and second halves of each head are the
rotated pairs), so imported weights need no permutation.
Shapes: B batch, T time, H heads, C head dim.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1's frequency bands: wavelengths shorter than original_max_position_embeddings / high_freq_factor
    keep their frequency, those longer than original / low_freq_factor are divided by `factor`, and those between
    are interpolated linearly in 1 / wavelength (the smooth factor), as transformers' llama3 rope type computes."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelength - low) / (high - low)
    interpolated = (1 - smooth) * scaled / factor + smooth * scaled
    between = (wavelength >= original / high) & (wavelength <= original / low)
    return torch.where(between, interpolated, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float, scaling: dict | None = None):
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        inv_freq = 1.0 / (self.theta**exponents)
        if self.scaling is not None:  # the only rope_type ModelConfig accepts: llama3
            inv_freq = llama3_inv_freq(inv_freq, self.scaling)
        return inv_freq

    def reset_parameters(self) -> None:
        # A non-persistent buffer is not in checkpoints: after building on the meta device and materialising
        # with to_empty(), it holds garbage until recomputed here.
        self.inv_freq = self._inv_freq(self.inv_freq.device)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of shape (T, C) for integer positions of shape (T,), computed in float32."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # (T, C/2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (T, C)
        return angles.cos(), angles.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x of shape (B, H, T, C) by the angles in cos/sin of shape (T, C)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if torch.is_grad_enabled() and x.requires_grad:
        return x * cos + _rotate_half(x) * sin
    # Without autograd the rotated half is added into x * cos in place rather than built by a negation and a copy
    # (cat): the same products and sums (a + (-b) is a - b), bit for bit, in two fewer passes over x.
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half] -= x[..., half:] * sin[..., :half]
    out[..., half:] += x[..., :half] * sin[..., half:]
    return out
