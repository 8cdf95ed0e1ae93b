"""The one model configuration: dense Llama-style and Mixtral-style MoE transformers.

A config with `n_experts == 0` is a dense model; anything else replaces every feed-forward block with a
sparse MoE layer. The config validates itself when built (a bad value raises a ConfigError, a ValueError naming
the field) and counts total and active parameters analytically, so a 65B preset can be sized without allocating it.
Presets live in `moe/presets.py`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from moe.errors import ConfigError

NORM_TYPES = ("rmsnorm", "layernorm", "layernorm_nonparam")
ATTENTION_BACKENDS = ("auto", "sdpa", "flex", "eager")
EXPERT_BACKENDS = ("auto", "loop", "grouped", "megablocks")


@dataclass
class ModelConfig:
    """Architecture of a decoder-only transformer, dense or Mixture-of-Experts."""

    name: str = "custom"
    """Preset name or a free label; informational only."""
    vocab_size: int = 32000
    """Number of rows of the token embedding (and of the output layer)."""
    d_model: int = 4096
    """Width of the residual stream (HF: hidden_size)."""
    n_layers: int = 32
    """Number of transformer blocks."""
    n_heads: int = 32
    """Number of query heads."""
    n_kv_heads: int | None = None
    """Number of key/value heads: equal to n_heads for MHA, fewer for GQA, 1 for MQA. None means n_heads."""
    head_dim: int | None = None
    """Width of one attention head. None means d_model // n_heads."""
    ffn_dim: int = 11008
    """Hidden width of the dense SwiGLU feed-forward block (HF: intermediate_size)."""
    max_seq_len: int = 2048
    """Longest sequence the model is meant to see (sizes the RoPE cache; informational for training)."""
    rope_theta: float = 10000.0
    """Base of the rotary position embedding frequencies."""
    norm_type: str = "rmsnorm"
    """'rmsnorm', 'layernorm' (learnable weight and bias) or 'layernorm_nonparam' (OLMo: no parameters)."""
    norm_eps: float = 1e-5
    """Epsilon added to the variance inside every norm."""
    attn_bias: bool = False
    """Bias on the query, key and value projections (Qwen2); the output projection never has one."""
    tie_embeddings: bool = False
    """Share the token embedding with the output layer."""
    sliding_window: int | None = None
    """Mistral-style attention window in tokens (a query sees itself and window - 1 earlier keys); None = full."""
    layer_windows: list[int | None] | None = None
    """Per-layer windows overriding sliding_window, one entry per layer (None entries attend fully)."""
    attention_backend: str = "auto"
    """'auto' (FlexAttention/flash on GPU, SDPA on CPU), 'sdpa', 'flex' (no backward on CPU) or 'eager'."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of weights."""

    # Mixture of experts. n_experts == 0 means dense.
    n_experts: int = 0
    """Number of routed experts per MoE layer; 0 builds a dense model."""
    top_k: int = 2
    """Experts each token is routed to."""
    expert_ffn_dim: int | None = None
    """Hidden width of one expert's SwiGLU. None means ffn_dim."""
    n_shared_experts: int = 0
    """Experts every token passes through in addition to its routed ones (DeepSeekMoE-style)."""
    norm_topk_prob: bool = True
    """Renormalise the chosen top-k router probabilities to sum to one (Mixtral)."""
    aux_loss_coef: float = 0.01
    """Weight of the load-balancing loss in the training objective."""
    z_loss_coef: float = 0.001
    """Weight of the router z-loss in the training objective."""
    capacity_factor: float | None = None
    """Expert capacity as a multiple of the even share of assignments; None = dropless."""
    expert_backend: str = "auto"
    """'auto' (grouped on GPU, loop on CPU), 'loop' (reference), 'grouped' (torch grouped matmul) or 'megablocks'."""

    extra: dict = field(default_factory=dict)
    """Free-form metadata (for example the HF config a model was imported from); not used by the model."""

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.n_heads > 0 and self.d_model % self.n_heads != 0:
                raise ConfigError(
                    f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set head_dim explicitly",
                    "n_heads",
                )
            self.head_dim = self.d_model // max(self.n_heads, 1)
        if self.is_moe and self.expert_ffn_dim is None:
            self.expert_ffn_dim = self.ffn_dim
        if self.layer_windows is not None:
            self.layer_windows = list(self.layer_windows)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise a ConfigError (a ValueError) that names the first inconsistent field, so that a value the model
        cannot run with fails here rather than as a shape error inside the first forward pass."""
        positive = ["vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "max_seq_len"]
        if not self.is_moe or self.n_shared_experts == 0:
            positive.append("ffn_dim")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}", name)
        if self.head_dim % 2 != 0:
            derived = "" if self.head_dim != self.d_model // self.n_heads else \
                f" (d_model={self.d_model} // n_heads={self.n_heads})"
            raise ConfigError(f"head_dim={self.head_dim}{derived} must be even: rotary position embeddings rotate "
                              "pairs of channels", "head_dim")
        if self.n_heads % self.n_kv_heads != 0:
            raise ConfigError(f"n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}",
                              "n_kv_heads")
        if self.norm_type not in NORM_TYPES:
            raise ConfigError(f"norm_type={self.norm_type!r} is not one of {NORM_TYPES}", "norm_type")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"attention_backend={self.attention_backend!r} is not one of {ATTENTION_BACKENDS}",
                              "attention_backend")
        # Written so that NaN fails too: every comparison with NaN is False.
        if not 0 < self.rope_theta < math.inf:
            raise ConfigError(f"rope_theta must be a positive finite number, got {self.rope_theta}", "rope_theta")
        if not 0 <= self.norm_eps < math.inf:
            raise ConfigError(f"norm_eps must be a finite number >= 0, got {self.norm_eps}", "norm_eps")
        if not 0 <= self.init_std < math.inf:
            raise ConfigError(f"init_std must be a finite number >= 0, got {self.init_std}", "init_std")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window must be positive or None, got {self.sliding_window}", "sliding_window")
        if self.layer_windows is not None:
            if len(self.layer_windows) != self.n_layers:
                raise ConfigError(
                    f"layer_windows has {len(self.layer_windows)} entries but n_layers={self.n_layers}",
                    "layer_windows",
                )
            for i, window in enumerate(self.layer_windows):
                if window is not None and window <= 0:
                    raise ConfigError(f"layer_windows[{i}] must be positive or None, got {window}", "layer_windows")
        if self.n_experts < 0:
            raise ConfigError(f"n_experts must be >= 0, got {self.n_experts}", "n_experts")
        if self.is_moe:
            if not 1 <= self.top_k <= self.n_experts:
                raise ConfigError(f"top_k={self.top_k} must be between 1 and n_experts={self.n_experts}", "top_k")
            if self.expert_ffn_dim <= 0:
                raise ConfigError(f"expert_ffn_dim must be positive, got {self.expert_ffn_dim}", "expert_ffn_dim")
            if self.n_shared_experts < 0:
                raise ConfigError(f"n_shared_experts must be >= 0, got {self.n_shared_experts}", "n_shared_experts")
            if self.capacity_factor is not None and not 0 < self.capacity_factor < math.inf:
                raise ConfigError(f"capacity_factor must be a positive finite number or None, got "
                                  f"{self.capacity_factor}", "capacity_factor")
            if self.expert_backend not in EXPERT_BACKENDS:
                raise ConfigError(f"expert_backend={self.expert_backend!r} is not one of {EXPERT_BACKENDS}",
                                  "expert_backend")
            if self.expert_backend == "grouped":
                # torch's grouped matmul needs 16-byte aligned rows, i.e. widths divisible by 8 in bf16.
                for name in ("d_model", "expert_ffn_dim"):
                    if getattr(self, name) % 8 != 0:
                        raise ConfigError(
                            f"{name}={getattr(self, name)} must be a multiple of 8 for expert_backend='grouped' "
                            "(torch grouped matmul alignment); use expert_backend='loop' for odd sizes",
                            name,
                        )
        for name in ("aux_loss_coef", "z_loss_coef"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ConfigError(f"{name} must be a finite number >= 0, got {getattr(self, name)}", name)

    # ------------------------------------------------------------------ derived values
    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def window_for_layer(self, layer: int) -> int | None:
        """The attention window of one layer, or None for full causal attention."""
        if self.layer_windows is not None:
            return self.layer_windows[layer]
        return self.sliding_window

    def replace(self, **changes) -> ModelConfig:
        """A validated copy with some fields changed. A derived field that still holds its derived value
        (head_dim = d_model // n_heads, n_kv_heads = n_heads, expert_ffn_dim = ffn_dim) follows its sources;
        one set to something else explicitly is kept."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        derived = {
            "head_dim": (("d_model", "n_heads"), self.head_dim == self.d_model // self.n_heads),
            "n_kv_heads": (("n_heads",), self.n_kv_heads == self.n_heads),
            "expert_ffn_dim": (("ffn_dim", "n_experts"), self.expert_ffn_dim in (None, self.ffn_dim)),
        }
        for name, (sources, follows_sources) in derived.items():
            if name not in changes and follows_sources and any(s in changes for s in sources):
                values[name] = None
        values.update(changes)
        return ModelConfig(**values)

    # ------------------------------------------------------------------ parameter counts
    def _norm_params(self) -> int:
        return {"rmsnorm": self.d_model, "layernorm": 2 * self.d_model, "layernorm_nonparam": 0}[self.norm_type]

    def attention_params(self) -> int:
        q = self.d_model * self.n_heads * self.head_dim
        kv = 2 * self.d_model * self.n_kv_heads * self.head_dim
        out = self.n_heads * self.head_dim * self.d_model
        bias = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim if self.attn_bias else 0
        return q + kv + out + bias

    def expert_params(self) -> int:
        """Parameters of one routed expert (a SwiGLU of width expert_ffn_dim)."""
        return 3 * self.d_model * self.expert_ffn_dim

    def ffn_params(self, active: bool = False) -> int:
        """Parameters of one feed-forward block; with active=True only those one token uses."""
        if not self.is_moe:
            return 3 * self.d_model * self.ffn_dim
        router = self.d_model * self.n_experts
        routed = (self.top_k if active else self.n_experts) * self.expert_params()
        shared = self.n_shared_experts * self.expert_params()
        return router + routed + shared

    def embedding_params(self) -> int:
        """Token embedding plus output layer (counted once when tied)."""
        return self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)

    def num_params(self, active: bool = False) -> int:
        """Total parameters, or with active=True those one token passes through (embeddings included)."""
        block = self.attention_params() + self.ffn_params(active) + 2 * self._norm_params()
        return self.embedding_params() + self.n_layers * block + self._norm_params()

    def num_active_params(self) -> int:
        return self.num_params(active=True)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token, PaLM appendix B: 6 x active non-embedding weights (output layer
        included) + 12 x layers x heads x head_dim x sequence length for attention."""
        seq_len = seq_len or self.max_seq_len
        weights = self.num_active_params() - self.vocab_size * self.d_model
        if self.tie_embeddings:
            weights += self.vocab_size * self.d_model  # the tied output matmul is still done
        return 6 * weights + 12 * self.n_layers * self.n_heads * self.head_dim * seq_len


def format_count(n: int) -> str:
    """Human-readable parameter count: 6738415616 -> '6.74B'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.{max(0, 2 - int(math.log10(n / scale)))}f}{unit}"
    return str(n)
