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
from moe.train.parallel import TP_FIELD

_GPU_ONLY = ("FSDPStrategy", "DeepSpeedStrategy")  # torch FSDP1 and DeepSpeed need CUDA (NCCL) in Lightning


def config_value(config: Any, key: str, default: Any = None) -> Any:
    """`config[key]` of a parsed section: a jsonargparse Namespace, a dict or an object."""
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


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
    module, _, attribute = str(name).rpartition(".")
    try:
        return getattr(importlib.import_module(module), attribute) if module else None
    except (ImportError, AttributeError):
        return None  # Lightning reports the bad name itself


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
    """Lightning's ModelParallelStrategy, except that data_parallel_size='auto' takes every device the
    tensor-parallel groups leave (world size / tensor_parallel_size) instead of the number of nodes, so one
    config serves any number of devices; and a tensor-parallel size that does not divide the devices is an
    error naming the flag."""

    def setup_environment(self) -> None:
        world_size = self.num_nodes * self.num_processes
        tp = self._tensor_parallel_size
        if tp != "auto":
            if world_size % tp:
                raise InputError(f"{TP_FIELD}={tp} does not divide the {world_size} devices (Trainer.devices x "
                                 "Trainer.num_nodes); each tensor-parallel group needs tensor_parallel_size of them")
            if self._data_parallel_size == "auto":
                self._data_parallel_size = world_size // tp
        super().setup_environment()
