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

How experts are placed: MoE layers are not tensor-parallel. The router, the routed experts and any shared
experts are replicated over the tensor-parallel group: they see the full, replicated hidden state, every
process of the group routes the same tokens to the same experts and computes the same output, and no
communication is added. Their stacked (E, F, D) weights are sharded by FSDP2 over the data-parallel dimension
only (dim 0, the expert dimension, as for any FSDP2 parameter), gathered before the block's forward and its
backward. This spends tp-fold expert compute to keep the MoE layer free of collectives; expert parallelism
(experts split over processes with an all-to-all) is the way to divide that work, and is not implemented here.

Every process must build the same initial weights (the CLI seeds every process alike, seed_everything):
FSDP2 shards each process's own copy without broadcasting it.
Shapes: H query heads, K key/value heads, E experts, F expert hidden dim, D model dim.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch.distributed.device_mesh import DeviceMesh

from moe.config import ModelConfig
from moe.errors import InputError
from moe.mlp import SwiGLU
from moe.model import Transformer

_get_total_norm = torch.nn.utils.get_total_norm
TP_FIELD = "ModelParallelStrategy.tensor_parallel_size"


def tensor_parallel_size(device_mesh: DeviceMesh) -> int:
    names = device_mesh.mesh_dim_names or ()
    return device_mesh["tensor_parallel"].size() if "tensor_parallel" in names else 1


def check_tensor_parallel(config: ModelConfig, tp: int) -> None:
    """Raise an InputError naming the settings when tp processes cannot split the model's heads or its dense
    SwiGLU width."""
    if tp <= 1:
        return
    sizes = [("n_heads", config.n_heads), ("n_kv_heads", config.n_kv_heads)]
    if len(config.moe_layer_indices()) < config.n_layers:  # some dense SwiGLU layers, split by tensor parallelism
        sizes.append(("ffn_dim", config.ffn_dim))
    for name, size in sizes:
        if size % tp:
            raise InputError(f"{TP_FIELD}={tp} does not divide ModelConfig.{name}={size}: tensor parallelism "
                             f"gives each process {name} / tensor_parallel_size of them; pick a tensor-parallel "
                             f"size that divides {name} (and the other head counts)")


def parallelize(model: Transformer, device_mesh: DeviceMesh | None = None, activation_checkpointing: bool = False,
                compile: bool = False) -> None:
    """Everything done to a freshly built model before training, in place, in torchtitan's order: tensor
    parallelism over the mesh's "tensor_parallel" dimension (when larger than 1), recomputation of every block's
    activations in the backward pass, torch.compile of every block, then FSDP2 over "data_parallel".
    `device_mesh` is ModelParallelStrategy's; None (one device, DDP, FSDPStrategy, DeepSpeed) shards nothing."""
    if device_mesh is not None and (tp := tensor_parallel_size(device_mesh)) > 1:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        check_tensor_parallel(model.config, tp)
        for block in model.layers:
            plan = {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
                    "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel()}
            if isinstance(block.mlp, SwiGLU):  # MoE layers stay replicated (see "how experts are placed")
                plan.update({"mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
                             "mlp.down_proj": RowwiseParallel()})
            parallelize_module(block, device_mesh["tensor_parallel"], plan)
    if activation_checkpointing:
        recompute_blocks(model)
    if compile:
        for block in model.layers:
            block.compile()
    if device_mesh is not None:
        from torch.distributed.fsdp import fully_shard

        dp_mesh = device_mesh["data_parallel"]
        for block in model.layers:
            fully_shard(block, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)


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
        return torch.utils.checkpoint.checkpoint(self.forward, *args, use_reentrant=False)


def data_parallel_size(trainer) -> int:
    """Processes that see different data: all of them, except that tensor-parallel processes share their batch."""
    mesh = getattr(trainer.strategy, "device_mesh", None)
    if mesh is not None and "data_parallel" in (mesh.mesh_dim_names or ()):
        return mesh["data_parallel"].size()
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
