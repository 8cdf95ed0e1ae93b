"""The training progress bar in optimizer steps.

Lightning's TQDMProgressBar counts micro-batches of an epoch: with `max_steps` 20 and accumulation 2 it shows `0/20`
and then runs on to `40/?`, since an iterable dataset has no length. A run here is bounded by optimizer steps, so
`StepProgressBar` counts those against `max_steps`, starts a resumed run where it stopped, and shows the tokens
seen and the throughput (ThroughputMonitor's train/tokens_seen and perf/tokens_per_s) beside the losses.
Validation, test and predict bars are Lightning's.
"""

from __future__ import annotations

import math
import sys

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

# Shown on the bar, in this order, when logged: (metric, label).
SHOWN = [("train/loss", "loss"), ("val/loss", "val_loss"), ("train/tokens_seen", "tokens"),
         ("perf/tokens_per_s", "tok/s")]


def human(value: float) -> str:
    """1234567 -> '1.23M', 4521.3 -> '4.52k', 12.0 -> '12'."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


class StepProgressBar(TQDMProgressBar):
    """TQDMProgressBar whose training bar counts optimizer steps up to `trainer.max_steps` (or the steps the
    epochs imply), with loss, validation loss, tokens seen and tokens/s."""

    def total_steps(self, trainer) -> int | None:
        if trainer.max_steps and trainer.max_steps > 0:
            return trainer.max_steps
        estimated = trainer.estimated_stepping_batches
        return None if math.isinf(estimated) else int(estimated)

    def init_train_tqdm(self) -> Tqdm:
        # Lightning's bar, counting steps from the start (its first drawing would show `0/?`).
        return Tqdm(desc="train", total=self.total_steps(self.trainer), unit="step", position=2 * self.process_position,
                    disable=self.is_disabled, leave=True, dynamic_ncols=True, file=sys.stdout, smoothing=0,
                    bar_format=self.BAR_FORMAT)

    def on_train_epoch_start(self, trainer, *_) -> None:
        # Lightning's resets the bar to the epoch's micro-batches and names it "Epoch N".
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        bar = self.train_progress_bar
        bar.reset(total=self.total_steps(trainer))
        bar.n = trainer.global_step  # a resumed run starts where it stopped
        bar.refresh()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        step = trainer.global_step
        if bar is None or bar.disable or step == bar.n:  # still accumulating this step's micro-batches
            return
        if step % self.refresh_rate == 0 or step == bar.total:
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=True)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        bar = self.train_progress_bar
        if bar is not None and not bar.disable:
            bar.n = trainer.global_step
        super().on_train_epoch_end(trainer, pl_module)

    def get_metrics(self, trainer, pl_module) -> dict[str, str]:
        logged = trainer.callback_metrics
        shown = {}
        for name, label in SHOWN:
            if name in logged:
                value = float(logged[name])
                shown[label] = f"{value:.3f}" if name.endswith("loss") else human(value)
        return shown
