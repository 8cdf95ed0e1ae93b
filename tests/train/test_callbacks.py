"""The training layer's callbacks on their own, and how LanguageModel registers them: every default once, one given
in `trainer.callbacks` (from Python or YAML) instead of its default, `default_callbacks` to turn them off."""

import json

import lightning.pytorch as pl
import pytest
import torch

import cli
from moe.train import LanguageModel
from moe.train.default_callbacks import DEFAULT_CALLBACKS
from moe.train.guard import StepGuard
from moe.train.resume import RestoreRNG
from moe.train.routing_metrics import RouterSums
from moe.train.throughput import ThroughputMonitor

from ..cli_runs import tiny_run_args
from .test_module import TINY, PatternData, trainer


def fitted(module=None, max_steps=2, **kwargs):
    module = module or LanguageModel(TINY, warmup_steps=1)
    t = trainer(max_steps=max_steps, limit_val_batches=0, log_every_n_steps=1, **kwargs)
    t.fit(module, datamodule=PatternData())
    return t


def of_type(t, kind):
    return [c for c in t.callbacks if isinstance(c, kind)]


def test_every_default_is_registered_once_and_a_given_one_replaces_its_default():
    guard = StepGuard(on_nonfinite="skip")
    t = fitted(callbacks=[guard])
    for kind in DEFAULT_CALLBACKS.values():
        assert len(of_type(t, kind)) == 1, kind
    assert of_type(t, StepGuard) == [guard]
    for name in ("train/grad_norm", "train/skipped_nonfinite", "perf/tokens_per_s", "train/tokens_seen",
                 "train/aux_loss", "train/z_loss", "experts/max_over_mean"):
        assert name in t.callback_metrics, name


def test_defaults_can_be_turned_off_by_name():
    t = fitted(LanguageModel(TINY, warmup_steps=1, default_callbacks=["StepGuard"]))
    assert not of_type(t, ThroughputMonitor) and len(of_type(t, StepGuard)) == 1
    assert "perf/tokens_per_s" not in t.callback_metrics and "experts/idle" not in t.callback_metrics
    assert "train/loss" in t.callback_metrics and "train/grad_norm" in t.callback_metrics


def test_throughput_monitor_counts_tokens_and_continues_them_after_a_resume():
    monitor = ThroughputMonitor(peak_tflops=100.0)
    t = fitted(callbacks=[monitor])
    assert float(t.callback_metrics["train/tokens_seen"]) == 2 * 8 * 32
    assert "perf/mfu" in t.callback_metrics  # a peak was given
    resumed = ThroughputMonitor()
    resumed.load_state_dict(monitor.state_dict())
    t = fitted(callbacks=[resumed], max_steps=1)
    assert float(t.callback_metrics["train/tokens_seen"]) == 3 * 8 * 32


def test_restore_rng_puts_the_saved_states_back_when_training_starts():
    saver, restorer = RestoreRNG(), RestoreRNG()
    torch.manual_seed(3)
    state = saver.state_dict()
    expected = torch.rand(4)
    restorer.load_state_dict(state)
    torch.rand(100)  # what set-up between loading and training would draw
    restorer.on_train_start(None, None)
    assert torch.equal(torch.rand(4), expected)


def test_router_sums_of_one_micro_batch_give_its_own_losses():
    module = LanguageModel(TINY)
    module.configure_model()
    batch = next(iter(PatternData().train_dataloader()))
    out = module.model(batch["input_ids"])
    aux, z = RouterSums.of(out.moe).losses()
    assert float(aux) == pytest.approx(float(out.aux_loss), rel=1e-6)
    assert float(z) == pytest.approx(float(out.z_loss), rel=1e-6)
    doubled = RouterSums.of(out.moe) + RouterSums.of(out.moe)  # the same routing twice: the same losses
    assert float(doubled.losses()[0]) == pytest.approx(float(aux), rel=1e-6)


def test_the_guard_is_configured_from_the_command_line_and_defaults_turned_off(workdir):
    args = [*tiny_run_args(workdir), "--trainer.max_steps", "2",
            "--trainer.callbacks+=moe.train.guard.StepGuard", "--trainer.callbacks.on_nonfinite", "skip",
            "--model.default_callbacks", json.dumps(["StepGuard", "RestoreRNG"])]
    parsed = cli.build_cli(args, run=False)
    parsed.trainer.fit(parsed.model, datamodule=parsed.datamodule)
    (guard,) = of_type(parsed.trainer, StepGuard)
    assert guard.on_nonfinite == "skip"
    assert not of_type(parsed.trainer, ThroughputMonitor) and len(of_type(parsed.trainer, RestoreRNG)) == 1


def test_a_capacity_limit_logs_the_fraction_of_assignments_it_dropped():
    t = fitted(LanguageModel(TINY.replace(capacity_factor=0.5), warmup_steps=1))
    # Half the even share fits: at least half of the assignments are dropped.
    assert 0.5 <= float(t.callback_metrics["experts/dropped_fraction"]) < 1.0
    assert "experts/dropped_fraction" not in fitted().callback_metrics  # dropless: nothing to report


def test_a_checkpoint_written_before_the_callbacks_resumes_their_state(tmp_path):
    """Guard window, random states and tokens seen were top-level keys of the checkpoint; they reach the callbacks
    that keep them now, and the old guard settings are named in a warning."""
    t = fitted(max_steps=2, default_root_dir=tmp_path)
    t.save_checkpoint(tmp_path / "new.ckpt")
    checkpoint = torch.load(tmp_path / "new.ckpt", weights_only=True)
    callbacks = checkpoint["callbacks"]
    checkpoint["step_guard"] = saved_guard = callbacks.pop("StepGuard")
    checkpoint["rng_states"] = callbacks.pop("RestoreRNG")["rng_states"]
    checkpoint["tokens_seen"] = callbacks.pop("ThroughputMonitor")["tokens_seen"]
    checkpoint["hyper_parameters"].update(on_nonfinite="skip", spike_zscore=None)
    torch.save(checkpoint, tmp_path / "old.ckpt")
    guard, restored = StepGuard(), []

    class Window(pl.Callback):
        def on_train_start(self, trainer, module):
            restored.append(list(guard.recent))

    module = LanguageModel(TINY, warmup_steps=1)
    t = trainer(max_steps=4, limit_val_batches=0, log_every_n_steps=1, callbacks=[guard, Window()])
    with pytest.warns(UserWarning, match="the checkpoint's run set the step guard's on_nonfinite='skip'"):
        t.fit(module, datamodule=PatternData(), ckpt_path=tmp_path / "old.ckpt")
    assert restored == [saved_guard["recent"]] and len(restored[0]) == 2
    assert float(t.callback_metrics["train/tokens_seen"]) == 4 * 8 * 32
