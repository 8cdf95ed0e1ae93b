"""Right-padded batches without their padding: the real tokens of a (B, T) batch packed into one row of N tokens.

Scoring runs sequences of different lengths together, right-padded to the longest; on its evaluation batches a
quarter of the tokens are padding. Everything a transformer does to one token at a time (embedding, norms,
projections, the MoE layers' routing and experts) runs on the N real tokens only; the tokens are unpacked to the
(B, T) layout only where they meet, in attention, and packed again after it. The padding's keys and values are
zeros there, and no real token sees them: right padding comes after a row's real tokens, and attention is causal
(with a KV cache too: the cached tokens precede the new ones). HF's flash-attention "varlen" path and BERT
unpadding do the same, with an attention kernel that needs no unpacking.
Shapes: B batch, T time, N real tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Unpadded(NamedTuple):
    index: torch.Tensor  # (N,) flat positions b * T + t of the real tokens, ascending (row-major order)
    batch: int  # B
    time: int  # T

    @classmethod
    def from_lengths(cls, lengths: torch.Tensor, batch: int, time: int) -> Unpadded | None:
        """Row b's real tokens are its first lengths[b] (B,); None when no token is padding (nothing to skip)."""
        if lengths.shape != (batch,):
            raise ValueError(f"lengths must have shape ({batch},), one per row, got {tuple(lengths.shape)}")
        real = torch.arange(time, device=lengths.device) < lengths[:, None]  # (B, T)
        index = real.view(-1).nonzero().squeeze(1)  # (N,)
        return None if index.numel() == batch * time else cls(index, batch, time)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (N, ...): the real tokens, row after row."""
        return x.reshape(self.batch * self.time, *x.shape[2:]).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (B, T, ...), zero at the padding."""
        out = x.new_zeros(self.batch * self.time, *x.shape[1:])
        return out.index_copy_(0, self.index, x).view(self.batch, self.time, *x.shape[1:])
