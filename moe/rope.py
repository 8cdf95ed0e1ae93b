"""Rotary position embedding (Su et al. 2021, RoFormer) in HF's "rotate half" convention.

HF checkpoints store q/k projections for this convention (the first and second halves of each head are the
rotated pairs), so imported weights need no permutation.
Shapes: B batch, T time, H heads, C head dim.
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        return 1.0 / (self.theta**exponents)

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
