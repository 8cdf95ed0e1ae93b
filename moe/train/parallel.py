"""How a built model is prepared for training, in one place (`parallelize`): tensor parallelism (Megatron-LM,
Shoeybi et al. 2019), activation checkpointing, torch.compile and FSDP2, applied from outside the model.

Lightning's ModelParallelStrategy builds a 2-D device mesh ("data_parallel", "tensor_parallel") and hands it to
`LanguageModel.configure_model`, which calls `parallelize` on the freshly built model (with no mesh under the other
strategies). The order follows torchtitan's: tensor parallelism inside each block, then activation checkpointing,
then compile of each block, then FSDP2 (`fully_shard`) over the data-parallel dimension, per block and at the root.

Tensor parallelism (when the mesh's "tensor_parallel" size tp > 1), per block:
- attention: q/k/v projections column-parallel (each process holds H / tp query and K / tp key/value heads, so
  attention itself needs no communication; moe/attention.py reads its head counts from the projected width),
  o_proj row-parallel (one all-reduce of the block's attention output).
- dense SwiGLU: gate/up column-parallel, down row-parallel (one all-reduce).
- everything else (embedding, norms, output layer) is replicated over the tensor-parallel group; the residual
  stream between blocks is the full, replicated hidden state. The column-parallel inputs all-reduce their
  gradient in the backward pass, so replicated parameters get the same, complete gradient on every process
  of a tensor-parallel group.

How experts are placed without expert parallelism: MoE layers are not tensor-parallel. The router, the routed
experts and any shared experts are replicated over the tensor-parallel group: they see the full, replicated
hidden state, every process of the group routes the same tokens to the same experts and computes the same
output, and no communication is added. Their stacked (E, F, D) weights are sharded by FSDP2 over the
data-parallel dimension only (dim 0, the expert dimension, as for any FSDP2 parameter), gathered before the
block's forward and its backward.

Expert parallelism (the mesh has an "expert_parallel" dimension of size P > 1; strategies.ModelParallelStrategy
builds it): each MoE layer's routed experts are split by expert over the P processes of an expert-parallel group
(DTensors, Shard(0) on "expert_parallel"; process r of the group holds experts r*E/P .. (r+1)*E/P - 1 whole) and
its dispatcher becomes the all-to-all one (moe/dispatch.py). FSDP2 then shards each process's E/P experts over
"expert_data_parallel", the DP / P processes that hold the same experts, and everything else (router, shared
experts, attention, embeddings) over all DP processes of "data_parallel", as without EP. Gradients: an expert's
gradient on process r sums, through the all-to-all's backward, the gradients of the losses of all P processes of
its group; FSDP2's reduce-scatter then sums over "expert_data_parallel" and divides by that dimension's size,
DP / P, by default, which would make expert gradients P times too large. The divide factor of the experts is set
to DP, the data-parallel size, so every gradient is the mean over the global batch as for the other weights.
Tensor parallelism composes as above: experts are replicated over "tensor_parallel", and each tensor-parallel
rank exchanges its (identical) tokens with its own expert-parallel group.

Every MoE layer counts its load-balancing loss's assignment fractions over its data-parallel processes during
training (moe/losses.py): `parallelize` gives it a process group of its own for that (`set_count_groups`; all
processes under DDP, FSDP and DeepSpeed).

Every process must build the same initial weights (the CLI seeds every process alike, seed_everything):
FSDP2 shards each process's own copy without broadcasting it.
Shapes: H query heads, K key/value heads, E experts, F expert hidden dim, D model dim.
"""

from __future__ import annotations

import contextlib

import torch
import torch.utils.checkpoint
from torch.distributed.device_mesh import DeviceMesh

from moe.config import ModelConfig
from moe.dispatch import AllToAllDispatcher
from moe.errors import InputError
from moe.mlp import SwiGLU
from moe.model import Transformer
from moe.moe_layer import MoELayer
from moe.recompute import recomputation

_get_total_norm = torch.nn.utils.get_total_norm
TP_FIELD = "ModelParallelStrategy.tensor_parallel_size"
EP_FIELD = "ModelParallelStrategy.expert_parallel_size"


def mesh_size(device_mesh: DeviceMesh | None, name: str) -> int:
    """The size of the mesh dimension `name`, 1 when the mesh (or the dimension) is absent."""
    if device_mesh is None or name not in (device_mesh.mesh_dim_names or ()):
        return 1
    return device_mesh[name].size()


