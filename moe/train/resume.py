"""What a checkpoint holds beyond Lightning's own state so that a resumed run continues the interrupted one
exactly, and the checks that refuse a resume that would not.

Lightning saves weights, optimiser, scheduler, loop counters and the DataModule's state (our stream position);
it does not save random number generator states. They are saved here after each step and put back right before
the first step after a resume, so randomness in training (dropout in a user's model, sampling) continues
as if never interrupted. Our data loaders draw their worker seeds from their own generators, so creating a
loader (which the resumed run does and the uninterrupted one does not) leaves the global streams alone.

A resumed `fit` continues the run in the checkpoint, so its settings must be the checkpoint's: a changed
architecture, optimiser or schedule setting, or seed, is refused with the list of differences (see
`RESUMABLE_CHANGES` for what may change). Data settings are checked by the DataModule's fingerprint.
"""

from __future__ import annotations

import dataclasses
import os
import random

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from moe.config import ModelConfig, resumable_fields
from moe.errors import IncompatibleResume

# Hyperparameters that change how a run executes or reports, not what it computes: a resume may change them.
RESUMABLE_CHANGES = {
    "init_from",  # the checkpoint's weights replace whatever it named
    "activation_checkpointing",
    "compile",
    "sampling",
    "default_callbacks",
    *(f"config.{name}" for name in resumable_fields()),  # ModelConfig's fields marked resumable
    # Settings LanguageModel took before they moved to their callbacks (ThroughputMonitor, StepGuard), so that
    # checkpoints written then still resume. The guards decide about later steps; turning skipping on after a
    # stop is what resuming is for.
    "peak_tflops",
    "on_nonfinite",
    "spike_zscore",
    "spike_window",
    "max_consecutive_skips",
}


def rng_states() -> dict:
    """torch's (CPU and every CUDA device's), numpy's and Python's generator states, as tensors and plain values
    so that torch.load(weights_only=True) reads them."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def hparam_changes(saved: dict, current: dict) -> list[str]:
    """The hyperparameters whose values differ between a checkpoint and this run, one line each, naming the
    setting (`LanguageModel.lr`, `ModelConfig.n_layers`)."""
    saved = dict(saved)
    if isinstance(saved.get("config"), dict):  # fields added since the checkpoint was written take their defaults
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        saved["config"] = dataclasses.asdict(ModelConfig(**{k: v for k, v in saved["config"].items() if k in known}))
    saved, current = _flatten(saved), _flatten(dict(current))

    def shown(values: dict, key: str) -> str:
        return repr(values[key]) if key in values else "(absent)"

    def name(key: str) -> str:
        return f"ModelConfig.{key[len('config.'):]}" if key.startswith("config.") else f"LanguageModel.{key}"

    return [
        f"{name(key)}: checkpoint {shown(saved, key)}, now {shown(current, key)}"
        for key in sorted(saved.keys() | current.keys())
        if not {key, key.split(".")[0]} & RESUMABLE_CHANGES and shown(saved, key) != shown(current, key)
    ]


# Where a checkpoint written before the training layer's callbacks held the state that is now theirs: the top-level
# key, the callback's state key (Callback.state_key, its class name) and the state it becomes.
_LEGACY_CALLBACK_STATE = {
    "step_guard": ("StepGuard", lambda value: value),
    "rng_states": ("RestoreRNG", lambda value: {"rng_states": value}),
    "tokens_seen": ("ThroughputMonitor", lambda value: {"tokens_seen": value}),
}
# The guard settings such a checkpoint's LanguageModel took, with their defaults.
_LEGACY_GUARD_SETTINGS = {"on_nonfinite": "stop", "spike_zscore": None, "spike_window": 128, "max_consecutive_skips": 8}


def upgrade_checkpoint(checkpoint: dict) -> list[str]:
    """Move the state a checkpoint of an earlier version kept at its top level to the callbacks that keep it now,
    in place, so that a resume from it stays exact; return the guard settings it was trained with that differ from
    the defaults (`name=value`), which now belong to a StepGuard in trainer.callbacks."""
    callbacks = checkpoint.setdefault("callbacks", {})
    for key, (state_key, state) in _LEGACY_CALLBACK_STATE.items():
        if key in checkpoint and state_key not in callbacks:
            callbacks[state_key] = state(checkpoint.pop(key))
    saved = checkpoint.get("hyper_parameters", {})
    return [f"{name}={saved[name]!r}" for name, default in _LEGACY_GUARD_SETTINGS.items()
            if name in saved and saved[name] != default]


def check_resume(checkpoint: dict, hparams: dict, seed: str | None, defaults: dict | None = None) -> None:
    """Refuse to resume `checkpoint` into a run with other model, optimiser or schedule settings or another seed.
    `defaults` are the values of settings the checkpoint may predate."""
    saved = {**(defaults or {}), **checkpoint.get("hyper_parameters", {})}
    changes = hparam_changes(saved, hparams)
    saved_seed = checkpoint.get("seed")
    if saved_seed is not None and seed is not None and str(saved_seed) != str(seed):
        changes.append(f"seed (seed_everything): checkpoint {saved_seed}, now {seed}")
    if changes:
        raise IncompatibleResume(
            "this run's settings differ from the checkpoint's, so it would not continue the same run:\n  "
            + "\n  ".join(changes)
            + "\nResume with the settings the run was started with, or start a new run from these weights with "
            "LanguageModel.init_from=CHECKPOINT (weights only: fresh optimiser, schedule and data stream)"
        )


def accept_checkpoint(checkpoint: dict, hparams: dict, defaults: dict, fitting: bool) -> None:
    """What LanguageModel does with a checkpoint it loads, before the callbacks' states are restored: give one of an
    earlier version their shape (warning about guard settings that now belong to StepGuard) and, when it is resumed
    by `fit`, refuse other settings (`check_resume`; `defaults` are the values of settings added since)."""
    guard_settings = upgrade_checkpoint(checkpoint)
    if guard_settings:
        rank_zero_warn(f"the checkpoint's run set the step guard's {', '.join(guard_settings)}; these are now "
                       "StepGuard's settings: give moe.train.guard.StepGuard with them in trainer.callbacks")
    if fitting:
        check_resume(checkpoint, hparams, os.environ.get("PL_GLOBAL_SEED"), defaults)


class RestoreRNG(pl.Callback):
    """Saves torch's, numpy's and Python's generator states with every checkpoint and puts them back right before
    the first step of a run resumed from it (validation and loader set-up in between must not see them).
    Registered by LanguageModel by default."""

    def __init__(self):
        self._to_restore: dict | None = None

    def state_dict(self) -> dict:
        return {"rng_states": rng_states()}

    def load_state_dict(self, state_dict: dict) -> None:
        self._to_restore = state_dict["rng_states"]

    def on_train_start(self, trainer, pl_module) -> None:
        if self._to_restore is not None:
            set_rng_states(self._to_restore)
            self._to_restore = None
