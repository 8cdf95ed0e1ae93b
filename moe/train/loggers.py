"""What the optional loggers need: `check_logger_packages` refuses a logger whose package is not installed before any
data is prepared, and `log_expert_load_images` draws the expert load of `ExpertLoadMonitor` as an image (and, for
TensorBoard, histograms) on the loggers that can show one.

CSV is the default logger and needs nothing; TensorBoard and Weights & Biases are optional extras
(`pip install -e ".[tensorboard]"`, `".[wandb]"`; configs/logger/). Lightning imports both logger classes without
their packages, so the command line parses; each fails only once built: its constructor raises ModuleNotFoundError,
which jsonargparse reports as a page about the union type of `trainer.logger` ("Problem with given class_path ...:
False"), or, where the package's metadata survives without its module, the TensorBoard logger's first write raises
it as a traceback from inside the Trainer, after the data is prepared. Shapes: L MoE layers, E experts.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import numpy as np
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger

from moe.errors import InputError
from moe.train.strategies import config_value, resolve_class

# Logger class -> the packages it can write with (any one of them) and the extra of pyproject.toml that installs
# one. TensorBoardLogger writes with tensorboard, or with tensorboardX where only that is installed.
LOGGER_PACKAGES: list[tuple[type[Logger], tuple[str, ...], str]] = [
    (TensorBoardLogger, ("tensorboard", "tensorboardX"), "tensorboard"),
    (WandbLogger, ("wandb",), "wandb"),
]


def package_available(name: str) -> bool:
    """Whether `import name` would find the package (without importing it: wandb takes a second)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module left half-imported
        return False


def check_logger_packages(logger_config: Any) -> None:
    """Raise `InputError` naming what to install when a logger of the parsed `trainer.logger` (one logger, a list of
    them, or True/False/None) needs a package that is not installed."""
    entries = logger_config if isinstance(logger_config, (list, tuple)) else [logger_config]
    for entry in entries:
        class_path = config_value(entry, "class_path")
        cls = resolve_class(class_path) if isinstance(class_path, str) else None
        if not isinstance(cls, type):
            continue
        for logger_type, packages, extra in LOGGER_PACKAGES:
            if issubclass(cls, logger_type) and not any(package_available(p) for p in packages):
                raise InputError(f"--trainer.logger {cls.__name__} needs the {packages[0]} package: "
                                 f'pip install -e ".[{extra}]" (or pip install {packages[0]})')


# ---- Expert load as an image --------------------------------------------------------------------------------------
CELL_PIXELS = 8  # each (layer, expert) cell is a square this wide, so that a few experts are not a few pixels


def load_heatmap(load: torch.Tensor) -> np.ndarray:
    """(L, E) fractions of each layer's assignments per expert -> (L * CELL_PIXELS, E * CELL_PIXELS) uint8 grey image
    (HW), rows the layers top-down, columns the experts. Grey is load over the mean, load * E / 2: a perfectly
    balanced expert (1/E) is mid-grey, an idle one black, one with twice the mean load or more white. Fixed rather
    than min-max, so that images of different steps compare."""
    n_experts = load.shape[1]
    grey = (load.float() * n_experts / 2).clamp(0, 1) * 255
    cells = grey.round().to(torch.uint8).repeat_interleave(CELL_PIXELS, 0).repeat_interleave(CELL_PIXELS, 1)
    return cells.cpu().numpy()


def log_expert_load_images(loggers: list[Logger], layers: tuple[int, ...], load: torch.Tensor, step: int) -> None:
    """Log (L, E) load fractions (row j is block layers[j]) as the heatmap `experts/load` to each TensorBoard and
    W&B logger, and on TensorBoard one histogram of the experts' fractions per layer, `experts/layer_<i>/load`.
    Nothing is computed when no such logger is present. Call on global rank zero."""
    tensorboards = [logger for logger in loggers if isinstance(logger, TensorBoardLogger)]
    wandbs = [logger for logger in loggers if isinstance(logger, WandbLogger)]
    if not tensorboards and not wandbs:
        return
    image = load_heatmap(load)
    for logger in tensorboards:
        writer = logger.experiment  # a SummaryWriter
        writer.add_image("experts/load", image, global_step=step, dataformats="HW")
        for row, layer in enumerate(layers):
            writer.add_histogram(f"experts/layer_{layer}/load", load[row].float().cpu(), global_step=step)
    for logger in wandbs:
        # A wandb.Image, logged with the trainer's step like W&B's other metrics.
        logger.log_image("experts/load", [image], step=step,
                         caption=[f"step {step}: layers {list(layers)} (rows) x experts; mid-grey = mean load"])