def data_parallel_mesh(device_mesh: DeviceMesh) -> DeviceMesh:
    """The processes that see different data: the "data_parallel" dimension of ModelParallelStrategy's 2-D mesh, or
    the flattened ("expert_data_parallel", "expert_parallel") of the expert-parallel 3-D one, which
    strategies.expert_parallel_mesh keeps on the mesh (torch deprecates slicing a flattened dimension by name)."""
    flattened = getattr(device_mesh, "data_parallel_mesh", None)
    return flattened if flattened is not None else device_mesh["data_parallel"]


def tensor_parallel_size(device_mesh: DeviceMesh) -> int:
    return mesh_size(device_mesh, "tensor_parallel")


def check_tensor_parallel(config: ModelConfig, tp: int) -> None:
    """Raise an InputError naming the settings when tp processes cannot split the model's heads or its dense
    SwiGLU width."""
    if tp <= 1:
        return
    if config.qk_norm == "full":
        raise InputError(f"{TP_FIELD}={tp} with ModelConfig.qk_norm='full': that norm takes a token's queries (and "
                         "keys) of all heads together, which tensor parallelism splits over processes; use "
                         "tensor_parallel_size 1 (FSDP2 and expert parallelism are fine)")
    sizes = [("n_heads", config.n_heads), ("n_kv_heads", config.n_kv_heads)]
    if len(config.moe_layer_indices()) < config.n_layers:  # some dense SwiGLU layers, split by tensor parallelism
        sizes.append(("ffn_dim", config.ffn_dim))
    for name, size in sizes:
        if size % tp:
            raise InputError(f"{TP_FIELD}={tp} does not divide ModelConfig.{name}={size}: tensor parallelism "
                             f"gives each process {name} / tensor_parallel_size of them; pick a tensor-parallel "
                             f"size that divides {name} (and the other head counts)")


def check_expert_parallel(config: ModelConfig, ep: int) -> None:
    """Raise an InputError naming the settings when ep processes cannot split the model's experts."""
    if ep <= 1:
        return
    if not config.moe_layer_indices():
        raise InputError(f"{EP_FIELD}={ep} but the model has no MoE layer (ModelConfig.n_experts="
                         f"{config.n_experts}): there are no experts to split; use expert_parallel_size 1")
    if config.n_experts % ep:
        raise InputError(f"{EP_FIELD}={ep} does not divide ModelConfig.n_experts={config.n_experts}: each "
                         "expert-parallel process holds n_experts / expert_parallel_size experts")


