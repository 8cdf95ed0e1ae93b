"""Trainer settings Lightning rejects only with a traceback from inside the Trainer's constructor, checked first so
that the command line can name the flag: `check_trainer_flags` refuses a step or epoch limit below -1, a device
count of 0, and an accelerator this machine does not have (`gpu` or `cuda` without a CUDA GPU).

-1 is Lightning's "no limit" for max_steps and max_epochs, and "every device" for devices. The GPU-only
strategies are checked by `moe.train.strategies.check_strategy`.

Only the command line calls this, on its parsed `trainer` section before the Trainer exists, so its messages name
flags (`--trainer.devices`): a Python user builds the Trainer and gets Lightning's own errors.
"""

from __future__ import annotations

from typing import Any

from moe.errors import InputError
from moe.train.strategies import config_value


def _as_int(value: Any) -> int | None:
    """An integer given as a number or a string ("2", "-1"); None for anything else ("auto", "0,1", lists)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def accelerator_available(name: str) -> bool | None:
    """Whether Lightning would find the accelerator `name` on this machine; None for "auto" and names it does not
    register (it reports those itself)."""
    from lightning.pytorch.accelerators import AcceleratorRegistry, CUDAAccelerator, MPSAccelerator

    name = name.lower()
    if name == "gpu":  # Lightning's alias: MPS where there is one, else CUDA
        return CUDAAccelerator.is_available() or MPSAccelerator.is_available()
    if name == "auto" or name not in AcceleratorRegistry:
        return None
    return AcceleratorRegistry[name]["accelerator"].is_available()


def check_trainer_flags(trainer_config: Any) -> None:
    """Raise `InputError`, naming the flag and value, for trainer settings Lightning would refuse with a traceback.

    `trainer_config` is the parsed `trainer` section (a jsonargparse Namespace or a dict), before instantiation.
    """
    for name in ("max_steps", "max_epochs"):
        value = config_value(trainer_config, name)
        if isinstance(value, int) and not isinstance(value, bool) and value < -1:
            raise InputError(f"--trainer.{name} {value}: must be >= 0, or -1 for no limit")
    devices = config_value(trainer_config, "devices", "auto")
    count = _as_int(devices)
    empty = not devices.strip() if isinstance(devices, str) else isinstance(devices, (list, tuple)) and not devices
    if empty or count is not None and (count == 0 or count < -1):
        raise InputError(f"--trainer.devices {devices}: must be a number of devices >= 1, -1 for every device, "
                         "'auto', or a list of device indices")
    accelerator = config_value(trainer_config, "accelerator", "auto")
    if isinstance(accelerator, str) and accelerator_available(accelerator) is False:
        raise InputError(f"--trainer.accelerator {accelerator}: this machine has no {accelerator.upper()} device "
                         "that torch can use; use --trainer.accelerator cpu (configs/trainer/cpu.yaml), or run on a "
                         "machine with one")
