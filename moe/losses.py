"""Auxiliary MoE losses as pure functions of the router's decision: its probabilities and chosen experts for the
load-balancing loss, its logits for the z-loss. The choices are the router's own, not top-k recomputed here, so
the losses count what the layer did.

- Load balancing (Switch Transformer, Fedus et al. 2021, eq. 4; Mixtral's form for top-k):
  E * sum_e f_e * P_e, with f_e the fraction of the N*k assignments made to expert e and P_e the mean router
  probability of expert e. Equals k for perfectly uniform routing (HF's normalisation). Computed per layer;
  for one layer it equals transformers' `load_balancing_loss_func`.
- Router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(logits)^2; keeps logits small.

Data parallelism. The z-loss is a mean over tokens, so the mean of the per-process losses is the global one. The
load-balancing loss is not linear in the tokens: f_e must be counted over the global batch. During training the
MoE layer passes the data-parallel process group (set on it by the training code, moe.train.parallel), and
`global_assignment_fraction` sums the (k, E) assignment counts and the token count over it before forming f_e:
E*k+1 numbers per layer. P_e stays the local mean. Why that gives exactly the global loss's gradient: with R
processes of N tokens each and p_ne the router probability of expert e for token n,
    global loss      L   = E * sum_e f_e * (1 / RN) * sum_{all n} p_ne,   dL/dp_ne   = E * f_e / (RN)
    process r's loss L_r = E * sum_e f_e * (1 / N)  * sum_{n in r} p_ne,  dL_r/dp_ne = E * f_e / N
(f_e, the global fraction, carries no gradient). Data parallelism averages gradients over the R processes, giving
E * f_e / (RN) = dL/dp_ne; and the mean over processes of L_r is L itself.
The group is always explicit: nothing here issues a collective on the default group. The all-reduce is this
module's one collective; the layer skips it when activation checkpointing recomputes the block (moe/recompute.py).
Shapes: N tokens, E experts, k experts per token.
"""

from __future__ import annotations

import torch


def expert_assignment_counts(experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(k, E) float number of tokens sending their j-th choice to each expert, for indices of shape (N, k): a
    scatter into k*E bins (choice j of expert e is bin j*E + e), not an (N, k, E) one-hot."""
    k = experts.shape[-1]
    bins = (experts + n_experts * torch.arange(k, device=experts.device)).reshape(-1)  # (N*k,)
    counts = torch.zeros(k * n_experts, dtype=torch.float32, device=experts.device)
    return counts.index_add_(0, bins, torch.ones_like(bins, dtype=torch.float32)).view(k, n_experts)


def global_assignment_fraction(counts: torch.Tensor, n_tokens: int, group) -> torch.Tensor:
    """(k, E) fraction of the tokens of every process of `group` making each choice of each expert, from this
    process's (k, E) `counts` of its `n_tokens` tokens: one all-reduce. The token count travels with the counts,
    so processes with unequal batches still get the true fraction, and processes that share their tokens (tensor
    parallel replicas, if the group held them) scale both alike."""
    import torch.distributed as dist

    counts_and_n = torch.cat([counts.detach().flatten(), counts.new_tensor([n_tokens])])
    dist.all_reduce(counts_and_n, group=group)
    return (counts_and_n[:-1] / counts_and_n[-1]).view_as(counts)


def load_balancing_loss_from_sums(counts: torch.Tensor, probability_sum: torch.Tensor,
                                  n_tokens: torch.Tensor | float) -> torch.Tensor:
    """Load-balancing loss from (..., k, E) assignment counts and (..., E) summed router probabilities of the
    same `n_tokens` tokens (per leading index); what a logger uses to combine micro-batches and processes."""
    n_experts = probability_sum.shape[-1]
    n_tokens = torch.as_tensor(n_tokens, dtype=probability_sum.dtype, device=probability_sum.device)
    fraction = counts / n_tokens[..., None, None]  # (..., k, E)
    mean_probs = probability_sum / n_tokens[..., None]  # (..., E)
    return n_experts * (fraction * mean_probs[..., None, :]).sum(dim=(-2, -1))


def load_balancing_loss(probs: torch.Tensor, counts: torch.Tensor, fraction: torch.Tensor | None = None) -> torch.Tensor:
    """Switch/Mixtral load-balancing loss of one layer from its (N, E) float32 router probabilities (the gradient
    flows through them) and the (k, E) counts of the experts chosen (`expert_assignment_counts`). `fraction`, the
    (k, E) assignment fractions of a larger batch (`global_assignment_fraction`), replaces counts / N."""
    n_tokens, n_experts = probs.shape
    if fraction is None:
        fraction = counts / n_tokens
    return n_experts * (fraction * probs.mean(dim=0)).sum()


def router_z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss of one layer from its (N, E) router logits."""
    return torch.logsumexp(router_logits.float(), dim=-1).square().mean()
