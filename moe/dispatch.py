"""Token dispatchers: how an MoE layer's assignments reach the experts and how the experts' outputs come back.

A dispatcher takes the router's choices and returns the assignments grouped by expert (rows of local expert 0,
then local expert 1, ...) with the number of rows per local expert, the layout the expert kernels want; after
the experts ran, `combine` returns each token's output, the gate-weighted sum over its k choices.

- `LocalDispatcher`: every expert lives in this process (one device, DDP, FSDP, tensor parallelism). A stable
  sort of the N*k assignments by expert and a gather of the token rows; no host synchronisation.
- `AllToAllDispatcher`: expert parallelism. The E experts are split over the P processes of an expert-parallel
  group, E/P consecutive experts each (process r holds experts r*E/P .. (r+1)*E/P - 1). Each process sorts its
  assignments by expert, which groups them by destination process too; the per-expert counts are exchanged with
  one all_to_all_single, then the token rows with the autograd-aware all_to_all_single and uneven splits. What
  arrives is ordered by source process, then expert; it is permuted to expert-major for the grouped matmul and
  back before the combine's all-to-all, which returns every output to the process of its token.
  The split sizes of the row exchange must be Python ints: reading them is this path's one host synchronisation
  (`_splits`), after the count exchange and before the row exchange.

Capacity. With a capacity factor the layer passes `keep` (N, k), which assignments fit (moe_layer.capacity_keep_mask,
first choices first, earlier tokens first). The local dispatcher computes dropped assignments anyway, with weight
zero, so that no shape depends on the routing; the all-to-all one leaves them out of the exchange.
Shapes: N tokens, k choices per token, D model dim, E experts, P expert-parallel processes, M rows for the experts.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd

from moe.experts import as_autocast


def count_per_expert(indices: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Histogram of expert indices. torch.bincount reads the maximum back to the host on CUDA; a scatter-add
    into a fixed number of bins does not, keeping the layer free of host-device synchronisation."""
    counts = torch.zeros(n_bins, dtype=torch.long, device=indices.device)
    return counts.scatter_add_(0, indices, torch.ones_like(indices))


