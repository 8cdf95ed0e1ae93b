"""Causal self-attention for MHA, GQA and MQA, with an optional sliding window (Mistral, Jiang et al. 2023).

Window convention (HF's): query i sees key j when 0 <= i - j < window, i.e. itself and window - 1 earlier keys.

Kernels, all computing the same function (checked against a brute-force reference in tests):
- 'sdpa': torch's scaled_dot_product_attention; `is_causal` (flash/efficient kernels, no T x T mask) when the
  window does not bind, an explicit boolean window mask otherwise.
- 'flex': FlexAttention with a sliding-window block mask; compiled on GPU so no T x T mask is ever built, and
  fully masked key blocks are skipped.
- 'eager': explicit scores, mask and softmax in float32; the simplest path.
- 'auto': flex on GPU when a window binds, sdpa everywhere else.
With a key/value cache (moe/kv_cache.py) the T new queries attend over S cached slots instead, under a mask
computed from absolute positions (causal, window, empty slot): 'eager' keeps its float32 path, every other
backend uses sdpa with that mask, since decoding a token is a (1 x S) product that no block-sparse kernel speeds up.
Shapes: B batch, T time, S cache slots, H query heads, K key/value heads, C head dim, D model dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moe.config import ModelConfig
from moe.kv_cache import LayerKVCache
from moe.norm import RMSNorm
from moe.rope import apply_rotary
from moe.unpadded import Unpadded


def sliding_window_mask(seq_len: int, window: int | None, device: torch.device | None = None) -> torch.Tensor:
    """Boolean (T, T) mask, True where query i may attend to key j."""
    pos = torch.arange(seq_len, device=device)
    delta = pos[:, None] - pos[None, :]
    allowed = delta >= 0
    if window is not None:
        allowed &= delta < window
    return allowed


def position_mask(query_positions: torch.Tensor, key_positions: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean (T, S) mask, True where a query at position query_positions[i] may attend to the key at
    key_positions[j]; the same rule as sliding_window_mask, for keys held in any slot order."""
    delta = query_positions[:, None] - key_positions[None, :]
    allowed = delta >= 0
    if window is not None:
        allowed &= delta < window
    return allowed


