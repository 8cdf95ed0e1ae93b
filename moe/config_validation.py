"""The checks a ModelConfig passes when it is built (moe/config.py): a value the model cannot run with fails here,
as a ConfigError naming the field (`ModelConfig.head_dim=7 must be even: ...`, with `field == "head_dim"`),
rather than as a shape error inside the first forward pass. The command line turns `ModelConfig.<field>` into
its flag.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from moe.errors import ConfigError

if TYPE_CHECKING:
    from moe.config import ModelConfig

NORM_TYPES = ("rmsnorm", "layernorm", "layernorm_nonparam")
NORM_POSITIONS = ("input", "output")
ATTENTION_BACKENDS = ("auto", "sdpa", "flex", "eager")
EXPERT_BACKENDS = ("auto", "loop", "grouped", "megablocks")
QK_NORMS = (None, "head", "full")
ROPE_TYPES = ("llama3",)
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _check(ok: bool, field: str, problem: str) -> None:
    """Raise unless ok. `problem` follows the field's name: `ModelConfig.<field><problem>`."""
    if not ok:
        raise ConfigError(f"ModelConfig.{field}{problem}", field)


def _check_finite(config: ModelConfig, name: str, low: float, strict: bool) -> None:
    # Written so that NaN fails too: every comparison with NaN is False.
    value = getattr(config, name)
    ok = (low < value if strict else low <= value) and value < math.inf
    bound = "a positive finite number" if strict and low == 0 else f"a finite number >= {low:g}"
    _check(ok, name, f"={value} must be {bound}")


def validate(config: ModelConfig) -> None:
    """Raise a ConfigError naming the first field of `config` the model cannot run with."""
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "max_seq_len"):
        _check(getattr(config, name) > 0, name, f"={getattr(config, name)} must be positive")
    if config.head_dim % 2 != 0:
        derived = "" if config.head_dim != config.d_model // config.n_heads else \
            f" (ModelConfig.d_model={config.d_model} // ModelConfig.n_heads={config.n_heads})"
        _check(False, "head_dim", f"={config.head_dim}{derived} must be even: rotary position embeddings rotate "
                                  "pairs of channels")
    if config.n_heads % config.n_kv_heads != 0:
        raise ConfigError(f"ModelConfig.n_heads={config.n_heads} must be divisible by ModelConfig.n_kv_heads="
                          f"{config.n_kv_heads}", "n_kv_heads")
    _check(config.norm_type in NORM_TYPES, "norm_type", f"={config.norm_type!r} is not one of {NORM_TYPES}")
    _check(config.norm_position in NORM_POSITIONS, "norm_position",
           f"={config.norm_position!r} is not one of {NORM_POSITIONS}")
    _check(config.attention_backend in ATTENTION_BACKENDS, "attention_backend",
           f"={config.attention_backend!r} is not one of {ATTENTION_BACKENDS}")
    _check_finite(config, "rope_theta", 0, strict=True)
    _check(config.qk_norm in QK_NORMS, "qk_norm", f"={config.qk_norm!r} is not one of {QK_NORMS}")
    if config.rope_scaling is not None:
        _validate_rope_scaling(config)
    _check_finite(config, "norm_eps", 0, strict=False)
    _check_finite(config, "init_std", 0, strict=False)
    _check(config.sliding_window is None or config.sliding_window > 0, "sliding_window",
           f"={config.sliding_window} must be positive or None")
    if config.layer_windows is not None:
        _check(len(config.layer_windows) == config.n_layers, "layer_windows",
               f" has {len(config.layer_windows)} entries but ModelConfig.n_layers={config.n_layers}")
        for i, window in enumerate(config.layer_windows):
            if window is not None and window <= 0:
                raise ConfigError(f"ModelConfig.layer_windows[{i}]={window} must be positive or None",
                                  "layer_windows")
    _check(config.n_experts >= 0, "n_experts", f"={config.n_experts} must be >= 0")
    if config.is_moe:
        _validate_moe(config)
    if not config.is_moe or config.n_shared_experts == 0 or len(config.moe_layer_indices()) < config.n_layers:
        _check(config.ffn_dim > 0, "ffn_dim", f"={config.ffn_dim} must be positive")
    for name in ("aux_loss_coef", "z_loss_coef"):
        _check_finite(config, name, 0, strict=False)
    if config.router_bias_update_rate is not None:
        _check_finite(config, "router_bias_update_rate", 0, strict=False)
        _check(config.is_moe or not config.router_bias_update_rate, "router_bias_update_rate",
               f"={config.router_bias_update_rate} balances the load of experts, but ModelConfig.n_experts=0 "
               "(a dense model): leave it unset")


