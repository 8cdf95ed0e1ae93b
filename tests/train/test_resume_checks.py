"""A resumed fit must continue the checkpoint's run: changed model, optimiser or schedule settings, or another
seed, are refused with a message naming each change; settings that only change how the run executes may differ.
(Changed data is refused by the DataModule's fingerprint: tests/data/test_datamodule.py, and below through the CLI.)
"""

from __future__ import annotations

import csv
import dataclasses
import random
import re

import numpy as np
import pytest
import torch

import cli
from moe.config import ModelConfig
from moe.errors import IncompatibleResume
from moe.train import LanguageModel
from moe.train.resume import hparam_changes, rng_states, set_rng_states

from ..cli_runs import tiny_run_args
from .test_module import TINY, PatternData, trainer


@pytest.fixture
def checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "1234")
    t = trainer(max_steps=2, limit_val_batches=0)
    t.fit(LanguageModel(TINY, warmup_steps=1), datamodule=PatternData())
    path = tmp_path / "step2.ckpt"
    t.save_checkpoint(path)
    return path


def resume(path, config=TINY, max_steps=3, **kwargs):
    module = LanguageModel(config, **{"warmup_steps": 1, **kwargs})
    trainer(max_steps=max_steps, limit_val_batches=0).fit(module, datamodule=PatternData(), ckpt_path=path)
    return module


@pytest.mark.parametrize("config, kwargs, message", [
    (TINY, {"lr": 1e-3}, "LanguageModel.lr: checkpoint 0.0003, now 0.001"),
    (TINY, {"schedule": "wsd"}, "LanguageModel.schedule: checkpoint 'cosine', now 'wsd'"),
    (TINY.replace(n_layers=3), {}, "ModelConfig.n_layers: checkpoint 2, now 3"),
    (TINY.replace(aux_loss_coef=0.1), {}, "ModelConfig.aux_loss_coef: checkpoint 0.01, now 0.1"),
])
def test_changed_settings_are_refused_by_name(checkpoint, config, kwargs, message):
    with pytest.raises(IncompatibleResume, match=re.escape(message)):
        resume(checkpoint, config, **kwargs)


def test_changed_seed_is_refused(checkpoint, monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    with pytest.raises(IncompatibleResume, match=re.escape("seed (seed_everything): checkpoint 1234, now 7")):
        resume(checkpoint)


def test_execution_settings_may_change(checkpoint):
    module = resume(checkpoint, TINY.replace(expert_backend="grouped"), activation_checkpointing=True,
                    default_callbacks=["ThroughputMonitor"])
    assert module.trainer.global_step == 3


def test_a_longer_run_warns_that_the_schedule_changes(checkpoint):
    # The checkpoint's cosine schedule spanned 2 steps (ending at 10% of the peak); over 4 steps with 1 of warmup,
    # step 2 is a third into the decay: 0.1 + 0.9 * (1 + cos(pi / 3)) / 2 = 0.775 of the peak 3e-4.
    message = r"spans 4 optimizer steps instead of the checkpoint's 2, so the learning rate at step 2 changes from " \
              r"3e-05 to 0\.0002325; pass LanguageModel\.total_steps=2"
    with pytest.warns(UserWarning, match=message):
        resume(checkpoint, max_steps=4)


def test_hparam_changes_lists_every_difference_and_nothing_else():
    # A checkpoint written before a ModelConfig field existed holds no value for it: the default is assumed.
    saved = {"lr": 1.0, "betas": (0.9, 0.95), "config": {"d_model": 8, "n_heads": 2, "expert_backend": "loop"},
             "compile": False}
    config = dataclasses.asdict(ModelConfig(d_model=8, n_heads=2, n_layers=3, expert_backend="grouped"))
    now = {"lr": 1.0, "betas": [0.9, 0.99], "config": config, "compile": True, "new": 1}
    assert hparam_changes(saved, now) == ["LanguageModel.betas: checkpoint [0.9, 0.95], now [0.9, 0.99]",
                                          "ModelConfig.n_layers: checkpoint 32, now 3",
                                          "LanguageModel.new: checkpoint (absent), now 1"]


def test_rng_states_round_trip_through_a_weights_only_load(tmp_path):
    torch.manual_seed(3)
    states = rng_states()
    torch.save(states, tmp_path / "rng.pt")
    want = (torch.rand(3), np.random.rand(2).tolist(), random.random())
    set_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), np.random.rand(2).tolist(), random.random())
    assert torch.equal(want[0], got[0]) and want[1:] == got[1:]


# ------------------------------------------------------------------------------------------------ command line


def test_cli_refuses_a_changed_resume_naming_the_flag(workdir, capsys):
    cli.main(["fit", *tiny_run_args(workdir)])
    last = next(workdir.glob("runs/quickstart/version_0/checkpoints/last.ckpt"))
    for change, named in [(["--model.lr", "0.5"], "--model.lr: checkpoint 0.003, now 0.5"),
                          (["--data.seed", "99"], "--data.seed: checkpoint 1234, now 99"),
                          (["--seed_everything", "5"], "seed (seed_everything): checkpoint 1234, now 5")]:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["fit", *tiny_run_args(workdir), "--trainer.max_steps", "8", "--ckpt_path", str(last), *change])
        assert exit_info.value.code == 2
        assert named in capsys.readouterr().err
    # The refused resumes left the run as it was; the same settings resume, in the same folder.
    metrics = workdir / "runs/quickstart/version_0/metrics.csv"
    assert len([row for row in csv.DictReader(metrics.open()) if row.get("train/loss")]) == 3
    cli.main(["fit", *tiny_run_args(workdir), "--trainer.max_steps", "8", "--ckpt_path", str(last)])
    steps = [torch.load(p, weights_only=True)["global_step"]
             for p in workdir.glob("runs/quickstart/version_*/checkpoints/last.ckpt")]
    assert steps == [8]
    assert [int(row["step"]) for row in csv.DictReader(metrics.open()) if row.get("train/loss")] == [1, 3, 5, 7]