def parallelize(model: Transformer, device_mesh: DeviceMesh | None = None, activation_checkpointing: bool = False,
                compile: bool = False) -> None:
    """Everything done to a freshly built model before training, in place, in torchtitan's order: tensor
    parallelism over the mesh's "tensor_parallel" dimension (when larger than 1), experts split over
    "expert_parallel" (when larger than 1), recomputation of every block's activations in the backward pass,
    torch.compile of every block, then FSDP2 over "data_parallel" (the experts over "expert_data_parallel").
    `device_mesh` is ModelParallelStrategy's; None (one device, DDP, FSDPStrategy, DeepSpeed) shards nothing."""
    if (tp := tensor_parallel_size(device_mesh)) > 1:
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            RowwiseParallel,
            SequenceParallel,
            parallelize_module,
        )

        check_tensor_parallel(model.config, tp)
        for block in model.layers:
            plan = {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
                    "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel()}
            if model.config.qk_norm == "head":
                # One weight for every head, each process holding some heads ((B, T, H, C), split on dim 2): as
                # a sequence-parallel norm, the weight is replicated and its gradient summed over the processes
                # (each alone would see only its heads' part).
                plan.update({f"self_attn.{name}": SequenceParallel(sequence_dim=2, use_local_output=True)
                             for name in ("q_norm", "k_norm")})
            if isinstance(block.mlp, SwiGLU):  # MoE layers stay replicated (see "how experts are placed")
                plan.update({"mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
                             "mlp.down_proj": RowwiseParallel()})
            parallelize_module(block, device_mesh["tensor_parallel"], plan)
    expert_parallel = mesh_size(device_mesh, "expert_parallel") > 1
    if expert_parallel:
        check_expert_parallel(model.config, device_mesh["expert_parallel"].size())
        split_experts(model, device_mesh["expert_parallel"])
    set_count_groups(model, device_mesh)
    if activation_checkpointing:
        recompute_blocks(model)
    if compile:
        for block in model.layers:
            block.compile()
    if device_mesh is not None:
        from torch.distributed.fsdp import fully_shard

        dp_mesh = data_parallel_mesh(device_mesh)
        for block in model.layers:
            if expert_parallel and isinstance(block.mlp, MoELayer):
                edp_mesh = device_mesh["expert_data_parallel"]
                experts = fully_shard(block.mlp.experts, mesh=edp_mesh)
                experts.set_gradient_divide_factor(dp_mesh.size())  # see "Expert parallelism" above
                if edp_mesh.device_type == "cpu" and edp_mesh.size() > 1:
                    # FSDP2 divides with NCCL's PREMUL_SUM, which gloo lacks; a sum then a division instead. (Not
                    # with one process: torch 2.13 then divides by the factor twice, and reduces nothing anyway.)
                    experts.set_force_sum_reduction_for_comms(True)
            fully_shard(block, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)


def split_experts(model: Transformer, ep_mesh: DeviceMesh) -> None:
    """Each MoE layer's routed experts as DTensors split by expert over `ep_mesh`, and its all-to-all dispatcher.
    distribute_tensor sends process 0's weights to the others: every process starts from the same experts."""
    from torch import nn
    from torch.distributed.tensor import Shard, distribute_tensor

    for layer in model.modules():
        if isinstance(layer, MoELayer):
            for name, weight in list(layer.experts.named_parameters(recurse=False)):
                split = distribute_tensor(weight.detach(), ep_mesh, [Shard(0)])
                layer.experts.register_parameter(name, nn.Parameter(split, requires_grad=weight.requires_grad))
            layer.dispatcher = AllToAllDispatcher(layer.n_experts, ep_mesh.get_group())


def data_parallel_ranks(device_mesh: DeviceMesh | None, world_size: int) -> list[list[int]]:
    """The global ranks of every data-parallel group: one group per tensor-parallel index of the mesh (all the
    other dimensions, expert parallelism's included, hold different data), or every process with no mesh."""
    if device_mesh is None:
        return [list(range(world_size))]
    ranks, names = device_mesh.mesh, list(device_mesh.mesh_dim_names or ())
    tp = 1
    if "tensor_parallel" in names:
        ranks, tp = ranks.movedim(names.index("tensor_parallel"), -1), device_mesh["tensor_parallel"].size()
    return ranks.reshape(-1, tp).T.tolist()


def set_count_groups(model: Transformer, device_mesh: DeviceMesh | None = None) -> None:
    """Give every MoE layer the process group over which training counts its load-balancing fractions: a new group
    of this process's data-parallel processes, its own communicator rather than the default group (which a mesh
    dimension spanning every process reuses), so that the collective a layer issues inside its forward is ordered
    only with its kind. Nothing in a single process. A collective: every process must call it."""
    import torch.distributed as dist

    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if not layers or not (dist.is_available() and dist.is_initialized()):
        return
    group, _ = dist.new_subgroups_by_enumeration(data_parallel_ranks(device_mesh, dist.get_world_size()))
    for layer in layers:
        layer.count_group = group


def recompute_blocks(model: Transformer) -> None:
    """Activation checkpointing: recompute each block's activations in the backward pass instead of storing them.

    Replaces the block instances' forward rather than wrapping the modules, so parameter names (and therefore
    checkpoints and HF export) are unchanged.
    """
    for block in model.layers:
        block.forward = _Recomputed(block.forward)


class _Recomputed:
    def __init__(self, forward):
        self.forward = forward

    def __call__(self, *args):
        if not torch.is_grad_enabled():
            return self.forward(*args)
        # The recomputation runs under moe.recompute's flag: the MoE layers reuse their first pass's global
        # expert counts instead of all-reducing them again.
        return torch.utils.checkpoint.checkpoint(self.forward, *args, use_reentrant=False,
                                                 context_fn=_recompute_contexts)


def _recompute_contexts():
    return contextlib.nullcontext(), recomputation()


def data_parallel_size(trainer) -> int:
    """Processes that see different data: all of them, except that tensor-parallel processes share their batch."""
    mesh = getattr(trainer.strategy, "device_mesh", None)
    if mesh is not None and ("data_parallel" in (mesh.mesh_dim_names or ()) or hasattr(mesh, "data_parallel_mesh")):
        return data_parallel_mesh(mesh).size()
    return trainer.world_size


def total_norm(tensors: list[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """torch.nn.utils.get_total_norm for tensors that may be DTensors on different meshes (FSDP2's 1-D
    data-parallel mesh, the 2-D mesh of tensor-parallel weights): a plain tensor, the norm of the full tensors.
    The plain function returns a DTensor here, or fails mixing meshes. A collective when DTensors are present."""
    from torch.distributed.tensor import DTensor

    groups: dict[object, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.device_mesh if isinstance(t, DTensor) else None, []).append(t)
    norms = []
    for group in groups.values():
        norm = _get_total_norm(group, norm_type)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    return _get_total_norm(norms, norm_type)
