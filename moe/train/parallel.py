"""FSDP2 with optional tensor parallelism (Megatron-LM, Shoeybi et al. 2019), applied from outside the model.

Lightning's ModelParallelStrategy builds a 2-D device mesh ("data_parallel", "tensor_parallel") and hands it to
`LanguageModel.configure_model`, which calls `parallelize` on the freshly built model. The order follows
torchtitan's: tensor parallelism inside each block, then activation checkpointing, then FSDP2
(`fully_shard`) over the data-parallel dimension, per block and at the root.

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
from lightning.pytorch.strategies import ModelParallelStrategy as _LightningModelParallelStrategy
from torch.distributed.device_mesh import DeviceMesh

from moe.config import ModelConfig
from moe.errors import InputError
from moe.mlp import SwiGLU
from moe.model import Transformer

_get_total_norm = torch.nn.utils.get_total_norm
TP_FLAG = "--trainer.strategy.init_args.tensor_parallel_size"


def tensor_parallel_size(device_mesh: DeviceMesh) -> int:
    names = device_mesh.mesh_dim_names or ()
    return device_mesh["tensor_parallel"].size() if "tensor_parallel" in names else 1


def check_tensor_parallel(config: ModelConfig, tp: int) -> None:
    """Raise a ValueError naming the flags when tp processes cannot split the model's heads or SwiGLU width."""
    if tp <= 1:
        return
    sizes = [("n_heads", config.n_heads), ("n_kv_heads", config.n_kv_heads)]
    if not config.is_moe:
        sizes.append(("ffn_dim", config.ffn_dim))
    for name, size in sizes:
        if size % tp:
            raise InputError(f"{TP_FLAG}={tp} does not divide --model.config.{name}={size}: tensor parallelism "
                             f"gives each process {name} / tensor_parallel_size of them; pick a tensor-parallel "
                             f"size that divides {name} (and the other head counts)")


def parallelize(model: Transformer, device_mesh: DeviceMesh, activation_checkpointing: bool = False) -> None:
    """Shard `model` in place over `device_mesh`: tensor parallelism over its "tensor_parallel" dimension (when
    larger than 1), activation checkpointing of every block if asked, FSDP2 over "data_parallel"."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp = tensor_parallel_size(device_mesh)
    if tp > 1:
        check_tensor_parallel(model.config, tp)
        for block in model.layers:
            plan = {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
                    "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel()}
            if isinstance(block.mlp, SwiGLU):  # MoE layers stay replicated (see "how experts are placed")
                plan.update({"mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
                             "mlp.down_proj": RowwiseParallel()})
            parallelize_module(block, device_mesh["tensor_parallel"], plan)
    if activation_checkpointing:
        from moe.train.module import checkpoint_blocks

        checkpoint_blocks(model)
    dp_mesh = device_mesh["data_parallel"]
    for block in model.layers:
        fully_shard(block, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)


class ModelParallelStrategy(_LightningModelParallelStrategy):
    """Lightning's ModelParallelStrategy, except that data_parallel_size='auto' takes every device the
    tensor-parallel groups leave (world size / tensor_parallel_size) instead of the number of nodes, so one
    config serves any number of devices; and a tensor-parallel size that does not divide the devices is an
    error naming the flag."""

    def setup_environment(self) -> None:
        world_size = self.num_nodes * self.num_processes
        tp = self._tensor_parallel_size
        if tp != "auto":
            if world_size % tp:
                raise InputError(f"{TP_FLAG}={tp} does not divide the {world_size} devices (--trainer.devices x "
                                 "--trainer.num_nodes); each tensor-parallel group needs tensor_parallel_size of them")
            if self._data_parallel_size == "auto":
                self._data_parallel_size = world_size // tp
        super().setup_environment()


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


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as a full, plain tensor (a collective: every process must call it)."""
    from torch.distributed.tensor import DTensor

    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for name, p in model.named_parameters()}
