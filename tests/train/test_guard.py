"""The step guard: a non-finite loss or gradient stops training before the update (or skips it), a loss spike is
skipped and counted, and the counters and window continue across a resume.

Unit tests check the z-score against numpy's; the Trainer tests corrupt chosen steps of a real LanguageModel
fit and compare weights and optimizer moments before and after them with torch.equal.
"""

from __future__ import annotations

import copy
import random

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from moe.errors import TrainingStopped
from moe.train import LanguageModel
from moe.train.guard import StepGuard

from .test_module import TINY, PatternData, trainer

# ------------------------------------------------------------------------------------------------ the guard alone


def test_zscore_is_numpys_over_the_last_window_of_applied_losses():
    guard = StepGuard(spike_zscore=3.0, spike_window=10, spike_min_steps=5)
    rng = random.Random(0)
    losses = [rng.uniform(2.0, 2.5) for _ in range(25)]
    for step, loss in enumerate(losses):
        guard.check(step, loss, 1.0)
    window = np.array(losses[-10:])
    want = (3.1 - window.mean()) / window.std(ddof=1)
    assert guard.zscore(3.1) == pytest.approx(want, rel=1e-12)


def test_spike_is_skipped_counted_and_left_out_of_the_window():
    guard = StepGuard(spike_zscore=4.0, spike_window=8, spike_min_steps=8)
    for step in range(8):
        assert guard.check(step, 2.0 + 0.01 * (step % 2), 1.0).apply
    before = list(guard.recent)
    verdict = guard.check(8, 5.0, 1.0)
    assert not verdict.apply and verdict.reason == "spike"
    assert guard.skipped_spikes == 1 and list(guard.recent) == before
    assert guard.check(9, 2.0, 1.0).apply and guard.consecutive_skips == 0


def test_spike_guard_waits_for_a_full_enough_window():
    guard = StepGuard(spike_zscore=1.0, spike_window=8, spike_min_steps=4)
    for step, loss in enumerate([2.0, 2.1, 2.0]):
        assert guard.check(step, loss, 1.0).apply
    assert guard.check(3, 100.0, 1.0).apply  # three losses are too few to judge
    assert not guard.check(4, 1000.0, 1.0).apply


@pytest.mark.parametrize("loss, norm, what", [(float("nan"), 1.0, "total loss"), (2.0, float("inf"), "gradient norm"),
                                               (float("-inf"), float("nan"), "total loss and gradient norm")])
def test_nonfinite_stops_naming_the_step_or_is_skipped(loss, norm, what):
    with pytest.raises(TrainingStopped, match=rf"non-finite {what} .* at step 7: training stopped before applying"):
        StepGuard().check(7, loss, norm)
    guard = StepGuard(on_nonfinite="skip")
    assert guard.check(7, loss, norm).reason == "nonfinite" and guard.skipped_nonfinite == 1


def test_gradient_overflow_is_left_to_the_fp16_scaler():
    assert StepGuard().check(3, 2.0, None).apply


def test_too_many_consecutive_skips_stop():
    guard = StepGuard(on_nonfinite="skip", max_consecutive_skips=3)
    guard.check(0, float("nan"), 1.0)
    guard.check(1, float("nan"), 1.0)
    with pytest.raises(TrainingStopped, match="3 consecutive optimizer steps were dropped, the last at step 2"):
        guard.check(2, float("nan"), 1.0)


def test_state_dict_round_trip_makes_the_same_decisions():
    rng = random.Random(1)
    losses = [rng.gauss(2.0, 0.05) + (3.0 if rng.random() < 0.1 else 0.0) for _ in range(200)]
    whole = StepGuard(spike_zscore=3.0, spike_window=16, spike_min_steps=8, max_consecutive_skips=100)
    first = StepGuard(spike_zscore=3.0, spike_window=16, spike_min_steps=8, max_consecutive_skips=100)
    want = [whole.check(step, loss, 1.0) for step, loss in enumerate(losses)]
    got = [first.check(step, loss, 1.0) for step, loss in enumerate(losses[:90])]
    second = StepGuard(spike_zscore=3.0, spike_window=16, spike_min_steps=8, max_consecutive_skips=100)
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    got += [second.check(step, loss, 1.0) for step, loss in enumerate(losses[90:], start=90)]
    assert got == want and second.state_dict() == whole.state_dict() and whole.skipped_spikes > 3


@pytest.mark.parametrize("kwargs", [{"on_nonfinite": "ignore"}, {"spike_zscore": 0.0}, {"spike_window": 1},
                                    {"max_consecutive_skips": 0}])
def test_bad_settings_name_the_field(kwargs):
    with pytest.raises(ValueError, match=f"StepGuard.{next(iter(kwargs))}"):
        StepGuard(**kwargs)


# ------------------------------------------------------------------------------------------------ inside a Trainer


