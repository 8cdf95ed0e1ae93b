"""Whether to apply an optimizer step: non-finite losses and gradients, and loss spikes.

A non-finite loss or gradient norm stops training by default (a `TrainingStopped` naming the step, raised before
the update, so the weights and the last checkpoint stay as they were) or, with `on_nonfinite="skip"`, drops that
update. The spike guard, off unless `spike_zscore` is set, drops an update whose loss lies more than `spike_zscore`
standard deviations above the mean of the last `spike_window` applied steps (PaLM, Chowdhery et al. 2022, skipped
batches around spikes; OLMo 2 and Megatron-LM guard the same way). Dropped steps are counted, and too many in a
row stop the run: a loss that stays high is a new level or a divergence, not a spike.

`StepGuard` is a Lightning callback, registered by `LanguageModel` unless `trainer.callbacks` holds one (which is how
its settings are given: `--trainer.callbacks+=moe.train.guard.StepGuard --trainer.callbacks.on_nonfinite skip`).
It judges the step's total loss (what each micro-batch backpropagates, cross-entropy plus router losses) and the
gradient norm, both as means over processes so that every process takes the same decision, right before the
update. The window and the counters are part of the checkpoint, so a resumed run makes the same decisions.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import lightning.pytorch as pl

from moe.errors import TrainingStopped

NONFINITE_ACTIONS = ("stop", "skip")


@dataclass(frozen=True)
class Verdict:
    apply: bool
    reason: str = ""  # why a step was dropped: "nonfinite" or "spike"


APPLY = Verdict(True)


class StepGuard(pl.Callback):
    def __init__(
        self,
        on_nonfinite: str = "stop",
        spike_zscore: float | None = None,
        spike_window: int = 128,
        spike_min_steps: int | None = None,
        max_consecutive_skips: int = 8,
    ):
        """
        Args:
            on_nonfinite: What a non-finite loss or gradient norm does: 'stop' (raise before the update, naming the
                step) or 'skip' (drop that update and count it).
            spike_zscore: Drop an update whose loss is more than this many standard deviations above the mean of
                the last spike_window applied steps, and count it; None turns the spike guard off.
            spike_window: Applied steps the spike guard's mean and deviation are taken over.
            spike_min_steps: Applied steps the window needs before the spike guard judges; None: 32, or the whole
                window if shorter.
            max_consecutive_skips: Stop training when this many updates in a row are dropped.
        """
        spike_min_steps = min(32, spike_window) if spike_min_steps is None else spike_min_steps
        if on_nonfinite not in NONFINITE_ACTIONS:
            raise ValueError(f"StepGuard.on_nonfinite={on_nonfinite!r} is not one of {NONFINITE_ACTIONS}")
        if spike_zscore is not None and spike_zscore <= 0:
            raise ValueError(f"StepGuard.spike_zscore={spike_zscore} must be positive (or null to turn the guard off)")
        if not 2 <= spike_min_steps <= spike_window:
            raise ValueError(f"StepGuard.spike_window={spike_window} must be at least spike_min_steps="
                             f"{spike_min_steps} (and that at least 2)")
        if max_consecutive_skips < 1:
            raise ValueError(f"StepGuard.max_consecutive_skips={max_consecutive_skips} must be >= 1")
        self.on_nonfinite = on_nonfinite
        self.spike_zscore = spike_zscore
        self.spike_min_steps = spike_min_steps
        self.max_consecutive_skips = max_consecutive_skips
        self.recent: deque[float] = deque(maxlen=spike_window)  # losses of applied steps
        self.skipped_nonfinite = 0
        self.skipped_spikes = 0
        self.consecutive_skips = 0

    def check(self, step: int, loss: float, grad_norm: float | None) -> Verdict:
        """The verdict on optimizer step `step` (0-based: the trainer's global_step before it) given its loss (the
        total training loss: cross-entropy plus the weighted router losses, so messages call it that) and gradient
        norm (None when the gradient scaler of fp16 training handles overflowing gradients itself)."""
        nonfinite = [name for name, value in (("total loss", loss), ("gradient norm", grad_norm))
                     if value is not None and not math.isfinite(value)]
        if nonfinite:
            if self.on_nonfinite == "stop":
                raise TrainingStopped(
                    f"non-finite {' and '.join(nonfinite)} (total loss {loss}, gradient norm {grad_norm}) at step {step}: "
                    f"training stopped before applying it, so the weights are those of the {step} steps before and "
                    "the last checkpoint is intact. Lower the learning rate or resume from an earlier checkpoint; "
                    f"StepGuard(on_nonfinite='skip') drops such steps instead"
                )
            self.skipped_nonfinite += 1
            return self._skip(step, "nonfinite", f"non-finite {' and '.join(nonfinite)}")
        z = self.zscore(loss)
        if z is not None and z > self.spike_zscore:
            self.skipped_spikes += 1
            return self._skip(step, "spike", f"total loss {loss:.4f} is {z:.1f} standard deviations above the recent mean")
        self.consecutive_skips = 0
        self.recent.append(loss)
        return APPLY

    def zscore(self, loss: float) -> float | None:
        """How many standard deviations `loss` lies above the window's mean; None while the guard is off or the
        window is too short to judge."""
        if self.spike_zscore is None or len(self.recent) < self.spike_min_steps:
            return None
        n = len(self.recent)
        mean = math.fsum(self.recent) / n
        std = math.sqrt(math.fsum((x - mean) ** 2 for x in self.recent) / (n - 1))
        return (loss - mean) / max(std, 1e-8)

    def _skip(self, step: int, reason: str, why: str) -> Verdict:
        self.consecutive_skips += 1
        if self.consecutive_skips >= self.max_consecutive_skips:
            raise TrainingStopped(
                f"{self.consecutive_skips} consecutive optimizer steps were dropped, the last at step {step} ({why}): "
                "training stopped. The loss is diverging or has moved to a new level; lower the learning rate, "
                "resume from an earlier checkpoint, or raise StepGuard.spike_zscore / StepGuard.max_consecutive_skips"
            )
        return Verdict(False, reason)

    # ---------------------------------------------------------------------------------------------- as a callback
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # After the last micro-batch's backward, before clipping and the update: the one place to decide whether
        # the update happens.
        grad_norm = pl_module.step_grad_norm.get(trainer, optimizer, pl_module.parameters())  # None under DeepSpeed
        # The step's total loss: the mean of its micro-batches' objectives, as LanguageModel computed them (not the
        # loss the backward pass starts from, which is divided by the accumulation and fp16-scaled), reduced with
        # the norm in the collective whose result the module then logs.
        _, loss, norm = pl_module.step_losses.reduce(trainer.strategy, grad_norm)
        # fp16's gradient scaler skips overflowing steps itself and lowers its scale; that is not a divergence.
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        verdict = self.check(trainer.global_step, loss, None if scaler is not None else norm)
        if not verdict.apply:
            # With no gradients the optimizer leaves every parameter and its moments untouched; the step still
            # counts for the schedule and global_step, as a skipped batch does in PaLM and Megatron.
            optimizer.zero_grad(set_to_none=True)
            pl_module.print(f"step {trainer.global_step}: update dropped ({verdict.reason}; total loss {loss:.4g}"
                            + ("" if norm is None else f", gradient norm {norm:.4g}") + ")")
        if norm is not None:
            pl_module.log("train/grad_norm", norm)
        pl_module.log("train/skipped_nonfinite", float(self.skipped_nonfinite))
        pl_module.log("train/skipped_spikes", float(self.skipped_spikes))

    @property
    def skipped(self) -> int:
        return self.skipped_nonfinite + self.skipped_spikes

    def state_dict(self) -> dict:
        return {"recent": list(self.recent), "skipped_nonfinite": self.skipped_nonfinite,
                "skipped_spikes": self.skipped_spikes, "consecutive_skips": self.consecutive_skips}

    def load_state_dict(self, state: dict) -> None:
        self.recent.clear()
        self.recent.extend(state["recent"])
        self.skipped_nonfinite = int(state["skipped_nonfinite"])
        self.skipped_spikes = int(state["skipped_spikes"])
        self.consecutive_skips = int(state["consecutive_skips"])
