"""Auxiliary MoE losses as pure functions of router logits.

- Load balancing (Switch Transformer, Fedus et al. 2021, eq. 4; Mixtral's form for top-k):
  E * sum_e f_e * P_e, with f_e the fraction of the N*k assignments made to expert e and P_e the mean router
  probability of expert e. Equals k for perfectly uniform routing (HF's normalisation). Computed per layer;
  for one layer it equals transformers' `load_balancing_loss_func`.
- Router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(logits)^2; keeps logits small.
Shapes: N tokens, E experts, k experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expert_assignment_fraction(experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(k, E) fraction of tokens sending their j-th choice to each expert, for indices of shape (N, k)."""
    one_hot = F.one_hot(experts, n_experts).float()  # (N, k, E)
    return one_hot.mean(dim=0)


def load_balancing_loss(router_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch/Mixtral load-balancing loss of one layer from its (N, E) router logits."""
    n_experts = router_logits.shape[-1]
    probs = router_logits.float().softmax(dim=-1)  # (N, E)
    experts = probs.topk(top_k, dim=-1).indices  # (N, k)
    fraction = expert_assignment_fraction(experts, n_experts)  # (k, E); no gradient flows through it
    return n_experts * (fraction * probs.mean(dim=0)).sum()


def router_z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss of one layer from its (N, E) router logits."""
    return torch.logsumexp(router_logits.float(), dim=-1).square().mean()
