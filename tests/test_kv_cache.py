"""moe.kv_cache and the cached path of moe.attention: buffers sized per layer, the rolling buffer's slot
contents, cached attention over any chunking of a sequence against a brute-force per-query softmax written
here, and the model's cached forward against its forward without a cache.

Window convention (HF's): a query at position i sees the key at position j iff 0 <= i - j < window.
Shapes: B batch, N sequence length, T chunk length, H query heads, K key/value heads, C head dim, D model dim.
"""

from __future__ import annotations

import math

import pytest
import torch

from moe.attention import Attention
from moe.kv_cache import EMPTY, KVCache, LayerKVCache
from moe.model import build_model
from moe.rope import RotaryEmbedding, apply_rotary

from .tiny_models import tiny

V, N = 64, 16
HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}
# Chunkings of N = 16 tokens: one prefill, token by token, chunks longer than the small windows after a
# first chunk, and a prefill followed by decoding.
SCHEDULES = {"prefill": [16], "decode": [1] * 16, "mixed": [4, 1, 1, 6, 1, 3], "prefill+decode": [9] + [1] * 7}
WINDOWS = [None, 1, 3, 5, 16, 40]


def brute_force_attention(q, k, v, window: int | None) -> torch.Tensor:
    """q (B, H, N, C), k/v (B, K, N, C) of one whole sequence: each query's softmax over its allowed keys."""
    _, H, n, C = q.shape
    kv_head = torch.tensor([h // (H // k.shape[1]) for h in range(H)])
    k, v = k[:, kv_head], v[:, kv_head]  # (B, H, N, C)
    rows = []
    for i in range(n):
        keys = [j for j in range(n) if 0 <= i - j and (window is None or i - j < window)]
        scores = torch.einsum("bhc,bhjc->bhj", q[:, :, i], k[:, :, keys]) / math.sqrt(C)
        rows.append(torch.einsum("bhj,bhjc->bhc", scores.softmax(dim=-1), v[:, :, keys]))
    return torch.stack(rows, dim=2)  # (B, H, N, C)


def reference_attention(module: Attention, x: torch.Tensor, rotary: RotaryEmbedding) -> torch.Tensor:
    """The module's function on a whole sequence x (B, N, D), attention done by brute force. RoPE is the
    package's own apply_rotary, checked against the complex formulation in test_attention.py."""
    B, n, _ = x.shape
    cos, sin = rotary(torch.arange(n))

    def heads(t: torch.Tensor, count: int) -> torch.Tensor:
        return t.view(B, n, count, module.head_dim).transpose(1, 2)  # (B, H or K, N, C)

    q = apply_rotary(heads(module.q_proj(x), module.n_heads), cos, sin)
    k = apply_rotary(heads(module.k_proj(x), module.n_kv_heads), cos, sin)
    y = brute_force_attention(q, k, heads(module.v_proj(x), module.n_kv_heads), module.window)
    return module.o_proj(y.transpose(1, 2).reshape(B, n, -1))


@pytest.mark.parametrize("backend", ["eager", "sdpa", "auto"])
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("heads", HEADS)
@torch.no_grad()
def test_cached_attention_matches_brute_force(heads, window, schedule, backend):
    n_heads, n_kv_heads = HEADS[heads]
    config = tiny(n_heads=n_heads, n_kv_heads=n_kv_heads, sliding_window=window, attention_backend=backend,
                  attn_bias=True)
    torch.manual_seed(0)
    module, rotary = Attention(config, layer_idx=0), RotaryEmbedding(config.head_dim, config.rope_theta)
    x = torch.randn(2, N, config.d_model)
    expected = reference_attention(module, x, rotary)

    cache = LayerKVCache(2, n_kv_heads, config.head_dim, max_len=N, window=window)
    assert cache.n_slots == (window if window is not None and window < N else N)
    outputs, start = [], 0
    for T in SCHEDULES[schedule]:
        positions = torch.arange(start, start + T)
        cos, sin = rotary(positions)
        outputs.append(module(x[:, start:start + T], cos, sin, cache, positions))
        start += T
    torch.testing.assert_close(torch.cat(outputs, dim=1), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_rolling_buffer_holds_the_last_window_positions(schedule):
    window, head_dim = 5, 4
    cache = LayerKVCache(1, 1, head_dim, max_len=N, window=window)
    assert cache.rolling and cache.keys.shape == (1, 1, window, head_dim)
    start = 0
    for T in SCHEDULES[schedule]:
        positions = torch.arange(start, start + T)
        # Each key is filled with its own position, so the slot contents can be read back.
        k = positions.float()[None, None, :, None].expand(1, 1, T, head_dim)
        cache.update(k, k, positions)
        start += T
        held = {p: p % window for p in range(max(0, start - window), start)}  # position -> slot
        for p, slot in held.items():
            assert cache.positions[slot] == p and (cache.keys[0, 0, slot] == p).all()
        empty = [s for s in range(window) if s not in held.values()]
        assert all(cache.positions[s] == EMPTY for s in empty)
    assert cache.length == N


def test_for_model_sizes_buffers_per_layer():
    # Windows 3 (binds: rolling), None (full) and 40 (never binds within max_len = 20: full, 20 slots).
    model = build_model(tiny(n_layers=3, layer_windows=[3, None, 40], n_kv_heads=1))
    cache = KVCache.for_model(model, batch_size=2, max_len=20)
    assert [layer.keys.shape for layer in cache.layers] == [(2, 1, 3, 8), (2, 1, 20, 8), (2, 1, 20, 8)]
    assert [layer.rolling for layer in cache.layers] == [True, False, False]
    assert all(layer.keys.dtype == torch.float32 and layer.values.shape == layer.keys.shape
               for layer in cache.layers)
    assert KVCache.for_model(model, 1).max_len == model.config.max_seq_len
    assert KVCache.for_model(model, 1, 8, dtype=torch.bfloat16).layers[1].keys.dtype == torch.bfloat16


def test_rolling_memory_stays_bounded():
    model = build_model(tiny(sliding_window=4)).eval()
    cache = KVCache.for_model(model, batch_size=1, max_len=1000)
    before = [layer.keys.data_ptr() for layer in cache.layers]
    with torch.no_grad():
        model(torch.zeros(1, 10, dtype=torch.long), cache=cache)
        for _ in range(30):
            model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    assert cache.length == 40
    assert all(layer.keys.shape[2] == 4 for layer in cache.layers)
    assert [layer.keys.data_ptr() for layer in cache.layers] == before  # written in place, never regrown


def test_overflow_raises_before_writing():
    model = build_model(tiny()).eval()
    cache = KVCache.for_model(model, batch_size=1, max_len=6)
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="max_len=6"):
            model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    assert cache.length == 4 and all(layer.length == 4 for layer in cache.layers)


@pytest.mark.parametrize("bad, name", [({"batch_size": 0}, "batch_size"), ({"max_len": 0}, "max_len")])
def test_for_model_rejects_bad_sizes(bad, name):
    with pytest.raises(ValueError, match=name):
        KVCache.for_model(build_model(tiny()), **{"batch_size": 1, "max_len": 4, **bad})


MODELS = {
    "dense": {},
    "window3": {"sliding_window": 3},
    "layer_windows": {"layer_windows": [2, None]},
    "moe_window": {"n_experts": 4, "top_k": 2, "expert_ffn_dim": 32, "sliding_window": 5, "n_kv_heads": 1},
}


@pytest.mark.parametrize("schedule", ["prefill", "mixed", "prefill+decode"])
@pytest.mark.parametrize("name", MODELS)
@torch.no_grad()
def test_chunked_forward_matches_forward_without_cache(name, schedule):
    torch.manual_seed(0)
    model = build_model(tiny(**MODELS[name])).eval()
    x = torch.randint(0, V, (2, N), generator=torch.Generator().manual_seed(1))
    expected = model(x).logits
    cache = KVCache.for_model(model, batch_size=2, max_len=N)
    logits, start = [], 0
    for T in SCHEDULES[schedule]:
        logits.append(model(x[:, start:start + T], cache=cache).logits)  # positions continue from the cache
        start += T
    torch.testing.assert_close(torch.cat(logits, dim=1), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", MODELS)
@torch.no_grad()
def test_select_rows_continues_each_selected_row(name):
    """Prefill two prompts, repeat their rows (0, 0, 1, 1, 1) and append a different chunk to each copy: every
    row must match the whole sequence run without a cache (the rolling window of moe_window included)."""
    torch.manual_seed(0)
    model = build_model(tiny(**MODELS[name])).eval()
    gen = torch.Generator().manual_seed(3)
    prompts = torch.randint(0, V, (2, 7), generator=gen)
    rows = torch.tensor([0, 0, 1, 1, 1])
    chunks = torch.randint(0, V, (5, 4), generator=gen)
    cache = KVCache.for_model(model, batch_size=2, max_len=11)
    model(prompts, cache=cache)
    selected = cache.select_rows(rows)
    assert selected.length == 7 and cache.layers[0].keys.shape[0] == 2
    logits = model(chunks, cache=selected).logits  # (5, 4, V)
    expected = model(torch.cat([prompts[rows], chunks], dim=1)).logits[:, 7:]
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert selected.length == 11 and cache.length == 7  # the original cache is left as it was


EXPLICIT_POSITIONS = {
    # Shifted: RoPE is relative, so only the cache's own bookkeeping (masks from stored positions) is at stake.
    "shifted_window": ({"sliding_window": 3}, list(range(100, 110))),
    # Gapped: the logits do depend on these positions. No window, because the no-cache path measures windows in
    # token indices and the cache in positions, which agree only for consecutive positions.
    "gapped": ({}, [0, 1, 2, 4, 5, 6, 9, 10, 11, 12]),
}


@pytest.mark.parametrize("name", EXPLICIT_POSITIONS)
@torch.no_grad()
def test_explicit_positions_with_cache(name):
    overrides, positions = EXPLICIT_POSITIONS[name]
    positions = torch.tensor(positions)
    torch.manual_seed(0)
    model = build_model(tiny(**overrides)).eval()
    x = torch.randint(0, V, (1, 10), generator=torch.Generator().manual_seed(2))
    expected = model(x, positions=positions).logits
    if name == "gapped":
        assert not torch.allclose(expected, model(x).logits, atol=1e-4)  # the positions do matter
    cache = KVCache.for_model(model, batch_size=1, max_len=10)
    first = model(x[:, :6], positions=positions[:6], cache=cache).logits
    rest = [model(x[:, t:t + 1], positions=positions[t:t + 1], cache=cache).logits for t in range(6, 10)]
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("model_dtype, cache_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
@torch.no_grad()
def test_cache_dtype_may_differ_from_the_models(model_dtype, cache_dtype, window):
    # The 'mixed' schedule sends chunks longer than the window into a rolling buffer that already holds keys.
    torch.manual_seed(0)
    model = build_model(tiny(sliding_window=window)).eval()
    x = torch.randint(0, V, (2, N), generator=torch.Generator().manual_seed(1))
    expected = model(x).logits
    model.to(model_dtype)
    cache = KVCache.for_model(model, batch_size=2, max_len=N, dtype=cache_dtype)
    logits, start = [], 0
    for T in SCHEDULES["mixed"]:
        logits.append(model(x[:, start:start + T], cache=cache).logits)
        start += T
    assert all(layer.keys.dtype == cache_dtype for layer in cache.layers) and logits[0].dtype == model_dtype
    # bf16 somewhere on the way: agreement with the float32 forward without a cache to 5e-3 (measured: 2e-3),
    # against logits that differ by up to 0.7 between neighbouring positions.
    torch.testing.assert_close(torch.cat(logits, dim=1).float(), expected, atol=5e-3, rtol=0)


def test_cache_under_autocast_takes_the_autocast_dtype():
    model = build_model(tiny(sliding_window=3)).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cache = KVCache.for_model(model, batch_size=1, max_len=8)
        with torch.no_grad():
            model(torch.zeros(1, 4, dtype=torch.long), cache=cache)
    assert all(layer.keys.dtype == layer.values.dtype == torch.bfloat16 for layer in cache.layers)
    assert KVCache.for_model(model, batch_size=1, max_len=8).layers[0].keys.dtype == torch.float32
