"""Activation memory of one training micro-batch: the bytes the forward pass saves for the backward pass.

Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", section 4.1) count
s*b*h*(34 + 5*a*s/h) bytes per GPT layer with 16-bit activations (s sequence, b micro-batch, h width, a heads).
This file counts the same thing for this project's blocks, tensor by tensor, adapted as follows:
- no dropout (Korthikanti's 1-byte masks are gone);
- attention through SDPA / flash (FlexAttention on GPU): the kernel saves q, k, v, its output and a float32
  log-sum-exp per head and token, never the T x T scores, so their 5*a*s/h term is gone; with GQA, k and v have
  n_kv_heads heads; the output projection reads the kernel's output (flash writes it token-major, so the
  transpose back is a view, not a copy);
- SwiGLU instead of a GELU MLP: gate output, its SiLU, up output, and their product (4 x ffn_dim per token);
- RMSNorm saves its input, the normalised value before the weight and a float32 rstd; every matmul saves its input
  (with OLMo 2's norms on the sublayers' outputs, the projections read the residual stream and the norms a
  sublayer's output: the same tensors' sizes, in the dtypes below);
- MoE layers: the router's logits and probabilities (float32), then per token its top_k routed rows (the gathered
  inputs, the expert outputs and the weighted rows: 3 x top_k x d_model) and the SwiGLU's 4 x top_k x expert_ffn_dim
  for its top_k experts, as if routing were balanced; shared experts as a SwiGLU of n_shared x expert_ffn_dim;
- the output layer saves no logits: the chunked cross-entropy (moe/linear_cross_entropy.py) computes the gradients
  in the forward pass and keeps the hidden states' gradient and a float32 vocabulary x d_model weight gradient;
- dtypes: '32-true' keeps everything in float32. 'bf16-mixed' (autocast) keeps the residual stream and the norms
  in float32, and every matmul casts its input to bf16 separately (q, k and v each hold a bf16 copy of the normed
  input) and saves a bf16 copy of its weight (counted by memory.py, not here). 'bf16-true' (and DeepSpeed, which
  casts the model to bf16) saves bf16 everywhere except the float32 copy RMSNorm makes of its input;
- tensor parallelism splits attention's heads and the dense SwiGLU's width over tp (Megatron without sequence
  parallelism: norms and the residual stream stay whole); MoE layers are replicated over tp.
tests/test_plan.py checks the count against the bytes actually saved for backward (saved-tensor hooks) on tiny
dense, MoE, shared-expert, interleaved, LayerNorm, QK-norm and output-norm models, in all three dtype regimes (within
0.5%; most exact), and what the forward pass leaves alive against torch.profiler's memory events, with and without checkpointing.
With activation checkpointing of every block, each block keeps only its input (the residual stream) and the
backward pass recomputes one block at a time: checkpoints + the largest block + the output layer.
The peak adds to what is kept the chunked loss's float32 logits buffer and its temporaries at the end of the
forward pass (2 x chunk rows x vocabulary x 4 bytes; about 2 GiB on a GPU for a 32,000-token vocabulary).
Not counted: gradients of activations in the backward pass (a block's worth at a time) and kernel workspaces.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe.config import ModelConfig
from moe.linear_cross_entropy import GPU_CHUNK_ELEMENTS

REGIMES = ("fp32", "mixed", "bf16")  # 32-true, bf16-mixed under autocast, bf16 weights (bf16-true, DeepSpeed)


@dataclass
class ActivationEstimate:
    """Bytes saved for backward, as per-token rates and a part that does not grow with the batch."""

    layers_per_token: list[float]
    """Each block's bytes per token."""
    checkpoint_per_token: float
    """Bytes per token one checkpointed block keeps (its input)."""
    output_per_token: float
    """Final norm and the loss."""
    fixed: float
    """Bytes independent of the batch: the loss's float32 weight gradient, RoPE tables, expert counts."""
    vocab_size: int
    loss_chunk_rows: int
    """Rows of the chunked loss's float32 logits buffer, alive at the end of the forward pass only."""

    def kept(self, tokens: int, checkpointing: bool = False) -> float:
        """What the forward pass leaves for the backward pass."""
        layers = len(self.layers_per_token) * self.checkpoint_per_token if checkpointing else sum(self.layers_per_token)
        return tokens * (layers + self.output_per_token) + self.fixed

    def loss_buffer(self, tokens: int) -> float:
        """The loss's logits buffer and, about as large, its temporaries (moe/linear_cross_entropy.py)."""
        return 2 * min(tokens, self.loss_chunk_rows) * self.vocab_size * 4

    def total(self, tokens: int, checkpointing: bool = False) -> float:
        """The peak: everything kept plus the loss's buffer at the end of the forward pass, or, checkpointed, plus
        the block the backward pass recomputes if that is larger."""
        extra = self.loss_buffer(tokens)
        if checkpointing:
            extra = max(extra, tokens * max(self.layers_per_token))
        return self.kept(tokens, checkpointing) + extra


