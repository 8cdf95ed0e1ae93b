"""Learning-rate schedules as pure functions of the optimizer step, returning a multiplier of the peak rate.

- Warmup + cosine (LLaMA, Touvron et al. 2023): linear warmup, then cosine decay to `min_ratio` of the peak at
  the last step.
- Warmup-stable-decay (MiniCPM, Hu et al. 2024): linear warmup, a constant plateau, then a final decay over
  `decay_steps` to `min_ratio` (linear, cosine or 1-sqrt shaped), so a run can be extended from a plateau
  checkpoint.
Conventions follow HF transformers' schedulers (step 0 has rate 0 while warming up, the multiplier at step s is
the one used for the update of step s), which the tests use as the oracle.
"""

from __future__ import annotations

import math

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from moe.errors import InputError

SCHEDULES = ("cosine", "wsd", "constant")
DECAY_SHAPES = ("linear", "cosine", "1-sqrt")
# The max_epochs a Trainer gets when given neither max_steps nor max_epochs (lightning.pytorch.loops.fit_loop).
LIGHTNING_DEFAULT_EPOCHS = 1000


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> float:
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_stable_decay(
    step: int, warmup_steps: int, total_steps: int, decay_steps: int, min_ratio: float = 0.1,
    decay_shape: str = "1-sqrt",
) -> float:
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, decay_steps))
    if decay_shape == "linear":
        remaining = 1.0 - progress
    elif decay_shape == "cosine":
        remaining = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif decay_shape == "1-sqrt":
        remaining = 1.0 - math.sqrt(progress)
    else:
        raise ValueError(f"decay_shape={decay_shape!r} is not one of {DECAY_SHAPES}")
    return min_ratio + (1.0 - min_ratio) * remaining


def warmup_constant(step: int, warmup_steps: int) -> float:
    return min(1.0, step / max(1, warmup_steps))


def lr_multiplier(
    step: int, *, schedule: str, warmup_steps: int, total_steps: int, min_ratio: float,
    decay_fraction: float = 0.2, decay_shape: str = "1-sqrt",
) -> float:
    """The multiplier of the peak learning rate at optimizer step `step` for the named schedule."""
    if schedule == "cosine":
        return warmup_cosine(step, warmup_steps, total_steps, min_ratio)
    if schedule == "wsd":
        decay_steps = round(decay_fraction * total_steps)
        return warmup_stable_decay(step, warmup_steps, total_steps, decay_steps, min_ratio, decay_shape)
    if schedule == "constant":
        return warmup_constant(step, warmup_steps)
    raise ValueError(f"schedule={schedule!r} is not one of {SCHEDULES}")


# ---------------------------------------------------------------------------------------- the schedule of a run
def check_schedule_settings(schedule: str, lr: float, warmup_steps: int, min_lr_ratio: float, decay_fraction: float,
                            decay_shape: str) -> None:
    """Raise a ValueError naming the LanguageModel setting that no schedule can use."""
    if schedule not in SCHEDULES:
        raise ValueError(f"LanguageModel.schedule={schedule!r} is not one of {SCHEDULES}")
    if decay_shape not in DECAY_SHAPES:
        raise ValueError(f"LanguageModel.decay_shape={decay_shape!r} is not one of {DECAY_SHAPES}")
    for name, value in (("lr", lr), ("min_lr_ratio", min_lr_ratio), ("decay_fraction", decay_fraction)):
        if value < 0 or (name != "lr" and value > 1):
            raise ValueError(f"LanguageModel.{name}={value} is out of range")
    if warmup_steps < 0:
        raise ValueError(f"LanguageModel.warmup_steps={warmup_steps} must be >= 0")


def run_length(trainer, schedule: str) -> int:
    """The optimizer steps a schedule spans when not given: the Trainer's max_steps, or the steps its max_epochs
    imply."""
    if schedule != "constant" and trainer.max_steps < 0 and trainer.max_epochs == LIGHTNING_DEFAULT_EPOCHS:
        # Neither max_steps nor max_epochs given (or 1000 epochs asked for, which only total_steps can tell apart):
        # Lightning stops after 1000 epochs, and a schedule spread over them would stay near its peak for the whole
        # of any real run.
        raise InputError(f"the {schedule} schedule needs the run's length: set Trainer.max_steps (or "
                         "Trainer.max_epochs, or LanguageModel.total_steps); without them Lightning runs for "
                         f"{LIGHTNING_DEFAULT_EPOCHS} epochs and the learning rate would not decay")
    steps = trainer.estimated_stepping_batches
    if not math.isfinite(steps):
        raise InputError("the schedule needs a length: set Trainer.max_steps or LanguageModel.total_steps")
    return int(steps)


def lr_scheduler(optimizer: torch.optim.Optimizer, hp, total: int,
                 before: tuple[int | None, int] = (None, 0)) -> torch.optim.lr_scheduler.LambdaLR:
    """The scheduler of LanguageModel's hyperparameters `hp` over `total` optimizer steps. `before` is the span of
    the run a resumed one continues and the step it resumes at: a changed span changes the learning rate there,
    which is warned about."""
    if hp.warmup_steps > total:
        raise InputError(f"LanguageModel.warmup_steps={hp.warmup_steps} exceeds the {total} optimizer steps of the "
                         "run; lower it or raise Trainer.max_steps")

    def multiplier_for(total_steps: int, step: int) -> float:
        return lr_multiplier(step, schedule=hp.schedule, warmup_steps=hp.warmup_steps, total_steps=total_steps,
                             min_ratio=hp.min_lr_ratio, decay_fraction=hp.decay_fraction, decay_shape=hp.decay_shape)

    saved_total, step = before
    if saved_total is not None and saved_total != total:
        was, now = hp.lr * multiplier_for(saved_total, step), hp.lr * multiplier_for(total, step)
        rank_zero_warn(f"the schedule now spans {total} optimizer steps instead of the checkpoint's {saved_total}, so "
                       f"the learning rate at step {step} changes from {was:.4g} to {now:.4g}; pass "
                       f"LanguageModel.total_steps={saved_total} to keep it")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: multiplier_for(total, s))


class ScheduleLength:
    """The optimizer steps a run's schedule spans, kept in its checkpoints: a resumed run whose span differs (a
    changed max_steps) would change the learning rate from the step it resumes at, which `lr_scheduler` warns of."""

    def __init__(self):
        self.total: int | None = None  # this run's
        self.saved: int | None = None  # the run a resumed one continues
        self.resumed_step = 0

    def save(self, checkpoint: dict) -> None:
        checkpoint["schedule_total_steps"] = self.total

    def load(self, checkpoint: dict) -> None:
        self.saved = checkpoint.get("schedule_total_steps")
        self.resumed_step = int(checkpoint.get("global_step", 0))

    def scheduler(self, optimizer: torch.optim.Optimizer, hp, trainer) -> torch.optim.lr_scheduler.LambdaLR:
        """`lr_scheduler` for LanguageModel's hyperparameters `hp` over total_steps, or the Trainer's run length."""
        self.total = hp.total_steps if hp.total_steps is not None else run_length(trainer, hp.schedule)
        return lr_scheduler(optimizer, hp, self.total, before=(self.saved, self.resumed_step))
