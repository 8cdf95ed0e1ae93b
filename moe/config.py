"""The one model configuration: dense Llama-style and Mixtral-style MoE transformers.

A config with `n_experts == 0` is a dense model; anything else replaces the feed-forward block of every layer, or
of the layers its layer pattern names (every n-th, after the first k, Switch/GLaM, DeepSeek and Qwen2-MoE style),
with a sparse MoE layer. The config validates itself when built (a bad value raises a ConfigError, a ValueError
naming the field as `ModelConfig.<field>`; the checks are in `moe/config_validation.py`) and counts total and
active parameters analytically, so a 65B preset can be sized without allocating it. Presets live in
`moe/presets.py`.

Field metadata says what a field is for beyond the architecture: `runtime` fields say how the model runs or
trains, not what its weights are, so they may differ from the checkpoint a run is initialised from; `resumable`
fields may even change when a run resumes. `runtime_fields()` and `resumable_fields()` list them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from moe.config_validation import validate
from moe.errors import ConfigError

# How the model runs or trains, not its weights: may differ from the checkpoint of init_from.
RUNTIME = {"runtime": True}
# ... and changes nothing a resumed run computes, so it may change on resume too.
RESUMABLE = {"runtime": True, "resumable": True}


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
    """Hidden width of the dense SwiGLU feed-forward block, of every layer that is not MoE (HF: intermediate_size)."""
    max_seq_len: int = 2048
    """Longest sequence the model is meant to see (sizes the RoPE cache; informational for training)."""
    rope_theta: float = 10000.0
    """Base of the rotary position embedding frequencies."""
    rope_scaling: dict | None = None
    """Scaled RoPE: {rope_type: llama3, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings}
    (Llama 3.1's frequency bands, as transformers computes them); None = plain RoPE."""
    norm_type: str = "rmsnorm"
    """'rmsnorm', 'layernorm' (learnable weight and bias) or 'layernorm_nonparam' (OLMo: no parameters)."""
    norm_eps: float = 1e-5
    """Epsilon added to the variance inside every norm."""
    norm_position: str = "input"
    """Where a block normalises: 'input' (LLaMA's pre-norm: attention and feed-forward see normalised inputs) or
    'output' (OLMo 2's reordered norm: each sublayer's output is normalised before it joins the residual stream)."""
    attn_bias: bool = False
    """Bias on the query, key and value projections (Qwen2); the output projection never has one."""
    qk_norm: str | None = None
    """RMSNorm on queries and keys before RoPE: 'head' (one weight of head_dim shared by the heads; Qwen3, Qwen3-MoE),
    'full' (over all heads' channels together; OLMoE, OLMo 2 and 3) or None."""
    tie_embeddings: bool = False
    """Share the token embedding with the output layer."""
    sliding_window: int | None = None
    """Mistral-style attention window in tokens (a query sees itself and window - 1 earlier keys); None = full."""
    layer_windows: list[int | None] | None = None
    """Per-layer windows overriding sliding_window, one entry per layer (None entries attend fully)."""
    attention_backend: str = field(default="auto", metadata=RESUMABLE)
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
    shared_expert_gate: bool = False
    """Scale the shared experts' output by sigmoid of a learned per-token gate (Qwen2-MoE's shared_expert_gate)."""
    norm_topk_prob: bool = True
    """Renormalise the chosen top-k router probabilities to sum to one (Mixtral)."""
    aux_loss_coef: float = field(default=0.01, metadata=RUNTIME)
    """Weight of the load-balancing loss in the training objective."""
    z_loss_coef: float = field(default=0.001, metadata=RUNTIME)
    """Weight of the router z-loss in the training objective."""
    capacity_factor: float | None = field(default=None, metadata=RUNTIME)
    """Expert capacity as a multiple of the even share of assignments; None = dropless."""
    router_bias_update_rate: float | None = field(default=None, metadata=RUNTIME)
    """Aux-loss-free balancing (Wang et al. 2024): per-step change of each expert's selection bias; None/0: off."""
    expert_backend: str = field(default="auto", metadata=RESUMABLE)
    """'auto' (grouped on GPU, loop on CPU), 'loop' (reference), 'grouped' (torch grouped matmul) or 'megablocks'."""
    # Which layers are MoE: layer i is when i >= first_k_dense, (i + 1) % moe_every == 0 and i not in dense_layers.
    moe_every: int = 1
    """Every n-th layer is MoE: layers n-1, 2n-1, ... (Switch/GLaM every other layer; Qwen2-MoE decoder_sparse_step)."""
    first_k_dense: int = 0
    """The first k layers keep the dense SwiGLU; MoE layers start at layer k (DeepSeek first_k_dense_replace)."""
    dense_layers: list[int] = field(default_factory=list)
    """Indices (0-based) of further layers that keep the dense SwiGLU (Qwen2-MoE mlp_only_layers)."""

    extra: dict = field(default_factory=dict)
    """Free-form metadata (for example the HF config a model was imported from); not used by the model."""

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.n_heads > 0 and self.d_model % self.n_heads != 0:
                raise ConfigError(f"ModelConfig.d_model={self.d_model} is not divisible by ModelConfig.n_heads="
                                  f"{self.n_heads}; set ModelConfig.head_dim explicitly", "n_heads")
            self.head_dim = self.d_model // max(self.n_heads, 1)
        if self.is_moe and self.expert_ffn_dim is None:
            self.expert_ffn_dim = self.ffn_dim
        if self.layer_windows is not None:
            self.layer_windows = list(self.layer_windows)
        self.dense_layers = list(self.dense_layers)
        self.validate()

    def validate(self) -> None:
        """Raise a ConfigError (a ValueError) that names the first inconsistent field, so that a value the model
        cannot run with fails here rather than as a shape error inside the first forward pass."""
        validate(self)

    # ------------------------------------------------------------------ derived values
    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        """Whether block `layer` (0-based) has an MoE layer, rather than the dense SwiGLU of width ffn_dim."""
        return (self.is_moe and layer >= self.first_k_dense and (layer + 1) % self.moe_every == 0
                and layer not in self.dense_layers)

    def moe_layer_indices(self) -> tuple[int, ...]:
        """The blocks with an MoE layer, in order: ModelOutput.moe[j] comes from block moe_layer_indices()[j]."""
        return tuple(i for i in range(self.n_layers) if self.is_moe_layer(i))

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
        qk_norm = {None: 0, "head": 2 * self.head_dim, "full": (self.n_heads + self.n_kv_heads) * self.head_dim}
        return q + kv + out + bias + qk_norm[self.qk_norm]

    def expert_params(self) -> int:
        """Parameters of one routed expert (a SwiGLU of width expert_ffn_dim)."""
        return 3 * self.d_model * self.expert_ffn_dim

    def dense_ffn_params(self) -> int:
        """Parameters of the dense SwiGLU block of a layer that is not MoE."""
        return 3 * self.d_model * self.ffn_dim

    def moe_ffn_params(self, active: bool = False) -> int:
        """Parameters of one MoE layer; with active=True only those one token uses."""
        router = self.d_model * self.n_experts
        routed = (self.top_k if active else self.n_experts) * self.expert_params()
        shared = self.n_shared_experts * self.expert_params() + (self.d_model if self.shared_expert_gate else 0)
        return router + routed + shared

    def embedding_params(self) -> int:
        """Token embedding plus output layer (counted once when tied)."""
        return self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)

    def num_params(self, active: bool = False) -> int:
        """Total parameters, or with active=True those one token passes through (embeddings included)."""
        n_moe = len(self.moe_layer_indices())
        moe = n_moe * self.moe_ffn_params(active) if n_moe else 0  # a dense model has no expert_ffn_dim
        ffn = moe + (self.n_layers - n_moe) * self.dense_ffn_params()
        blocks = self.n_layers * (self.attention_params() + 2 * self._norm_params()) + ffn
        return self.embedding_params() + blocks + self._norm_params()

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


def runtime_fields() -> tuple[str, ...]:
    """ModelConfig fields that say how the model runs or trains, not what its weights are: a run initialised from
    a checkpoint (init_from) takes these from its own config and everything else from the checkpoint."""
    return tuple(f.name for f in dataclasses.fields(ModelConfig) if f.metadata.get("runtime"))


def resumable_fields() -> tuple[str, ...]:
    """ModelConfig fields a resumed run may change: they change nothing the run computes."""
    return tuple(f.name for f in dataclasses.fields(ModelConfig) if f.metadata.get("resumable"))


def format_count(n: int) -> str:
    """Human-readable parameter count: 6738415616 -> '6.74B'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.{max(0, 2 - int(math.log10(n / scale)))}f}{unit}"
    return str(n)
