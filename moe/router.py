"""Top-k token router for sparse MoE layers (Shazeer et al. 2017; Mixtral, Jiang et al. 2024).

Softmax over all experts in float32, keep the k largest, and (Mixtral) renormalise the kept k to sum to one.
Shapes: N tokens, D model dim, E experts, k experts per token.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class Routing(NamedTuple):
    """The router's decision, computed once: the layer combines with it and the losses and statistics read it,
    so that they agree with the experts actually chosen (whatever the router adds to its scores)."""

    logits: torch.Tensor  # (N, E) raw router logits, for the z-loss
    weights: torch.Tensor  # (N, k) combine weights of the chosen experts, in the input dtype
    experts: torch.Tensor  # (N, k) indices of the chosen experts
    probs: torch.Tensor  # (N, E) float32 softmax over all experts, for the load-balancing loss


class TopKRouter(nn.Module):
    def __init__(self, d_model: int, n_experts: int, top_k: int, normalize: bool = True):
        super().__init__()
        self.top_k, self.normalize = top_k, normalize
        self.gate = nn.Linear(d_model, n_experts, bias=False)  # HF Mixtral's name

    def forward(self, x: torch.Tensor) -> Routing:
        logits = self.gate(x)  # (N, E)
        probs = logits.softmax(dim=-1, dtype=torch.float32)
        weights, experts = probs.topk(self.top_k, dim=-1)  # (N, k)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(logits, weights.to(x.dtype), experts, probs)