class Faulty(LanguageModel):
    """Corrupts chosen optimizer steps: "nan_loss", "inf_grad" (finite loss, one infinite gradient entry) or
    "spike" (the loss, and so the gradients, 30x)."""

    def __init__(self, faults: dict[int, str] | None = None):
        super().__init__(TINY, warmup_steps=1, lr=1e-3)
        self.faults = faults or {}

    def objective(self, out, labels):
        parts = super().objective(out, labels)
        fault = self.faults.get(self.trainer.global_step)
        if fault == "nan_loss":
            parts["loss"] = parts["loss"] * float("nan")
        elif fault == "spike":
            parts["loss"] = parts["loss"] * 30
        return parts

    def on_after_backward(self):
        if self.faults.get(self.trainer.global_step) == "inf_grad":
            self.model.norm.weight.grad[0] = float("inf")


class Snapshots(pl.Callback):
    """Weights and optimizer moments before and after every step."""

    def __init__(self):
        self.before, self.after = {}, {}

    @staticmethod
    def state(trainer, module):
        optimizer = trainer.optimizers[0]
        moments = {i: {k: v.clone() for k, v in s.items()} for i, s in enumerate(optimizer.state.values())}
        return {k: v.clone() for k, v in module.model.state_dict().items()}, moments

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before[trainer.global_step] = self.state(trainer, module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.after[trainer.global_step - 1] = self.state(trainer, module)


def same(a, b) -> bool:
    weights_a, moments_a = a
    weights_b, moments_b = b
    return (all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
            and moments_a.keys() == moments_b.keys()
            and all(torch.equal(moments_a[i][k], moments_b[i][k]) for i in moments_a for k in moments_a[i]))


@pytest.mark.parametrize("fault", ["nan_loss", "inf_grad"])
def test_nonfinite_step_stops_before_the_update(fault):
    module, snapshots = Faulty({3: fault}), Snapshots()
    with pytest.raises(TrainingStopped, match="at step 3"):
        trainer(max_steps=6, limit_val_batches=0, callbacks=[snapshots]).fit(module, datamodule=PatternData())
    assert same(snapshots.before[3], Snapshots.state(module.trainer, module))  # weights and moments untouched
    assert not same(snapshots.before[2], snapshots.before[3])  # (the steps before did update)


@pytest.mark.parametrize("fault", ["nan_loss", "inf_grad"])
def test_nonfinite_step_is_skipped_on_request(fault):
    module, snapshots, guard = Faulty({3: fault}), Snapshots(), StepGuard(on_nonfinite="skip")
    t = trainer(max_steps=6, limit_val_batches=0, log_every_n_steps=1, callbacks=[snapshots, guard])
    t.fit(module, datamodule=PatternData())
    assert same(snapshots.before[3], snapshots.after[3])
    assert not same(snapshots.before[4], snapshots.after[4])  # training goes on
    assert t.global_step == 6 and guard.skipped_nonfinite == 1
    assert sum(isinstance(c, StepGuard) for c in t.callbacks) == 1  # the one given replaced the default
    assert float(t.callback_metrics["train/skipped_nonfinite"]) == 1
    assert all(torch.isfinite(p).all() for p in module.model.parameters())


def test_spike_is_skipped_and_the_count_survives_a_resume(tmp_path):
    """The spike at step 12 is dropped and counted; a run resumed from step 14 starts from the checkpoint's
    counter and window (not from zero) and still catches the spike at step 16."""
    settings = {"spike_zscore": 6.0, "spike_window": 8}
    faults = {12: "spike", 16: "spike"}
    module, snapshots, guard = Faulty(faults), Snapshots(), StepGuard(**settings)
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=14, save_top_k=-1,
                                         filename="{step}")
    t = trainer(max_steps=18, limit_val_batches=0, enable_checkpointing=True, callbacks=[snapshots, saver, guard])
    t.fit(module, datamodule=PatternData())
    assert same(snapshots.before[12], snapshots.after[12]) and same(snapshots.before[16], snapshots.after[16])
    assert not same(snapshots.before[13], snapshots.after[13])
    assert guard.skipped_spikes == 2
    callbacks = torch.load(tmp_path / "step=14.ckpt", weights_only=True)["callbacks"]
    saved = callbacks[guard.state_key]
    assert saved["skipped_spikes"] == 1 and len(saved["recent"]) == 8

    class GuardAtStart(pl.Callback):
        def __init__(self, guard):
            self.guard = guard

        def on_train_start(self, trainer, module):
            self.state = copy.deepcopy(self.guard.state_dict())

    resumed, resumed_guard = Faulty(faults), StepGuard(**settings)
    at_start = GuardAtStart(resumed_guard)
    trainer(max_steps=18, limit_val_batches=0, callbacks=[resumed_guard, at_start]).fit(
        resumed, datamodule=PatternData(), ckpt_path=tmp_path / "step=14.ckpt")
    assert at_start.state == saved
    assert resumed_guard.skipped_spikes == 2
