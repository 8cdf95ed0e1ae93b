"""Named model presets reproducing published architectures.

Each preset overrides a base config and cites the source it mirrors: the HF `config.json` of the released
checkpoint, or the paper table where the release predates HF. `tests/test_presets.py` checks every preset's
parameter count against the published figure and against HF transformers' own model built on the meta device.

configs/model/<name>.yaml are generated from PRESETS by `python -m moe.preset_configs configs/model`
(moe/preset_configs.py); `tests/test_configs.py` fails when they are out of date.
"""

from __future__ import annotations

from moe.config import ModelConfig

# The LLaMA-1 / Llama-2 architecture; other presets start from it.
_LLAMA = dict(vocab_size=32000, norm_eps=1e-6, rope_theta=10000.0)
# OLMo 2 (Team OLMo 2024): norms on the sublayers' outputs, QK-norm over all heads, RoPE base 500000, the dolma2
# tokenizer's vocabulary padded to 100352, untied; OLMo 3 keeps the shapes and windows three layers of four.
_OLMO2 = dict(vocab_size=100352, norm_eps=1e-6, rope_theta=500000.0, max_seq_len=4096, qk_norm="full",
              norm_position="output")


def _olmo3_windows(n_layers: int) -> list[int | None]:
    """OLMo 3: a 4096-token window on three layers, then one full-attention layer, repeated."""
    return [None if (i + 1) % 4 == 0 else 4096 for i in range(n_layers)]