def _validate_rope_scaling(config: ModelConfig) -> None:
    scaling = config.rope_scaling
    _check(isinstance(scaling, dict) and scaling.get("rope_type") in ROPE_TYPES, "rope_scaling",
           f"={scaling!r}: rope_type must be one of {ROPE_TYPES}")
    missing = [k for k in LLAMA3_ROPE_KEYS if k not in scaling]
    _check(not missing, "rope_scaling", f" (rope_type llama3) lacks {missing}")
    unknown = sorted(set(scaling) - {"rope_type", *LLAMA3_ROPE_KEYS})
    _check(not unknown, "rope_scaling", f" has unknown keys {unknown} (llama3 takes {list(LLAMA3_ROPE_KEYS)})")
    for key in LLAMA3_ROPE_KEYS:
        value = scaling[key]
        _check(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0,
               "rope_scaling", f"[{key!r}]={value!r} must be a positive number")
    _check(scaling["high_freq_factor"] > scaling["low_freq_factor"], "rope_scaling",
           f": high_freq_factor={scaling['high_freq_factor']} must exceed low_freq_factor={scaling['low_freq_factor']}")


def _validate_moe(config: ModelConfig) -> None:
    _check(1 <= config.top_k <= config.n_experts, "top_k",
           f"={config.top_k} must be between 1 and ModelConfig.n_experts={config.n_experts}")
    _check(config.expert_ffn_dim > 0, "expert_ffn_dim", f"={config.expert_ffn_dim} must be positive")
    _check(config.n_shared_experts >= 0, "n_shared_experts", f"={config.n_shared_experts} must be >= 0")
    _check(not config.shared_expert_gate or config.n_shared_experts > 0, "shared_expert_gate",
           "=True gates the shared experts, but ModelConfig.n_shared_experts=0")
    if config.capacity_factor is not None:
        _check_finite(config, "capacity_factor", 0, strict=True)
    _check(config.expert_backend in EXPERT_BACKENDS, "expert_backend",
           f"={config.expert_backend!r} is not one of {EXPERT_BACKENDS}")
    if config.expert_backend == "grouped":
        # torch's grouped matmul needs 16-byte aligned rows, i.e. widths divisible by 8 in bf16.
        for name in ("d_model", "expert_ffn_dim"):
            _check(getattr(config, name) % 8 == 0, name,
                   f"={getattr(config, name)} must be a multiple of 8 for ModelConfig.expert_backend='grouped' "
                   "(torch grouped matmul alignment); use expert_backend='loop' for odd sizes")
    _validate_layer_pattern(config)


def _validate_layer_pattern(config: ModelConfig) -> None:
    _check(config.moe_every >= 1, "moe_every", f"={config.moe_every} must be >= 1 (1: every layer is MoE)")
    _check(config.first_k_dense >= 0, "first_k_dense", f"={config.first_k_dense} must be >= 0")
    dense = config.dense_layers
    _check(all(0 <= i < config.n_layers for i in dense), "dense_layers",
           f"={dense} must hold layer indices 0 .. {config.n_layers - 1} (ModelConfig.n_layers={config.n_layers})")
    _check(len(set(dense)) == len(dense), "dense_layers", f"={dense} names a layer twice")
    if not config.moe_layer_indices():
        # Blame the setting that removed the last MoE layer: dense_layers only when it names any.
        field = "moe_every" if config.moe_every > config.n_layers else \
            "first_k_dense" if config.first_k_dense >= config.n_layers or not dense else "dense_layers"
        _check(False, field, f"={getattr(config, field)} leaves no MoE layer among the ModelConfig.n_layers="
                             f"{config.n_layers} (moe_every={config.moe_every}, first_k_dense="
                             f"{config.first_k_dense}, dense_layers={dense}); set n_experts=0 for a dense model")