def weighted_sum(per_assignment: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(N*k, D) outputs in assignment (token-major) order and (N, k) gate weights -> (N, D)."""
    n_tokens, top_k = weights.shape
    return (per_assignment.view(n_tokens, top_k, per_assignment.shape[-1]) * weights.unsqueeze(-1)).sum(dim=1)


def _exchange(rows: torch.Tensor, recv_splits: list[int], send_splits: list[int],
              group: dist.ProcessGroup) -> torch.Tensor:
    """All-to-all of rows with uneven splits, differentiable (its backward is the reverse exchange); the functional
    collective, which torch.compile can trace, unlike torch.distributed.nn's."""
    # An AsyncCollectiveTensor: the first operation that reads it waits for the exchange.
    return all_to_all_single_autograd(rows.contiguous(), recv_splits, send_splits, group)


class Dispatched(NamedTuple):
    rows: torch.Tensor  # (M, D) assignments grouped by local expert
    counts: torch.Tensor  # (E_local,) rows per local expert
    state: tuple  # what `combine` needs to put the outputs back


class LocalDispatcher:
    """All experts in this process: sort, gather, run, scatter back."""

    def __init__(self, n_experts: int):
        self.n_experts = n_experts

    def dispatch(self, tokens: torch.Tensor, experts: torch.Tensor, keep: torch.Tensor | None = None) -> Dispatched:
        top_k = experts.shape[1]
        flat = experts.reshape(-1)  # (N*k,)
        order = flat.argsort(stable=True)  # the stable sort keeps token order within each expert
        return Dispatched(tokens[order // top_k], count_per_expert(flat, self.n_experts), (order,))

    def combine(self, expert_out: torch.Tensor, state: tuple, weights: torch.Tensor) -> torch.Tensor:
        (order,) = state
        grad = torch.is_grad_enabled() and (expert_out.requires_grad or weights.requires_grad)
        # index_add_ adds in row order on the CPU, in any order on GPUs: exact either way for k <= 2 only.
        if not grad and (weights.shape[1] <= 2 or expert_out.device.type == "cpu"):
            return _add_weighted_rows(expert_out, order, weights)
        # Grouped row i is assignment order[i]: scatter back to assignment (token-major) order.
        per_assignment = torch.zeros_like(expert_out).index_copy(0, order, expert_out)
        return weighted_sum(per_assignment, weights)


def _add_weighted_rows(expert_out: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """combine without autograd: each grouped row times its weight, added straight into its token's output (one
    pass over the rows instead of a scatter, a product and a sum). The same products; the k of a token are added
    in expert order rather than choice order, which for k <= 2 is the same sum bit for bit (a + b = b + a) and
    otherwise differs in the last bits."""
    n_tokens, top_k = weights.shape
    scaled = expert_out * weights.reshape(-1)[order, None]  # (M, D) grouped row i times its weight
    return scaled.new_zeros(n_tokens, scaled.shape[1]).index_add_(0, order // top_k, scaled)


class AllToAllDispatcher:
    """Experts split over the processes of `group` (expert parallelism); see the module docstring."""

    def __init__(self, n_experts: int, group: dist.ProcessGroup):
        self.group = group
        self.n_procs = dist.get_world_size(group)
        if n_experts % self.n_procs:
            raise ValueError(f"{n_experts} experts cannot be split over {self.n_procs} expert-parallel processes")
        self.n_experts, self.n_local = n_experts, n_experts // self.n_procs

    def _splits(self, send_counts: torch.Tensor) -> tuple[torch.Tensor, list[int], list[int]]:
        """Exchange the (E,) counts of the rows this process sends to each expert for the (P, E_local) counts it
        receives from each process for its own experts, and read the row split sizes on the host."""
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)  # P equal chunks of E_local counts
        recv_counts = recv_counts.view(self.n_procs, self.n_local)
        both = torch.stack([send_counts.view(self.n_procs, self.n_local).sum(1), recv_counts.sum(1)])
        send_splits, recv_splits = both.tolist()  # the host synchronisation of expert parallelism
        return recv_counts, send_splits, recv_splits

    def dispatch(self, tokens: torch.Tensor, experts: torch.Tensor, keep: torch.Tensor | None = None) -> Dispatched:
        top_k = experts.shape[1]
        flat = experts.reshape(-1)  # (N*k,)
        if keep is not None:  # dropped assignments go to bin E: sorted last, never sent
            flat = torch.where(keep.reshape(-1), flat, self.n_experts)
        order = flat.argsort(stable=True)  # expert order, hence destination-process order
        send_counts = count_per_expert(flat, self.n_experts + 1)[: self.n_experts]
        recv_counts, send_splits, recv_splits = self._splits(send_counts)
        sent = order[: sum(send_splits)]
        # Under autocast the rows travel in its dtype (half the bytes of float32): the experts would cast them anyway.
        (rows,) = as_autocast(tokens[sent // top_k])
        received = _exchange(rows, recv_splits, send_splits, self.group)
        # Rows arrive source-major (process 0's rows for my expert 0, its rows for expert 1, ..., then process 1's);
        # the grouped matmul wants them expert-major. Label each row with its (source, expert) chunk and sort by
        # (expert, source): stable, so each source's rows keep their order.
        chunk = torch.arange(self.n_procs * self.n_local, device=tokens.device)
        chunk_of_row = chunk.repeat_interleave(recv_counts.reshape(-1), output_size=received.shape[0])
        source, expert = chunk_of_row // self.n_local, chunk_of_row % self.n_local
        to_expert_major = (expert * self.n_procs + source).argsort(stable=True)
        state = (sent, to_expert_major, send_splits, recv_splits, flat.shape[0])
        return Dispatched(received[to_expert_major], recv_counts.sum(0), state)

    def combine(self, expert_out: torch.Tensor, state: tuple, weights: torch.Tensor) -> torch.Tensor:
        sent, to_expert_major, send_splits, recv_splits, n_assignments = state
        source_major = torch.zeros_like(expert_out).index_copy(0, to_expert_major, expert_out)
        returned = _exchange(source_major, send_splits, recv_splits, self.group)
        # Dropped assignments stay zero (their weight is zero too).
        per_assignment = expert_out.new_zeros(n_assignments, expert_out.shape[1]).index_copy(0, sent, returned)
        return weighted_sum(per_assignment, weights)
