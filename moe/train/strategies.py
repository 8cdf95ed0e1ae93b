"""The strategy classes of our configs (configs/strategy/): `ModelParallelStrategy` (FSDP2 and tensor parallelism,
whose sharding `moe.train.parallel.parallelize` applies) and `OffloadDeepSpeedStrategy`; and which strategies can
run where: `check_strategy` refuses a GPU-only strategy (Lightning's FSDPStrategy,
DeepSpeed) on a CPU run before anything is built, naming the flags to change and what runs on a CPU instead.

Lightning's own answers are a parsing error about `accelerator='cpu'` that names no flag (FSDP with
`--trainer.accelerator cpu`), "No supported gpu backend found!" as a traceback (FSDP with `gpu` on a machine
without one), or a traceback asking to install DeepSpeed (DeepSpeed, whatever the accelerator).
Only the command line calls `check_strategy` (on its parsed `trainer` section, before the Trainer exists), so its
message names flags and config files. The strategy configurations themselves are YAML files in configs/strategy/.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.strategies import ModelParallelStrategy as _LightningModelParallelStrategy

from moe.errors import InputError
from moe.train.parallel import EP_FIELD, TP_FIELD, check_expert_parallel, data_parallel_mesh

_GPU_ONLY = ("FSDPStrategy", "DeepSpeedStrategy")  # torch FSDP1 and DeepSpeed need CUDA (NCCL) in Lightning


def config_value(config: Any, key: str, default: Any = None) -> Any:
    """`config[key]` of a parsed section: a jsonargparse Namespace, a dict or an object."""
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def resolve_class(class_path: str) -> type | None:
    """The class a config's `class_path` ("package.module.Class") names; None when it does not import (jsonargparse
    or Lightning report a bad name themselves)."""
    module, _, name = str(class_path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, None) if module else None
    except ImportError:
        return None


def _strategy_class(strategy: Any) -> type | None:
    """The class a `--trainer.strategy` value names: a registered name ("fsdp", "deepspeed_stage_2"), a class path,
    a {class_path, init_args} mapping or an instance; None for "auto" and values this cannot resolve."""
    from lightning.pytorch.strategies import StrategyRegistry

    if strategy is None:
        return None
    if not isinstance(strategy, (str, Mapping)) and config_value(strategy, "class_path") is None:
        return type(strategy)  # an instance
    name = strategy if isinstance(strategy, str) else config_value(strategy, "class_path")
    if name in StrategyRegistry:
        return StrategyRegistry[name]["strategy"]
    return resolve_class(name)


def _gpu_only_base(cls: type | None) -> str | None:
    for base in (cls.__mro__ if cls is not None else ()):
        if base.__name__ in _GPU_ONLY and base.__module__.startswith("lightning."):
            return base.__name__
    return None


def check_strategy(trainer_config: Any) -> None:
    """Raise `InputError` if the trainer's strategy needs a GPU and the run would have none: the accelerator is
    "cpu", or it is "auto"/"gpu"/"cuda" on a machine where CUDA is not available.

    `trainer_config` is the parsed `trainer` section (a jsonargparse Namespace or a dict), before instantiation.
    """
    strategy = config_value(trainer_config, "strategy", "auto")
    gpu_only = _gpu_only_base(_strategy_class(strategy))
    if gpu_only is None:
        return
    accelerator = config_value(trainer_config, "accelerator", "auto")
    accelerator = accelerator if isinstance(accelerator, str) else config_value(accelerator, "class_path", "") or ""
    on_cpu = accelerator.lower() == "cpu" or accelerator.endswith("CPUAccelerator")
    if not on_cpu and torch.cuda.is_available():
        return
    name = strategy if isinstance(strategy, str) else config_value(strategy, "class_path", gpu_only)
    where = (f"--trainer.accelerator {accelerator}" if on_cpu
             else f"--trainer.accelerator {accelerator} on a machine with no CUDA GPU")
    instead = ("--config configs/strategy/ddp.yaml (or --trainer.strategy auto for one process), or for sharding "
               "--config configs/strategy/fsdp2.yaml (FSDP2, ModelParallelStrategy)")
    raise InputError(f"--trainer.strategy {name} ({gpu_only}) runs on CUDA GPUs only, but this run has "
                     f"{where}. On a CPU use {instead}; to use {gpu_only}, run on GPUs with "
                     "--trainer.accelerator gpu (configs/trainer/gpu.yaml).")


def check_parallel_sizes(trainer_config: Any, model_config: Any = None) -> None:
    """Raise `InputError` naming the flags when ModelParallelStrategy's sizes cannot fit the devices the command
    gives (when it gives a number) or the model (`model_config`, the parsed `model.config`; None when it comes
    from a checkpoint, which `parallelize` checks once it is read). The strategy checks the same again when it
    starts; this says it before any process starts or any data is prepared."""
    strategy = config_value(trainer_config, "strategy", "auto")
    cls = _strategy_class(strategy)
    if cls is None or not issubclass(cls, ModelParallelStrategy) or config_value(strategy, "class_path") is None:
        return
    args = config_value(strategy, "init_args") or {}
    ep, tp = config_value(args, "expert_parallel_size", 1), config_value(args, "tensor_parallel_size", "auto")
    check_expert_parallel_size(ep)
    if ep > 1 and model_config is not None:
        from moe.config import ModelConfig

        fields = model_config.as_dict() if hasattr(model_config, "as_dict") else dict(model_config)
        try:
            config = ModelConfig(**fields)
        except (TypeError, ValueError):
            config = None  # reported when the model is built, naming its own field
        if config is not None:
            check_expert_parallel(config, ep)
    devices, nodes = config_value(trainer_config, "devices", "auto"), config_value(trainer_config, "num_nodes", 1)
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if not isinstance(devices, int) or devices < 1 or not isinstance(nodes, int):
        return  # "auto", "-1" or a device list: counted when the strategy starts
    parallel_sizes(devices * nodes, tp, ep)


def check_expert_parallel_size(ep: Any) -> None:
    if not isinstance(ep, int) or ep < 1:
        raise InputError(f"{EP_FIELD}={ep!r}: expected a whole number of processes >= 1")


def parallel_sizes(world_size: int, tp: int | str, ep: int, dp: int | str = "auto") -> tuple[int | str, int | str]:
    """(data_parallel_size, tensor_parallel_size) of ModelParallelStrategy on `world_size` devices: 'auto'
    data-parallel takes what the tensor-parallel groups leave, and with expert parallelism an 'auto'
    tensor-parallel size is 1. Sizes that do not divide raise InputError naming the flags."""
    if ep > 1 and tp == "auto":
        tp = 1
    if tp == "auto":
        return dp, tp  # Lightning's own meaning: one tensor-parallel group per node
    if world_size % tp:
        raise InputError(f"{TP_FIELD}={tp} does not divide the {world_size} devices (Trainer.devices x "
                         "Trainer.num_nodes); each tensor-parallel group needs tensor_parallel_size of them")
    if dp == "auto":
        dp = world_size // tp
    if dp * tp != world_size:
        raise InputError(f"ModelParallelStrategy.data_parallel_size={dp} x {TP_FIELD}={tp} is not the "
                         f"{world_size} devices (Trainer.devices x Trainer.num_nodes)")
    if dp % ep:
        raise InputError(f"{EP_FIELD}={ep} does not divide the data-parallel size {dp} (Trainer.devices x "
                         f"Trainer.num_nodes / {TP_FIELD}): expert parallelism groups data-parallel processes")
    return dp, tp


class OffloadDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy that lets ZeRO-Offload run the optimizer `LanguageModel` builds (torch's AdamW).

    DeepSpeed refuses a client optimizer with offload unless its config sets `zero_force_ds_cpu_optimizer: false`,
    which DeepSpeedStrategy's arguments cannot; a `config` dict given in YAML arrives as a string (its type is
    `str | Path | dict`). configs/strategy/deepspeed-zero3-offload.yaml uses this class.
    """

    def __init__(self, stage: int = 3, offload_optimizer: bool = True, offload_parameters: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(stage=stage, offload_optimizer=offload_optimizer, offload_parameters=offload_parameters,
                         **kwargs)
        self.config["zero_force_ds_cpu_optimizer"] = False


class ModelParallelStrategy(_LightningModelParallelStrategy):
    """Lightning's ModelParallelStrategy (FSDP2, tensor parallelism), with expert parallelism, and with
    data_parallel_size='auto' taking every device the tensor-parallel groups leave (world size /
    tensor_parallel_size) instead of the number of nodes, so one config serves any number of devices.

    expert_parallel_size P > 1 splits each MoE layer's experts over P data-parallel processes, which exchange
    tokens with an all-to-all (moe/dispatch.py). It borrows its processes from data parallelism: the device mesh
    is 3-D, ("expert_data_parallel", "expert_parallel", "tensor_parallel") of sizes (DP / P, P, TP), with
    "data_parallel" the flattened first two, so that the data sampler and every non-expert weight see DP
    data-parallel processes as before (moe.train.parallel explains how each weight is sharded). With P > 1 a
    tensor_parallel_size of 'auto' means 1. Sizes that do not divide are errors naming the flags.
    """

    def __init__(self, data_parallel_size: int | str = "auto", tensor_parallel_size: int | str = "auto",
                 expert_parallel_size: int = 1, **kwargs: Any) -> None:
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=tensor_parallel_size, **kwargs)
        check_expert_parallel_size(expert_parallel_size)
        self.expert_parallel_size = expert_parallel_size

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        dp_mesh = data_parallel_mesh(self.device_mesh)
        return {"num_replicas": dp_mesh.size(), "rank": dp_mesh.get_local_rank()}

    def setup_environment(self) -> None:
        ep = self.expert_parallel_size
        self._data_parallel_size, self._tensor_parallel_size = parallel_sizes(
            self.num_nodes * self.num_processes, self._tensor_parallel_size, ep, self._data_parallel_size)
        if ep == 1:
            super().setup_environment()
            return
        # Lightning's setup_environment, with our mesh instead of its 2-D one.
        super(_LightningModelParallelStrategy, self).setup_environment()
        self._setup_distributed()
        self._device_mesh = expert_parallel_mesh(self.root_device.type, self._data_parallel_size, ep,
                                                 self._tensor_parallel_size)
        self.lightning_module._device_mesh = self._device_mesh


def expert_parallel_mesh(device_type: str, dp: int, ep: int, tp: int):
    """The 3-D device mesh of expert parallelism, with "data_parallel" = ("expert_data_parallel", "expert_parallel")
    flattened. Expert-parallel processes are adjacent data-parallel ranks (a stride of tp), so a group stays within
    a node when ep x tp devices fit in one."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device_type, (dp // ep, ep, tp),
                            mesh_dim_names=("expert_data_parallel", "expert_parallel", "tensor_parallel"))
    mesh.data_parallel_mesh = mesh["expert_data_parallel", "expert_parallel"]._flatten("data_parallel")
    return mesh
