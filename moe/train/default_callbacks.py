"""The callbacks every run gets: what a run reports or guards beyond its losses and learning rate.

`LanguageModel.configure_callbacks` registers each one whose type `trainer.callbacks` does not already hold, so a
callback given there (with its own settings) replaces the default, and `LanguageModel.default_callbacks` keeps only
the named ones. To add a default, write a Lightning Callback in its own file and name it here.
"""

from __future__ import annotations

import lightning.pytorch as pl

from moe.train.expert_bias import ExpertBiasUpdate
from moe.train.guard import StepGuard
from moe.train.resume import RestoreRNG
from moe.train.routing_metrics import ExpertLoadMonitor, RouterLossMonitor
from moe.train.throughput import ThroughputMonitor

# The step guard first: its norm, computed after fp16's unscaling, is the one clipping uses, and the expert bias
# update needs its verdict.
DEFAULT_CALLBACKS: dict[str, type[pl.Callback]] = {
    "StepGuard": StepGuard,
    "ThroughputMonitor": ThroughputMonitor,
    "RouterLossMonitor": RouterLossMonitor,
    "ExpertLoadMonitor": ExpertLoadMonitor,
    "ExpertBiasUpdate": ExpertBiasUpdate,
    "RestoreRNG": RestoreRNG,
}


def check_default_names(names: list[str] | None) -> None:
    unknown = set(names or ()) - set(DEFAULT_CALLBACKS)
    if unknown:
        raise ValueError(f"LanguageModel.default_callbacks: {sorted(unknown)} not among {list(DEFAULT_CALLBACKS)}")


def default_callbacks(names: list[str] | None, given: list[pl.Callback]) -> list[pl.Callback]:
    """New instances of the defaults called `names` (None: all of them) whose type no callback in `given` has."""
    wanted = DEFAULT_CALLBACKS if names is None else names
    present = [type(c) for c in given]
    return [DEFAULT_CALLBACKS[name]() for name in wanted
            if not any(issubclass(kind, DEFAULT_CALLBACKS[name]) for kind in present)]
