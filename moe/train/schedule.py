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

SCHEDULES = ("cosine", "wsd", "constant")
DECAY_SHAPES = ("linear", "cosine", "1-sqrt")


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
