"""Sparse Mixture-of-Experts feed-forward layer: router -> token dispatcher -> experts -> combine, and the auxiliary
losses, composed.

The dispatcher (moe/dispatch.py) is where expert parallelism enters: `LocalDispatcher` when every expert lives
in this process, `AllToAllDispatcher` when the training code (moe.train.parallel) has split them over processes.
The router, losses and statistics do not change with it.

Shared experts, when configured, see every token; Qwen2-MoE scales their output by a learned sigmoid gate.
Dropless by default (every token reaches all of its top-k experts, MegaBlocks-style). With a capacity factor,
each expert takes at most ceil(capacity_factor * N * k / E) assignments, first choices before second choices
and earlier tokens first (GShard / Switch priority); a dropped assignment contributes nothing, so a token whose
choices are all dropped passes through on the residual stream alone.
Shapes: B batch, T time, N = B*T tokens, D model dim, E experts, k experts per token.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from moe.config import ModelConfig
from moe.dispatch import LocalDispatcher, count_per_expert
from moe.experts import Experts
from moe.losses import expert_assignment_counts, global_assignment_fraction, load_balancing_loss, router_z_loss
from moe.mlp import SwiGLU
from moe.recompute import recomputing
from moe.router import TopKRouter


class MoEStats(NamedTuple):
    """What one MoE layer reports besides its output."""

    router_logits: torch.Tensor  # (N, E)
    load_balancing_loss: torch.Tensor  # scalar
    z_loss: torch.Tensor  # scalar
    tokens_per_expert: torch.Tensor  # (E,) assignments each expert processed (after any capacity drop)
    dropped: torch.Tensor  # scalar: assignments dropped by the capacity limit
    # This process's routing sums, from which a logger recombines the load-balancing loss of a larger batch
    # (micro-batches of an optimizer step, processes): see losses.load_balancing_loss_from_sums.
    assignment_counts: torch.Tensor | None = None  # (k, E) top-k choices per expert, before any capacity drop
    probability_sum: torch.Tensor | None = None  # (E,) float32 router probabilities summed over the N tokens
    rows_received: torch.Tensor | None = None  # scalar: assignments this process's experts ran (expert parallelism:
    # from every process of its group), whose spread over processes is the imbalance that runs one out of memory


def capacity_keep_mask(experts: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor:
    """(N, k) bool: which assignments fit within each expert's capacity, first choices taking priority."""
    choice_major = experts.T.reshape(-1)  # (k*N,) all first choices, then all second choices, ...
    one_hot = F.one_hot(choice_major, n_experts)  # (k*N, E)
    position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1) - 1  # rank of each assignment in its expert
    return (position < capacity).view(experts.shape[1], experts.shape[0]).T  # (N, k)


class MoELayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = config.n_experts, config.top_k
        self.capacity_factor = config.capacity_factor
        self.router = TopKRouter.from_config(config)
        self.experts = Experts(config.n_experts, config.d_model, config.expert_ffn_dim, config.expert_backend)
        shared_dim = config.n_shared_experts * config.expert_ffn_dim
        self.shared_experts = SwiGLU(config.d_model, shared_dim) if shared_dim else None
        # Qwen2-MoE: sigmoid(gate . x) scales each token's shared-expert output.
        self.shared_expert_gate = nn.Linear(config.d_model, 1, bias=False) if config.shared_expert_gate else None
        # Set by the training code (moe.train.parallel): the experts' dispatcher, and the data-parallel process
        # group over which training counts the load-balancing loss's assignment fractions (None: this batch's).
        self.dispatcher = LocalDispatcher(config.n_experts)
        self.count_group = None
        self._fraction: torch.Tensor | None = None  # the last training forward's, reused by its recomputation

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        B, T, D = x.shape
        tokens = x.reshape(-1, D)  # (N, D)
        routing = self.router(tokens)
        weights, experts = routing.weights, routing.experts  # (N, k)

        keep, tokens_per_expert = None, count_per_expert(experts.reshape(-1), self.n_experts)  # (E,)
        dropped = torch.zeros((), device=x.device, dtype=torch.long)
        if self.capacity_factor is not None:
            capacity = math.ceil(self.capacity_factor * tokens.shape[0] * self.top_k / self.n_experts)
            keep = capacity_keep_mask(experts, self.n_experts, capacity)  # (N, k)
            weights = torch.where(keep, weights, torch.zeros_like(weights))
            dropped = (~keep).sum()
            kept_or_overflow = torch.where(keep, experts, self.n_experts).reshape(-1)  # overflow bin E
            tokens_per_expert = count_per_expert(kept_or_overflow, self.n_experts + 1)[: self.n_experts]

        dispatched = self.dispatcher.dispatch(tokens, experts, keep)
        expert_out = self.experts(dispatched.rows, dispatched.counts)
        out = self.dispatcher.combine(expert_out, dispatched.state, weights)  # (N, D)
        if self.shared_experts is not None:
            shared = self.shared_experts(tokens)  # (N, D)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(tokens)) * shared
            out = out + shared

        assignment_counts = expert_assignment_counts(routing.experts, self.n_experts)  # (k, E), for loss and logs
        stats = MoEStats(
            router_logits=routing.logits,
            load_balancing_loss=load_balancing_loss(routing.probs, assignment_counts, self._training_fraction(
                assignment_counts, tokens.shape[0])),
            z_loss=router_z_loss(routing.logits),
            tokens_per_expert=tokens_per_expert.detach(),
            dropped=dropped,
            assignment_counts=assignment_counts,
            probability_sum=routing.probs.detach().sum(dim=0),
            rows_received=dispatched.counts.sum(),
        )
        return out.view(B, T, D), stats

    def _training_fraction(self, counts: torch.Tensor, n_tokens: int) -> torch.Tensor | None:
        """In training, the assignment fractions counted over `count_group` (losses.py explains why that gives the
        global batch's gradient): one all-reduce, not repeated when activation checkpointing recomputes the block.
        Evaluation keeps them local (None), so that one process may evaluate alone."""
        if not self.training or self.count_group is None:
            return None
        if not (recomputing() and self._fraction is not None):
            self._fraction = global_assignment_fraction(counts, n_tokens, self.count_group)
        return self._fraction