def _norm_bytes(config: ModelConfig, regime: str, consumers: int, of_matmul: bool = False) -> float:
    """Per token: what a norm saves, plus the matmul inputs its `consumers` projections save. of_matmul: the norm
    reads a dense sublayer's output (norm_position 'output'), bf16 under autocast where the residual stream is float32
    (an MoE layer's output is float32 already); the projections then read the stream itself, with the same bytes."""
    d = config.d_model
    if config.norm_type == "rmsnorm":
        normed = 2 * d if regime == "bf16" or (regime == "mixed" and of_matmul) else 4 * d  # in its input's dtype
        saved = 4 * d + normed + 4  # input (as float32), normed, rstd
    else:  # LayerNorm saves its input, mean and rstd; the affine output is the matmuls' input
        saved = {"fp32": 4 * d, "mixed": 4 * d, "bf16": 2 * d}[regime] + 8
    if consumers:
        # Under autocast each projection casts the (float32) normed input itself; otherwise they share one tensor.
        saved += consumers * 2 * d if regime == "mixed" else (4 if regime == "fp32" else 2) * d
    return saved


def activation_bytes(config: ModelConfig, seq_len: int, regime: str, tp: int = 1,
                     loss_chunk_elements: int = GPU_CHUNK_ELEMENTS) -> ActivationEstimate:
    """What training saves for backward, per token and fixed, for sequences of seq_len tokens; the loss's chunk
    size is the GPU's unless given (CPU_CHUNK_ELEMENTS on a CPU)."""
    if regime not in REGIMES:
        raise ValueError(f"unknown activation regime {regime!r}; one of {REGIMES}")
    a = 4 if regime == "fp32" else 2  # bytes of a matmul's output
    d, h, kv, c = config.d_model, config.n_heads, config.n_kv_heads, config.head_dim
    of_matmul = config.norm_position == "output"
    attention = _norm_bytes(config, regime, 3, of_matmul) + a * (2 * h * c + 2 * kv * c) / tp + 4 * h / tp
    if config.qk_norm is not None:
        # Each q/k RMSNorm saves a float32 copy of its input, its normed output (for the weight's product) and
        # one rstd per row: per head for 'head', per token for 'full'.
        rows = (h + kv) / tp if config.qk_norm == "head" else 2
        attention += (h + kv) * c / tp * (4 + a) + 4 * rows
    layers = []
    for i in range(config.n_layers):
        if config.is_moe_layer(i):
            e, k, f = config.n_experts, config.top_k, config.expert_ffn_dim
            shared = config.n_shared_experts * f
            consumers = 1 + (2 if shared else 0) + (1 if config.shared_expert_gate else 0)
            routed = a * (4 * k * f + 3 * k * d)
            router = 4 * 2 * e + 4 * (2 * k + 2) + 8 * 3 * k  # logits, probs; weights, sums; indices and order
            # An MoE layer's output is float32 under autocast (the combine sums in float32): its norm reads that.
            ffn = _norm_bytes(config, regime, consumers) + routed + router + a * 4 * shared
            if config.shared_expert_gate:
                ffn += a * (d + 1)  # the gate's sigmoid and the shared output it scales
        else:
            ffn = _norm_bytes(config, regime, 2, of_matmul) + a * 4 * config.ffn_dim / tp
        layers.append(attention + ffn)
    output = _norm_bytes(config, regime, 0) + a * d + 8  # final norm, the hidden states' gradient, token ids
    fixed = config.vocab_size * d * 4  # the loss's float32 weight gradient, held from forward to backward
    rope = 2 * seq_len * c * 4
    # cos/sin: one float32 pair for the model; in bf16 each rotation of q and k saves its own bf16 cast.
    fixed += rope if regime == "fp32" else config.n_layers * rope
    n_moe = len(config.moe_layer_indices())
    if n_moe:
        fixed += n_moe * (8 * config.n_experts + 4 * config.top_k * config.n_experts)
    checkpoint = (2 if regime == "bf16" else 4) * d  # the residual stream entering a block
    chunk_rows = max(1, loss_chunk_elements // config.vocab_size)
    return ActivationEstimate(layers, checkpoint, output, fixed, config.vocab_size, chunk_rows)
