"""moe.attention and moe.rope against brute-force oracles written here from the definitions.

Window convention under test (HF's): query i sees key j iff 0 <= i - j < window; None means plain causal.
Shapes: B batch, T time, H query heads, K key/value heads, C head dim, D model dim.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from moe.attention import Attention, attend, sliding_window_mask
from moe.config import ModelConfig
from moe.rope import RotaryEmbedding, apply_rotary

BACKENDS = ["eager", "sdpa", "flex", "auto"]
HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}
# Lengths below, at and just past FlexAttention's 128-token block, so partial blocks are exercised.
SEQ_LENS = [7, 128, 131]
# Windows relative to T: shorter (the degenerate 1, and T-1, the longest that still drops a key), equal,
# longer, and none.
WINDOWS = {"w1": lambda T: 1, "w5": lambda T: 5, "w=T-1": lambda T: T - 1, "w=T": lambda T: T,
           "w=T+3": lambda T: T + 3, "full": lambda T: None}


def allowed(i: int, j: int, window: int | None) -> bool:
    return 0 <= i - j and (window is None or i - j < window)


def brute_force_mask(seq_len: int, window: int | None) -> torch.Tensor:
    mask = torch.zeros(seq_len, seq_len, dtype=torch.bool)
    for i in range(seq_len):
        for j in range(seq_len):
            mask[i, j] = allowed(i, j, window)
    return mask


def brute_force_attention(q, k, v, window: int | None) -> torch.Tensor:
    """q (B, H, T, C), k/v (B, K, T, C): one softmax per query over its allowed keys only.
    Query head h reads key/value head h // (H / K), HF's repeat_kv grouping."""
    _, H, T, C = q.shape
    group = H // k.shape[1]
    kv_head = torch.tensor([h // group for h in range(H)])
    k, v = k[:, kv_head], v[:, kv_head]  # (B, H, T, C)
    rows = []
    for i in range(T):
        keys = [j for j in range(T) if allowed(i, j, window)]
        scores = torch.einsum("bhc,bhjc->bhj", q[:, :, i], k[:, :, keys]) / math.sqrt(C)
        rows.append(torch.einsum("bhj,bhjc->bhc", scores.softmax(dim=-1), v[:, :, keys]))
    return torch.stack(rows, dim=2)  # (B, H, T, C)


def random_qkv(seq_len: int, n_heads: int, n_kv_heads: int, head_dim: int = 8, batch: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, n_heads, seq_len, head_dim, generator=gen)
    k = torch.randn(batch, n_kv_heads, seq_len, head_dim, generator=gen)
    v = torch.randn(batch, n_kv_heads, seq_len, head_dim, generator=gen)
    return q, k, v


@functools.cache
def case(seq_len: int, window: int | None, heads: str):
    """Inputs and brute-force output of one attention case, shared by the backends compared against it."""
    q, k, v = random_qkv(seq_len, *HEADS[heads])
    return q, k, v, brute_force_attention(q, k, v, window)


@pytest.mark.parametrize("window_spec", list(WINDOWS))
@pytest.mark.parametrize("seq_len", [2, 5, 12])
def test_sliding_window_mask_matches_brute_force(seq_len, window_spec):
    window = WINDOWS[window_spec](seq_len)
    assert torch.equal(sliding_window_mask(seq_len, window), brute_force_mask(seq_len, window))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("window_spec", list(WINDOWS))
@pytest.mark.parametrize("seq_len", SEQ_LENS)
def test_attend_matches_brute_force(seq_len, window_spec, heads, backend):
    window = WINDOWS[window_spec](seq_len)
    q, k, v, expected = case(seq_len, window, heads)
    torch.testing.assert_close(attend(q, k, v, window, backend), expected, atol=1e-5, rtol=1e-5)


def test_window_one_is_identity_on_values():
    # Each query sees only itself, so the output is its own (head-group's) value vector.
    q, k, v = random_qkv(9, 4, 2)
    for backend in BACKENDS:
        out = attend(q, k, v, 1, backend)
        torch.testing.assert_close(out, v.repeat_interleave(2, dim=1), atol=1e-6, rtol=1e-6)


# FlexAttention has a backward only through its compiled GPU kernel, and these tests run on CPU.
GRAD_BACKENDS = [b if b != "flex" else pytest.param(b, marks=pytest.mark.skip(
    reason="FlexAttention has no backward on CPU")) for b in BACKENDS]


@pytest.mark.parametrize("backend", GRAD_BACKENDS)
@pytest.mark.parametrize("heads", ["gqa", "mqa"])
@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("seq_len", [10, 130])
def test_gradients_match_brute_force(seq_len, window, heads, backend):
    q, k, v = random_qkv(seq_len, *HEADS[heads], seed=1)
    upstream = torch.randn(q.shape, generator=torch.Generator().manual_seed(2))

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        (fn(*leaves) * upstream).sum().backward()
        return [t.grad for t in leaves]

    expected = grads(lambda q, k, v: brute_force_attention(q, k, v, window))
    got = grads(lambda q, k, v: attend(q, k, v, window, backend))
    for name, g, want in zip("qkv", got, expected):
        torch.testing.assert_close(g, want, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"d{name}: {m}")


def test_unknown_backend_raises():
    q, k, v = random_qkv(4, 2, 2)
    with pytest.raises(ValueError, match="unknown attention backend"):
        attend(q, k, v, None, "nope")


# ---------------------------------------------------------------------------------------------- RoPE

def complex_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding as complex multiplication of the half-split pairs (x[j], x[j + C/2]) by
    exp(i * p * theta^(-2j/C)), computed in float64."""
    C = x.shape[-1]
    half = C // 2
    freqs = torch.tensor([theta ** (-2 * j / C) for j in range(half)], dtype=torch.float64)  # (C/2,)
    rotation = torch.polar(torch.ones(len(positions), half, dtype=torch.float64),
                           positions.double()[:, None] * freqs[None, :])  # (T, C/2)
    pairs = torch.complex(x[..., :half].double(), x[..., half:].double()) * rotation
    return torch.cat((pairs.real, pairs.imag), dim=-1).to(x.dtype)


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
@pytest.mark.parametrize("head_dim", [8, 16])
def test_rope_matches_complex_formulation(head_dim, theta):
    x = torch.randn(2, 3, 11, head_dim, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(11) + 5  # offset positions, as for a continued sequence
    cos, sin = RotaryEmbedding(head_dim, theta)(positions)
    torch.testing.assert_close(apply_rotary(x, cos, sin), complex_rope(x, positions, theta), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_without_autograd_equals_the_autograd_formula_bit_for_bit(dtype):
    """Without autograd apply_rotary adds the rotated half into x * cos in place: the same products and sums."""
    x = torch.randn(2, 3, 11, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    cos, sin = RotaryEmbedding(16, 10000.0)(torch.arange(11) + 7)
    with_graph = apply_rotary(x.clone().requires_grad_(), cos, sin)
    assert with_graph.requires_grad
    assert torch.equal(apply_rotary(x, cos, sin), with_graph.detach())


def brute_force_llama3_frequencies(head_dim: int, theta: float, scaling: dict) -> list[float]:
    """Llama 3.1's rule frequency by frequency, as the reference implementation (Meta's apply_scaling) states it:
    keep short wavelengths, divide long ones by the factor, blend in between."""
    original = scaling["original_max_position_embeddings"]
    low_wavelength = original / scaling["low_freq_factor"]
    high_wavelength = original / scaling["high_freq_factor"]
    out = []
    for j in range(head_dim // 2):
        freq = 1.0 / theta ** (2 * j / head_dim)
        wavelength = 2 * math.pi / freq
        if wavelength < high_wavelength:
            out.append(freq)
        elif wavelength > low_wavelength:
            out.append(freq / scaling["factor"])
        else:
            smooth = (original / wavelength - scaling["low_freq_factor"]) / (
                scaling["high_freq_factor"] - scaling["low_freq_factor"])
            out.append((1 - smooth) * freq / scaling["factor"] + smooth * freq)
    return out


@pytest.mark.parametrize("original", [64, 8192])
def test_llama3_rope_frequencies_match_the_rule_and_transformers(original):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": original}
    ours = RotaryEmbedding(128, 500000.0, scaling).inv_freq
    expected = torch.tensor(brute_force_llama3_frequencies(128, 500000.0, scaling), dtype=torch.float32)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=0)
    bands = [(f == e0, f == e0 / 8) for f, e0 in zip(expected.tolist(), RotaryEmbedding(128, 500000.0).inv_freq)]
    assert any(kept for kept, _ in bands) and any(divided for _, divided in bands)
    assert any(not kept and not divided for kept, divided in bands)  # some interpolated
    hf = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_parameters={"rope_theta": 500000.0, **scaling})
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    assert torch.equal(ours, theirs)


def test_rope_scores_depend_only_on_relative_position():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, generator=gen), torch.randn(1, 1, 1, 16, generator=gen)
    rope = RotaryEmbedding(16, 10000.0)

    def score(pos_q, pos_k):
        cq, sq = rope(torch.tensor([pos_q]))
        ck, sk = rope(torch.tensor([pos_k]))
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum()

    for distance in range(6):
        torch.testing.assert_close(score(distance + 2, 2), score(distance + 100, 100), atol=1e-5, rtol=1e-5)
    by_distance = torch.stack([score(distance, 0) for distance in range(6)])
    assert by_distance.max() - by_distance.min() > 0.1  # the rotation is not a no-op


# ---------------------------------------------------------------------------------------------- module

def reference_attention_module(module: Attention, x: torch.Tensor, theta: float, window: int | None):
    """Projections by explicit matmuls, complex RoPE, brute-force attention, output projection."""
    B, T, _ = x.shape
    H, K, C = module.n_heads, module.n_kv_heads, module.head_dim

    def project(linear, heads):
        y = x @ linear.weight.T + (linear.bias if linear.bias is not None else 0)
        return y.view(B, T, heads, C).transpose(1, 2)

    positions = torch.arange(T)
    q = complex_rope(project(module.q_proj, H), positions, theta)
    k = complex_rope(project(module.k_proj, K), positions, theta)
    v = project(module.v_proj, K)
    y = brute_force_attention(q, k, v, window)  # (B, H, T, C)
    return y.transpose(1, 2).reshape(B, T, H * C) @ module.o_proj.weight.T


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("attn_bias", [False, True])
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("heads", list(HEADS))
def test_attention_module_matches_reference(heads, window, attn_bias, backend):
    n_heads, n_kv_heads = HEADS[heads]
    config = ModelConfig(vocab_size=32, d_model=32, n_layers=1, n_heads=n_heads, n_kv_heads=n_kv_heads,
                         ffn_dim=64, sliding_window=window, attn_bias=attn_bias, attention_backend=backend,
                         rope_theta=1000.0)
    torch.manual_seed(0)
    module = Attention(config, layer_idx=0)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 10, 32)
    cos, sin = RotaryEmbedding(config.head_dim, config.rope_theta)(torch.arange(10))
    with torch.no_grad():  # FlexAttention refuses inputs that require grad on CPU
        got = module(x, cos, sin)
        torch.testing.assert_close(got, reference_attention_module(module, x, 1000.0, window),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("qk_norm", ["head", "full"])
def test_qk_norm_matches_reference(qk_norm):
    """QK-norm by hand: RMS over each head's channels ('head', one weight of head_dim) or over all heads' channels
    of a token ('full', one weight per channel of the projection), then RoPE, then attention."""
    config = ModelConfig(vocab_size=32, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=6, ffn_dim=64,
                         qk_norm=qk_norm, norm_eps=1e-6, rope_theta=1000.0)
    torch.manual_seed(0)
    module = Attention(config, layer_idx=0)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    module = module.double()
    B, T, H, K, C = 2, 10, 4, 2, 6

    def rms(y, weight):
        return y / torch.sqrt((y * y).mean(-1, keepdim=True) + 1e-6) * weight

    q, k, v = x @ module.q_proj.weight.T, x @ module.k_proj.weight.T, x @ module.v_proj.weight.T
    if qk_norm == "full":
        q, k = rms(q, module.q_norm.weight), rms(k, module.k_norm.weight)
    q, k, v = (t.view(B, T, -1, C).transpose(1, 2) for t in (q, k, v))
    if qk_norm == "head":
        q, k = rms(q, module.q_norm.weight), rms(k, module.k_norm.weight)
    positions = torch.arange(T)
    q, k = complex_rope(q, positions, 1000.0), complex_rope(k, positions, 1000.0)
    expected = brute_force_attention(q, k, v, None).transpose(1, 2).reshape(B, T, H * C) @ module.o_proj.weight.T
    cos, sin = RotaryEmbedding(C, 1000.0)(positions)
    with torch.no_grad():
        torch.testing.assert_close(module(x, cos, sin), expected, atol=1e-6, rtol=1e-6)  # float32 angles
    assert module.q_norm.weight.shape == ((C,) if qk_norm == "head" else (H * C,))
    assert module.k_norm.weight.shape == ((C,) if qk_norm == "head" else (K * C,))


def test_attention_module_uses_layer_windows():
    config = ModelConfig(vocab_size=32, d_model=32, n_layers=3, n_heads=4, ffn_dim=64, sliding_window=8,
                         layer_windows=[None, 2, 5])
    assert [Attention(config, i).window for i in range(3)] == [None, 2, 5]
