"""Decoder-only transformer, dense (LLaMA, Touvron et al. 2023) or sparse MoE (Mixtral, Jiang et al. 2024).

Blocks of attention and a feed-forward network, pre-norm (or OLMo 2's norms on the sublayers' outputs), the latter a
SwiGLU or a MoE layer as the config's layer pattern says (ModelConfig.is_moe_layer); module names follow HF's
Llama/Mistral/Mixtral (and OLMo 2's) so that checkpoint conversion is renaming. An optional key/value cache
(moe/kv_cache.py) lets a forward pass append tokens to the ones already seen, for decoding.
Shapes: B batch, T time, D model dim, V vocabulary, L MoE layers, E experts.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moe.attention import Attention
from moe.config import ModelConfig
from moe.kv_cache import KVCache, LayerKVCache
from moe.linear_cross_entropy import linear_cross_entropy
from moe.mlp import SwiGLU
from moe.moe_layer import MoELayer, MoEStats
from moe.norm import build_norm
from moe.rope import RotaryEmbedding
from moe.router import TopKRouter
from moe.unpadded import Unpadded


@dataclass
class ModelOutput:
    """What a forward pass returns. `moe` holds one MoEStats per MoE layer, in layer order, and nothing for dense
    layers: moe[j] comes from block config.moe_layer_indices()[j], so len(moe) is the number of MoE layers, not
    n_layers, and the stacked properties below have one row per MoE layer."""

    # (B, T, V), or (N, V) at the positions selected by forward's logits_at; None when forward got labels
    logits: torch.Tensor | None
    moe: list[MoEStats] = field(default_factory=list)  # one entry per MoE layer; empty for dense models
    loss: torch.Tensor | None = None  # float32 mean next-token cross-entropy, when forward got labels

    @property
    def aux_loss(self) -> torch.Tensor | None:
        """Load-balancing loss averaged over MoE layers (each layer's loss is computed on its own routing). In training
        under torch.distributed, each layer's assignment fractions are those of all data-parallel processes and its
        mean probabilities this process's (moe/losses.py): the mean over processes is the global batch's loss."""
        return torch.stack([s.load_balancing_loss for s in self.moe]).mean() if self.moe else None

    @property
    def z_loss(self) -> torch.Tensor | None:
        return torch.stack([s.z_loss for s in self.moe]).mean() if self.moe else None

    @property
    def tokens_per_expert(self) -> torch.Tensor | None:
        """(L, E) assignments processed by each expert of each MoE layer."""
        return torch.stack([s.tokens_per_expert for s in self.moe]) if self.moe else None

    @property
    def router_logits(self) -> tuple[torch.Tensor, ...]:
        return tuple(s.router_logits for s in self.moe)


class Block(nn.Module):
    """Attention then a feed-forward network (SwiGLU or MoE), each added to the residual stream. Where the norms sit
    follows config.norm_position, with HF's module names in both layouts: 'input' (LLaMA) normalises what enters
    each sublayer (input_layernorm, then post_attention_layernorm before the feed-forward); 'output' (OLMo 2's
    reordered norm) normalises what each sublayer returns (post_attention_layernorm, post_feedforward_layernorm)."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.norm_output = config.norm_position == "output"

        def norm():
            return build_norm(config.norm_type, config.d_model, config.norm_eps)

        self.input_layernorm = None if self.norm_output else norm()
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = norm()
        self.mlp = MoELayer(config) if config.is_moe_layer(layer_idx) else SwiGLU(config.d_model, config.ffn_dim)
        self.post_feedforward_layernorm = norm() if self.norm_output else None

    def forward(self, x, cos, sin, cache: LayerKVCache | None = None, positions: torch.Tensor | None = None,
                unpadded: Unpadded | None = None,
                keep: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEStats | None]:
        """x (B, T, D), or (1, N, D) holding only the real tokens of `unpadded`'s (B, T) batch. keep, a boolean
        mask over x's first two dimensions: the feed-forward runs there only, and the output is (1, N', D) for
        its N' True entries (every token still attended, and was written to the cache)."""
        if self.norm_output:
            x = x + self.post_attention_layernorm(self.self_attn(x, cos, sin, cache, positions, unpadded))
            x = x if keep is None else x[keep][None]  # (1, N', D)
            out, stats = self._feed_forward(x)
            return x + self.post_feedforward_layernorm(out), stats
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, positions, unpadded)
        x = x if keep is None else x[keep][None]  # (1, N', D)
        out, stats = self._feed_forward(self.post_attention_layernorm(x))
        return x + out, stats

    def _feed_forward(self, h: torch.Tensor) -> tuple[torch.Tensor, MoEStats | None]:
        if isinstance(self.mlp, MoELayer):
            return self.mlp(h)
        return self.mlp(h), None


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = build_norm(config.norm_type, config.d_model, config.norm_eps)
        # Tied models reuse the embedding matrix in forward() instead of sharing a Parameter between two
        # modules, which to_empty() after meta-device construction would silently untie.
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; the projections that write into the residual stream are scaled by
        1/sqrt(2L) (GPT-2, Radford et al. 2019) so the stream's variance does not grow with depth. Not with norms on
        the sublayers' outputs (OLMo 2, which initialises every matrix alike): a norm after the projection undoes
        any scale, which would only change the projection's effective learning rate."""
        std = self.config.init_std
        scaled = self.config.norm_position == "input"
        residual_std = std / math.sqrt(2 * self.config.n_layers) if scaled else std
        for name, param in self.named_parameters():
            if param.is_meta:
                continue
            if name.endswith("bias"):
                nn.init.zeros_(param)
            elif "layernorm" in name or name.startswith("norm.") or name.endswith(("q_norm.weight", "k_norm.weight")):
                nn.init.ones_(param)
            elif name.endswith(("o_proj.weight", "down_proj.weight", "down_proj")):
                nn.init.normal_(param, 0.0, residual_std)
            else:
                nn.init.normal_(param, 0.0, std)
        for module in self.modules():
            if isinstance(module, TopKRouter):
                module.reset_parameters()  # a selection bias starts at zero
        if not self.rotary.inv_freq.is_meta:
            self.rotary.reset_parameters()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, logits_at: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, lengths: torch.Tensor | None = None,
                trim_last_block: bool = False) -> ModelOutput:
        """input_ids (B, T) -> logits (B, T, V) and the MoE layers' statistics.

        positions (T,) default to 0 .. T - 1, or with a cache to the T positions after the cached tokens.
        With a cache the T tokens are appended to it and attend to everything cached before them.
        logits_at, a boolean (B, T) mask, computes logits only there: (N, V) for its N True entries in row-major
        order. Scoring needs a few positions per sequence, and the output layer is a large share of a small
        model's work.
        labels (B, T), the target token at each position (-100 for none), gives the mean cross-entropy as
        `loss` instead of logits: computed a chunk of positions at a time (moe/linear_cross_entropy.py), so training
        never holds the B x T x V logits.
        lengths (B,), for right-padded input_ids whose row b holds lengths[b] real tokens: everything but attention
        runs on the real tokens only (moe/unpadded.py), so the MoE layers' statistics count those alone and the
        logits at padding mean nothing; logits_at must not select padding. Scoring pads a quarter of its tokens.
        trim_last_block, with logits_at: the last block's feed-forward runs only at logits_at's positions too, the
        only ones whose output is read (so the last MoE layer's statistics count those alone). Scoring reads about
        a third of its tokens."""
        B, T = input_ids.shape
        if cache is not None:
            cache.check_room(T)
            if positions is None:
                positions = cache.next_positions(T, input_ids.device)
        elif positions is None:
            positions = torch.arange(T, device=input_ids.device)
        cos, sin = self.rotary(positions)  # (T, C)
        unpadded = None if lengths is None else Unpadded.from_lengths(lengths, B, T)
        if unpadded is not None:
            input_ids = unpadded.pack(input_ids)[None]  # (1, N): the blocks see one row of real tokens
        x = self.embed_tokens(input_ids)  # (B, T, D)
        if unpadded is not None and logits_at is not None:
            selected = unpadded.pack(logits_at)  # (N,) in row-major order, as logits_at's True entries
            if bool(selected.sum() != logits_at.sum()):  # one host sync
                raise ValueError("logits_at selects padding (positions past a row's lengths)")
            logits_at = selected[None]  # (1, N_real), a mask over x's first two dimensions
        keep = logits_at if trim_last_block else None
        moe_stats = []
        for i, block in enumerate(self.layers):
            if cache is None and unpadded is None and keep is None:
                x, stats = block(x, cos, sin)
            else:
                x, stats = block(x, cos, sin, None if cache is None else cache.layers[i], positions, unpadded,
                                 keep if i == len(self.layers) - 1 else None)
            if stats is not None:
                moe_stats.append(stats)
        if keep is not None:
            x = x[0]  # (N, D): the last block ran at logits_at's positions only
        elif logits_at is not None:
            x = x[logits_at]  # (N, D)
        elif unpadded is not None:
            x = unpadded.unpack(x[0])  # (B, T, D), zero at padding
        x = self.norm(x)
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        if labels is None:
            return ModelOutput(logits=F.linear(x, head), moe=moe_stats)
        if logits_at is not None:
            raise ValueError("labels and logits_at cannot be combined")
        return ModelOutput(logits=None, moe=moe_stats, loss=linear_cross_entropy(x, head, labels))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_model(config: ModelConfig | str, device: torch.device | str | None = None, **overrides) -> Transformer:
    """A model from a config or a preset name (with optional config overrides), e.g. build_model('tiny-moe')."""
    if isinstance(config, str):
        from moe.presets import get_preset

        config = get_preset(config, **overrides)
    elif overrides:
        config = config.replace(**overrides)
    with torch.device(device) if device is not None else nullcontext():
        return Transformer(config)