def masked_eager_attention(q, k, v, mask: torch.Tensor) -> torch.Tensor:
    """q (B, H, T, C), k/v (B, K, S, C), mask (T, S) -> (B, H, T, C), materialising the scores in float32."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


def eager_attention(q, k, v, window: int | None) -> torch.Tensor:
    """q (B, H, T, C), k/v (B, K, T, C) -> (B, H, T, C), materialising the scores in float32."""
    return masked_eager_attention(q, k, v, sliding_window_mask(q.shape[-2], window, q.device))


def sdpa_attention(q, k, v, window: int | None) -> torch.Tensor:
    seq_len = q.shape[-2]
    if window is None or window >= seq_len:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    mask = sliding_window_mask(seq_len, window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


_block_masks: dict[tuple, object] = {}
_compiled_flex = None


def _flex_block_mask(seq_len: int, window: int | None, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    key = (seq_len, window, str(device))
    if key not in _block_masks:
        def causal_window(b, h, q_idx, kv_idx):
            allowed = q_idx >= kv_idx
            if window is not None:
                allowed = allowed & (q_idx - kv_idx < window)
            return allowed

        _block_masks[key] = create_block_mask(causal_window, None, None, seq_len, seq_len, device=device)
    return _block_masks[key]


def flex_attention(q, k, v, window: int | None) -> torch.Tensor:
    from torch.nn.attention import flex_attention as flex

    global _compiled_flex
    block_mask = _flex_block_mask(q.shape[-2], window, q.device)
    if q.is_cuda:
        # Uncompiled FlexAttention falls back to a dense reference; only the compiled kernel skips blocks.
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex.flex_attention, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=True)
    return flex.flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)


def attend(q, k, v, window: int | None, backend: str = "auto") -> torch.Tensor:
    """Causal (optionally windowed) attention with the chosen kernel."""
    if backend == "auto":
        window_binds = window is not None and window < q.shape[-2]
        backend = "flex" if (q.is_cuda and window_binds) else "sdpa"
    if backend == "sdpa":
        return sdpa_attention(q, k, v, window)
    if backend == "flex":
        return flex_attention(q, k, v, window)
    if backend == "eager":
        return eager_attention(q, k, v, window)
    raise ValueError(f"unknown attention backend {backend!r}")


def cached_attention(q, k, v, query_positions, key_positions, window: int | None, backend: str = "auto"):
    """q (B, H, T, C) at query_positions (T,) over cached k/v (B, K, S, C) at key_positions (S,) -> (B, H, T, C).
    Every query's own key is among the S, so no row of the mask is empty. sdpa runs in the cache's dtype (a
    bf16 cache of a float32 model, or the reverse), casting the T queries rather than the S cached keys."""
    mask = position_mask(query_positions, key_positions, window)  # (T, S)
    if backend == "eager":
        return masked_eager_attention(q, k, v, mask)
    return F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=mask, enable_gqa=True).to(q.dtype)


class Attention(nn.Module):
    """Multi-head attention with grouped key/value heads and RoPE; HF's projection names."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.window = config.window_for_layer(layer_idx)
        self.backend = config.attention_backend
        d, c = config.d_model, config.head_dim
        self.q_proj = nn.Linear(d, self.n_heads * c, bias=config.attn_bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * c, bias=config.attn_bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * c, bias=config.attn_bias)
        self.o_proj = nn.Linear(self.n_heads * c, d, bias=False)
        # QK-norm (ModelConfig.qk_norm): 'head' normalises each head's C channels with one shared weight (Qwen3),
        # 'full' all heads' channels of a token together (OLMoE, OLMo 2), before RoPE either way.
        self.qk_norm = config.qk_norm
        if self.qk_norm is not None:
            q_width, k_width = (c, c) if self.qk_norm == "head" else (self.n_heads * c, self.n_kv_heads * c)
            self.q_norm, self.k_norm = RMSNorm(q_width, config.norm_eps), RMSNorm(k_width, config.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerKVCache | None = None,
                positions: torch.Tensor | None = None, unpadded: Unpadded | None = None) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D). With a cache, x holds the T tokens that follow the cached ones, at
        `positions` (T,); their keys and values are appended to the cache. With `unpadded`, x (1, N, D) holds
        the real tokens of a right-padded (B, T) batch (moe/unpadded.py): they are projected as they are and
        attend in the (B, T) layout, padding's keys and values zero; the result is (1, N, D)."""
        B, T, _ = x.shape
        # Head counts come from the projections' widths, not the config: under tensor parallelism each process
        # holds H / tp query and K / tp key/value heads (moe/train/parallel.py).
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (B, T, H*C), (B, T, K*C), (B, T, K*C)
        if self.qk_norm == "full":  # over a token's heads together: all of them must be here (not under TP)
            q, k = self.q_norm(q), self.k_norm(k)
        if unpadded is not None:
            q, k, v = (unpadded.unpack(t[0]) for t in (q, k, v))
            B, T = unpadded.batch, unpadded.time
        q, k = q.view(B, T, -1, self.head_dim), k.view(B, T, -1, self.head_dim)  # (B, T, H, C), (B, T, K, C)
        if self.qk_norm == "head":
            # Before the transpose, as HF's Qwen3: on the transposed view the norm's output would be laid out
            # (B, H, T, C), and so would attention's, which then needs a copy of its own for o_proj.
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, C), (B, K, T, C)
        v = v.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, K, T, C)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is None:
            y = attend(q, k, v, self.window, self.backend)  # (B, H, T, C)
        else:
            keys, values, key_positions = cache.update(k, v, positions)  # (B, K, S, C), (S,)
            y = cached_attention(q, keys, values, positions, key_positions, self.window, self.backend)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*C)
        if unpadded is not None:
            y = unpadded.pack(y)[None]  # (1, N, H*C)
        return self.o_proj(y)  # (B, T, D), or (1, N, D) unpadded
