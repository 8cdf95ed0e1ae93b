"""Top-k token router for sparse MoE layers (Shazeer et al. 2017; Mixtral, Jiang et al. 2024).

Softmax over all experts in float32, keep the k largest, and (Mixtral) renormalise the kept k to sum to one.
With a selection bias (auxiliary-loss-free load balancing: Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing
Strategy for Mixture-of-Experts"; DeepSeek-V3), the k experts are those with the largest probability plus a
per-expert bias, while the combine weights stay the unbiased probabilities of the chosen experts: the bias decides
only where a token goes, never how much an expert's output counts. moe/train/expert_bias.py moves the bias
between optimizer steps, away from the busiest experts; no gradient reaches it, so it is a buffer.
Shapes: N tokens, D model dim, E experts, k experts per token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

if TYPE_CHECKING:
    from moe.config import ModelConfig

SELECTION_BIAS = ".router.expert_bias"  # how the state-dict names of the selection biases end, in a Transformer


class Routing(NamedTuple):
    """The router's decision, computed once: the layer combines with it and the losses and statistics read it,
    so that they agree with the experts actually chosen (whatever the router adds to its scores)."""

    logits: torch.Tensor  # (N, E) raw router logits, for the z-loss
    weights: torch.Tensor  # (N, k) combine weights of the chosen experts, in the input dtype
    experts: torch.Tensor  # (N, k) indices of the chosen experts
    probs: torch.Tensor  # (N, E) float32 softmax over all experts, for the load-balancing loss


class TopKRouter(nn.Module):
    def __init__(self, d_model: int, n_experts: int, top_k: int, normalize: bool = True,
                 selection_bias: bool = False):
        super().__init__()
        self.top_k, self.normalize = top_k, normalize
        self.gate = nn.Linear(d_model, n_experts, bias=False)  # HF Mixtral's name
        # Persistent: the routing of a trained model depends on it. None (no state-dict entry) when off, so that
        # models without it keep their checkpoint and HF layouts.
        bias = torch.zeros(n_experts, dtype=torch.float32) if selection_bias else None
        self.register_buffer("expert_bias", bias)  # (E,)

    @classmethod
    def from_config(cls, config: ModelConfig) -> TopKRouter:
        return cls(config.d_model, config.n_experts, config.top_k, config.norm_topk_prob,
                   selection_bias=bool(config.router_bias_update_rate))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Zero the selection bias, which meta-device construction followed by to_empty leaves uninitialised (the
        gate initialises itself)."""
        if self.expert_bias is not None and not self.expert_bias.is_meta:
            self.expert_bias.zero_()

    def forward(self, x: torch.Tensor) -> Routing:
        logits = self.gate(x)  # (N, E)
        probs = logits.softmax(dim=-1, dtype=torch.float32)
        if self.expert_bias is None:
            weights, experts = probs.topk(self.top_k, dim=-1)  # (N, k)
        else:
            experts = (probs + self.expert_bias.float()).topk(self.top_k, dim=-1).indices  # (N, k)
            weights = probs.gather(-1, experts)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(logits, weights.to(x.dtype), experts, probs)
