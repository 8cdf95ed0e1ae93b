"""Run by test_expert_parallel.py as one of WORLD_SIZE CPU processes (gloo); the test sets the torch.distributed
environment. Each process checks itself against the single-process oracle, which it computes too (the models are
tiny), and raises on any difference; argv[1] names the checks to run (comma-separated, see CHECKS).

- layouts: for each (expert-data-parallel, expert-parallel, tensor-parallel) layout of the world, a tiny MoE model
  (one of them with activation checkpointing, one with an auxiliary-loss-free selection bias)
  parallelized as training does (moe.train.parallel.parallelize on the strategy's mesh); its loss and every full
  gradient after one step, and its gradient norm and full weights after 3 clipped AdamW steps, equal one process
  fitting the same global batch.
- dispatch: the all-to-all dispatcher against the local one on hand-made routing in which some expert receives no
  row on some process (and, with 4 processes, one process receives no row at all), forward and gradients.
- capacity: with a capacity factor, the expert-parallel run (assignments dropped before the exchange) equals plain
  FSDP2 at the same data-parallel size (each process's capacity counted over its own tokens, as without EP).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
import warnings

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from moe import get_preset
from moe.dispatch import AllToAllDispatcher, LocalDispatcher
from moe.experts import Experts
from moe.model import Transformer
from moe.train.clipping import clip_gradients
from moe.train.expert_bias import bias_update, selection_routers
from moe.train.optim import build_optimizer
from moe.train.parallel import parallelize, total_norm
from moe.train.strategies import expert_parallel_mesh

CONFIG = get_preset("tiny-moe", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16,
                    ffn_dim=32, n_experts=4, top_k=2, n_shared_experts=1)
ROWS_PER_PROCESS, SEQ = 2, 16
STEPS = 3
CLIP = 0.3  # below the gradient norms of these steps: clipping binds
TOL = dict(rtol=1e-5, atol=1e-6)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def objective(model: Transformer, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The training loss and the (L, E) expert loads of the batch."""
    out = model(ids[:, :-1], labels=ids[:, 1:])
    loads = torch.stack([s.assignment_counts.sum(dim=0) for s in out.moe]).double()
    return out.loss + CONFIG.aux_loss_coef * out.aux_loss + CONFIG.z_loss_coef * out.z_loss, loads


def global_batches(dp: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, CONFIG.vocab_size, (dp * ROWS_PER_PROCESS, SEQ + 1), generator=g) for _ in range(STEPS)]


def train(model: Transformer, batches: list[torch.Tensor], group=None) -> tuple[list[float], list[dict], list[float]]:
    """(losses, full gradients, gradient norms) of each of the steps: loss, backward, norm, clip at CLIP, AdamW,
    and with a selection bias its update from the loads summed over `group` (as ExpertBiasUpdate sums them)."""
    optimizer = build_optimizer(model, "AdamW", 1e-2, 0.1, (0.9, 0.95), 1e-4)
    losses, grads, norms = [], [], []
    for ids in batches:
        loss, loads = objective(model, ids)
        loss.backward()
        if model.config.router_bias_update_rate:
            if group is not None:
                dist.all_reduce(loads, group=group)
            for router, change in zip(selection_routers(model), bias_update(loads, model.config.router_bias_update_rate)):
                router.expert_bias.add_(change.float())
        norm = float(total_norm([p.grad for p in model.parameters() if p.grad is not None]))
        grads.append({name: full(p.grad).clone() for name, p in model.named_parameters()})
        clip_gradients(None, optimizer, CLIP, None, norm)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
        norms.append(norm)
    return losses, grads, norms