PRESETS: dict[str, dict] = {
    # LLaMA-1, Touvron et al. 2023, Table 2 (6.7B, 13.0B, 32.5B, 65.2B); eps from the released params.json.
    "llama-7b": dict(_LLAMA, d_model=4096, n_layers=32, n_heads=32, ffn_dim=11008),
    "llama-13b": dict(_LLAMA, d_model=5120, n_layers=40, n_heads=40, ffn_dim=13824),
    "llama-33b": dict(_LLAMA, d_model=6656, n_layers=60, n_heads=52, ffn_dim=17920),
    "llama-65b": dict(_LLAMA, d_model=8192, n_layers=80, n_heads=64, ffn_dim=22016, norm_eps=1e-5),
    # meta-llama/Llama-2-7b-hf config.json
    "llama-2-7b": dict(_LLAMA, d_model=4096, n_layers=32, n_heads=32, ffn_dim=11008, norm_eps=1e-5,
                       max_seq_len=4096),
    # mistralai/Mistral-7B-v0.1 config.json
    "mistral-7b": dict(_LLAMA, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                       norm_eps=1e-5, max_seq_len=32768, sliding_window=4096),
    # mistralai/Mixtral-8x7B-v0.1 config.json
    "mixtral-8x7b": dict(_LLAMA, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                         norm_eps=1e-5, max_seq_len=32768, rope_theta=1e6, n_experts=8, top_k=2,
                         aux_loss_coef=0.02),
    # Qwen/Qwen2-0.5B config.json
    "qwen2-0.5b": dict(vocab_size=151936, d_model=896, n_layers=24, n_heads=14, n_kv_heads=2, ffn_dim=4864,
                       norm_eps=1e-6, rope_theta=1e6, attn_bias=True, tie_embeddings=True, max_seq_len=32768),
    # allenai/OLMo-1B-hf config.json: non-parametric LayerNorm, tied embeddings, vocabulary padded to 50304.
    "olmo-1b": dict(vocab_size=50304, d_model=2048, n_layers=16, n_heads=16, ffn_dim=8192,
                    norm_type="layernorm_nonparam", tie_embeddings=True, max_seq_len=2048),
    # HuggingFaceTB/SmolLM-135M, -360M, -1.7B config.json
    "smollm-135m": dict(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
                        tie_embeddings=True, max_seq_len=2048),
    "smollm-360m": dict(vocab_size=49152, d_model=960, n_layers=32, n_heads=15, n_kv_heads=5, ffn_dim=2560,
                        tie_embeddings=True, max_seq_len=2048),
    "smollm-1.7b": dict(vocab_size=49152, d_model=2048, n_layers=24, n_heads=32, n_kv_heads=32, ffn_dim=8192,
                        tie_embeddings=True, max_seq_len=2048),
    # meta-llama/Llama-3.1-8B config.json: Llama 3's scaled RoPE (rope_type llama3), 128K context.
    "llama-3.1-8b": dict(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                         norm_eps=1e-5, rope_theta=500000.0, max_seq_len=131072,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # allenai/OLMoE-1B-7B-0924 config.json: 64 experts of width 1024, top-8 not renormalised, QK-norm over all
    # heads; OLMoE's router z-loss 0.001 (Muennighoff et al. 2024) is our default.
    "olmoe-1b-7b": dict(vocab_size=50304, d_model=2048, n_layers=16, n_heads=16, ffn_dim=1024, norm_eps=1e-5,
                        max_seq_len=4096, qk_norm="full", n_experts=64, top_k=8, expert_ffn_dim=1024,
                        norm_topk_prob=False, aux_loss_coef=0.01),
    # Qwen/Qwen1.5-MoE-A2.7B config.json: 60 experts of width 1408, top-4 not renormalised, one shared expert of
    # width 5632 (4 x 1408) behind a sigmoid gate, q/k/v bias.
    "qwen1.5-moe-a2.7b": dict(vocab_size=151936, d_model=2048, n_layers=24, n_heads=16, ffn_dim=5632, norm_eps=1e-6,
                              rope_theta=1e6, max_seq_len=8192, attn_bias=True, n_experts=60, top_k=4,
                              expert_ffn_dim=1408, n_shared_experts=4, shared_expert_gate=True, norm_topk_prob=False,
                              aux_loss_coef=0.001),
    # Qwen/Qwen3-0.6B config.json: per-head QK-norm, head_dim 128 on a 1024-wide stream, tied embeddings.
    "qwen3-0.6b": dict(vocab_size=151936, d_model=1024, n_layers=28, n_heads=16, n_kv_heads=8, head_dim=128,
                       ffn_dim=3072, norm_eps=1e-6, rope_theta=1e6, max_seq_len=40960, qk_norm="head",
                       tie_embeddings=True),
    # Qwen/Qwen3-30B-A3B config.json: 128 experts of width 768, top-8 renormalised, per-head QK-norm, head_dim
    # 128 with 32 query and 4 key/value heads on a 2048-wide stream.
    "qwen3-30b-a3b": dict(vocab_size=151936, d_model=2048, n_layers=48, n_heads=32, n_kv_heads=4, head_dim=128,
                          ffn_dim=6144, norm_eps=1e-6, rope_theta=1e6, max_seq_len=40960, qk_norm="head",
                          n_experts=128, top_k=8, expert_ffn_dim=768, aux_loss_coef=0.001),
    # allenai/OLMo-2-0425-1B, OLMo-2-1124-7B, OLMo-2-1124-13B and OLMo-2-0325-32B config.json.
    "olmo-2-1b": dict(_OLMO2, d_model=2048, n_layers=16, n_heads=16, ffn_dim=8192),
    "olmo-2-7b": dict(_OLMO2, d_model=4096, n_layers=32, n_heads=32, ffn_dim=11008),
    "olmo-2-13b": dict(_OLMO2, d_model=5120, n_layers=40, n_heads=40, ffn_dim=13824),
    "olmo-2-32b": dict(_OLMO2, d_model=5120, n_layers=64, n_heads=40, n_kv_heads=8, ffn_dim=27648),
    # allenai/Olmo-3-1025-7B and Olmo-3-1125-32B config.json: OLMo 2's shapes, windowed, and the tokenizer's own
    # 100278 rows; the 8192-token context of pre-training (the releases' YaRN extension of their full-attention
    # layers to 65K is not supported).
    "olmo-3-7b": dict(_OLMO2, vocab_size=100278, d_model=4096, n_layers=32, n_heads=32, ffn_dim=11008,
                      max_seq_len=8192, layer_windows=_olmo3_windows(32)),
    "olmo-3-32b": dict(_OLMO2, vocab_size=100278, d_model=5120, n_layers=64, n_heads=40, n_kv_heads=8,
                       ffn_dim=27648, max_seq_len=8192, layer_windows=_olmo3_windows(64)),
    # Tiny models for tests and CPU demos.
    "tiny-dense": dict(vocab_size=4096, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=352,
                       max_seq_len=256),
    "tiny-moe": dict(vocab_size=4096, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=256,
                     max_seq_len=256, n_experts=8, top_k=2),
    # Families above, tiny: their structure (QK-norm, shared expert, layer pattern, top-k rule, OLMo's norm
    # placement and windows) at test size.
    "tiny-olmoe": dict(vocab_size=4096, d_model=128, n_layers=4, n_heads=4, ffn_dim=128, max_seq_len=256,
                       qk_norm="full", n_experts=16, top_k=4, expert_ffn_dim=128, norm_topk_prob=False),
    "tiny-qwen2-moe": dict(vocab_size=4096, d_model=128, n_layers=4, n_heads=4, ffn_dim=256, max_seq_len=256,
                           attn_bias=True, n_experts=8, top_k=2, expert_ffn_dim=64, n_shared_experts=2,
                           shared_expert_gate=True, norm_topk_prob=False, dense_layers=[0]),
    "tiny-olmo3": dict(vocab_size=4096, d_model=128, n_layers=4, n_heads=4, ffn_dim=352, max_seq_len=256,
                       qk_norm="full", norm_position="output", layer_windows=[64, 64, 64, None]),
    "tiny-qwen3-moe": dict(vocab_size=4096, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=48,
                           ffn_dim=256, max_seq_len=256, qk_norm="head", n_experts=16, top_k=4, expert_ffn_dim=64),
}

# Figures as the cited source writes them (total, and active for MoE), for the preset tests. Kept as text
# because the number of digits matters: "13.0B" claims a tenth of a billion, "135M" a million.
PUBLISHED_PARAMS: dict[str, tuple[str, str | None]] = {
    "llama-7b": ("6.7B", None),  # LLaMA paper, Table 2
    "llama-13b": ("13.0B", None),
    "llama-33b": ("32.5B", None),
    "llama-65b": ("65.2B", None),
    "llama-2-7b": ("6.74B", None),  # HF model card
    "mistral-7b": ("7.24B", None),  # HF model card
    "mixtral-8x7b": ("46.7B", "12.9B"),  # Mistral AI release note: 46.7B total, 12.9B used per token
    "qwen2-0.5b": ("0.49B", None),  # Qwen2 model card
    "olmo-1b": ("1.18B", None),  # HF model card
    "smollm-135m": ("135M", None),  # SmolLM model cards
    "smollm-360m": ("362M", None),  # HF's safetensors metadata (the name rounds to 360M)
    "smollm-1.7b": ("1.7B", None),
    "llama-3.1-8b": ("8.03B", None),  # HF's safetensors metadata (the name rounds to 8B)
    "olmoe-1b-7b": ("6.9B", "1.3B"),  # OLMoE paper and model card: 6.9B total, 1.3B active
    "qwen1.5-moe-a2.7b": ("14.3B", "2.7B"),  # Qwen1.5-MoE release: 14.3B parameters, 2.7B activated
    "qwen3-30b-a3b": ("30.5B", "3.3B"),  # Qwen3-30B-A3B model card: 30.5B in total, 3.3B activated
    "qwen3-0.6b": ("0.6B", None),  # Qwen3-0.6B model card: 0.6B, 0.44B non-embedding
    "olmo-2-1b": ("1.48B", None),  # HF's safetensors metadata (the name rounds to 1B)
    "olmo-2-7b": ("7.3B", None),  # HF's safetensors metadata
    "olmo-2-13b": ("13.7B", None),
    "olmo-2-32b": ("32.2B", None),
    "olmo-3-7b": ("7.298B", None),  # HF's safetensors metadata: 7,298,011,136
    "olmo-3-32b": ("32.23B", None),  # 32,233,522,176
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str, **overrides) -> ModelConfig:
    """Build the named preset's config, with optional field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(preset_names())}")
    return ModelConfig(name=name, **{**PRESETS[name], **overrides})