def check_layout(edp: int, ep: int, tp: int, activation_checkpointing: bool = False, selection_bias: bool = False,
                 capacity_factor: float | None = None, compile: bool = False) -> None:
    world, rank = dist.get_world_size(), dist.get_rank()
    config = dataclasses.replace(CONFIG, capacity_factor=capacity_factor,
                                 router_bias_update_rate=0.05 if selection_bias else None)
    torch.manual_seed(0)
    reference = Transformer(config)
    model = copy.deepcopy(reference)
    mesh = expert_parallel_mesh("cpu", edp * ep, ep, tp)
    parallelize(model, mesh, activation_checkpointing=activation_checkpointing, compile=compile)
    dp_mesh = mesh["data_parallel"]
    dp, dp_rank = dp_mesh.size(), dp_mesh.get_local_rank()
    assert dp * tp == world
    batches = global_batches(dp)
    mine = [b[dp_rank * ROWS_PER_PROCESS:(dp_rank + 1) * ROWS_PER_PROCESS] for b in batches]
    losses, grads, norms = train(model, mine, dp_mesh.get_group())
    # The oracle: one process, the global batch, for capacity the same mesh without expert parallelism.
    if capacity_factor is None:
        expected_losses, expected_grads, expected_norms = train(reference, batches)
    else:
        parallelize(reference, expert_parallel_mesh("cpu", edp * ep, 1, tp))
        expected_losses, expected_grads, expected_norms = train(reference, mine, dp_mesh.get_group())
        dropped = sum(int(s.dropped) for s in model(mine[0][:, :-1]).moe)
        assert dropped > 0, "no assignment was dropped: the capacity check checks nothing"
    name = (f"layout edp={edp} ep={ep} tp={tp} ac={activation_checkpointing} bias={selection_bias} "
            f"capacity={capacity_factor} rank={rank}")
    for step in range(STEPS):
        loss = losses[step].clone()
        dist.all_reduce(loss, group=dp_mesh.get_group())  # each data-parallel process's loss is its part's
        expected = expected_losses[step].clone()
        if capacity_factor is not None:  # the oracle's processes too hold a part each
            dist.all_reduce(expected, group=dp_mesh.get_group())
            expected /= dp
        torch.testing.assert_close(loss / dp, expected, **TOL, msg=f"{name} step {step} loss")
        for pname, grad in grads[step].items():
            torch.testing.assert_close(grad, expected_grads[step][pname], **TOL, msg=f"{name} step {step} {pname}")
        assert abs(norms[step] - expected_norms[step]) <= 1e-5 * expected_norms[step], (name, norms, expected_norms)
    assert min(norms) > CLIP, f"clipping did not bind: {norms}"
    for pname, p in model.named_parameters():
        expected = dict(reference.named_parameters())[pname]
        torch.testing.assert_close(full(p.detach()), full(expected.detach()), **TOL, msg=f"{name} weight {pname}")
    for router, expected in zip(selection_routers(model), selection_routers(reference), strict=True):
        assert router.expert_bias.abs().max() > 0, "the bias never moved"
        torch.testing.assert_close(router.expert_bias, expected.expert_bias, rtol=0, atol=0, msg=f"{name} bias")
    expert_weight = model.layers[0].mlp.experts.gate_proj
    assert expert_weight.to_local().shape[0] * ep * edp >= CONFIG.n_experts  # split, not replicated
    print(f"ok {name}", flush=True)


def check_dispatch() -> None:
    """Hand-made routing: every token of every process chooses experts 0 and 1 or 1 and 2; expert 3 gets no row
    anywhere (so with 4 processes, process 3 receives none at all), expert 2 only from process 0."""
    world, rank = dist.get_world_size(), dist.get_rank()
    n_experts, d_model, per_process = 4, 8, 5
    g = torch.Generator().manual_seed(2)
    tokens = torch.randn(world * per_process, d_model, generator=g)
    choices = torch.tensor([[0, 1], [1, 0]] * (world * per_process // 2 + 1))[: world * per_process]
    choices[:per_process:2] = torch.tensor([2, 1])  # process 0's even tokens: expert 2 first
    weights = torch.rand(world * per_process, 2, generator=g)
    torch.manual_seed(3)
    experts = Experts(n_experts, d_model, 16, backend="loop")
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)

    def run(dispatcher, expert_module, x, chosen, w):
        d = dispatcher.dispatch(x, chosen)
        return dispatcher.combine(expert_module(d.rows, d.counts), d.state, w)

    x_ref = tokens.clone().requires_grad_()
    reference = run(LocalDispatcher(n_experts), experts, x_ref, choices, weights)
    reference.square().sum().backward()

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("expert_parallel",))
    split = copy.deepcopy(experts)
    for pname, p in list(split.named_parameters()):
        split.register_parameter(pname, torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])))
    mine = slice(rank * per_process, (rank + 1) * per_process)
    x = tokens[mine].clone().requires_grad_()
    out = run(AllToAllDispatcher(n_experts, mesh.get_group()), split, x, choices[mine], weights[mine])
    out.square().sum().backward()
    torch.testing.assert_close(out, reference[mine], **TOL)
    torch.testing.assert_close(x.grad, x_ref.grad[mine], **TOL)
    for pname, p in split.named_parameters():  # each process's experts: the gradient of every process's tokens
        local = p.grad.to_local()
        rows = slice(rank * local.shape[0], (rank + 1) * local.shape[0])
        torch.testing.assert_close(local, getattr(experts, pname).grad[rows], **TOL, msg=pname)
    # bf16-mixed's CPU twin: rows travel in bf16, and the result is the local dispatcher's under the same autocast.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = run(LocalDispatcher(n_experts), experts, tokens, choices, weights)
        out = run(AllToAllDispatcher(n_experts, mesh.get_group()), split, tokens[mine], choices[mine], weights[mine])
    assert out.dtype == reference.dtype
    torch.testing.assert_close(out, reference[mine], rtol=0, atol=0)
    print(f"ok dispatch rank={rank}", flush=True)


# (edp, ep, tp, activation checkpointing, selection bias)
LAYOUTS = {2: [(1, 2, 1)], 4: [(1, 4, 1, False, True), (2, 2, 1, True), (1, 2, 2)]}
CHECKS = {"dispatch": lambda: check_dispatch(),
          "layouts": lambda: [check_layout(*layout) for layout in LAYOUTS[dist.get_world_size()]],
          "capacity": lambda: check_layout(1, dist.get_world_size(), 1, capacity_factor=1.0),
          "compile": lambda: check_layout(1, dist.get_world_size(), 1, compile=True)}


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    try:
        for check in sys.argv[1].split(","):
            CHECKS[check]()
    finally:
        dist.destroy_process_group()
