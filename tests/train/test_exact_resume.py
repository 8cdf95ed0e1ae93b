"""Exact resume of the real command line (`cli.main fit`) in subprocesses: killed with SIGKILL mid-step (twice
inside an epoch and once at an epoch boundary) or stopped by SIGTERM, then resumed from last.ckpt, a run takes the
same optimizer steps as one never interrupted - the same data rows, losses (cross-entropy with the MoE aux and z
losses), learning rates, and in the end bit-identical weights and optimizer moments.

Training draws from torch's global generator (dropout added by the worker), so the generator states must be in
the checkpoint too, and validation runs between steps, so it must leave the training stream alone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from .launch import code_corpus

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "resume_worker.py"
SEQ_LEN, BATCH = 16, 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path, int]:
    """A JSON lines corpus, its cache folder (shared by every process, so the tokenizer is trained once) and the
    number of optimizer steps in one epoch."""
    return code_corpus(tmp_path_factory.mktemp("corpus"), SEQ_LEN, BATCH)


class Finished:
    def __init__(self, process: subprocess.Popen):
        self.stdout, self.stderr = process.communicate(timeout=300)
        self.returncode = process.returncode


def run(*args, **kwargs) -> Finished:
    return Finished(start(*args, **kwargs))


def start(tmp_path: Path, corpus, name: str, max_steps: int, ckpt_dir: Path, ckpt_path: Path | None = None,
          signal_at: int | None = None, signal_name: str = "SIGKILL", accumulate: int = 1, every: int = 1,
          in_validation: bool = False) -> subprocess.Popen:
    """One training process; its step records go to <name>.jsonl."""
    path, cache, _ = corpus
    config = {
        "model": {
            "config": {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 32,
                       "max_seq_len": SEQ_LEN, "n_experts": 4, "top_k": 2, "aux_loss_coef": 0.01, "z_loss_coef": 0.001},
            "lr": 0.01, "warmup_steps": 2,
        },
        "data": {"sources": [{"path": str(path)}], "vocab_size": 300, "batch_size": BATCH, "num_workers": 0,
                 "val_fraction": 0.1, "cache_dir": str(cache)},
        "trainer": {
            "max_steps": max_steps, "accumulate_grad_batches": accumulate, "logger": False,
            "enable_progress_bar": False, "enable_model_summary": False,
            # Validation between steps (and the sanity check) must not disturb the training stream.
            "val_check_interval": 3, "check_val_every_n_epoch": None, "limit_val_batches": 2,
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(ckpt_dir), "every_n_train_steps": every, "save_last": True}},
                {"class_path": "moe.train.guard.StepGuard", "init_args": {"spike_zscore": 50.0, "spike_window": 4}},
                {"class_path": "resume_worker.StepRecorder",
                 "init_args": {"path": str(tmp_path / f"{name}.jsonl"), "signal_at_step": signal_at,
                               "signal_name": signal_name, "dropout": 0.1, "signal_in_validation": in_validation}},
            ],
        },
    }
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
    args = [sys.executable, str(WORKER), "fit", "--config", str(ROOT / "configs/model/tiny-moe.yaml"),
            "--config", str(ROOT / "configs/trainer/cpu.yaml"), "--config", str(tmp_path / f"{name}.yaml")]
    if ckpt_path is not None:
        args += ["--ckpt_path", str(ckpt_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    return subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def records(tmp_path: Path, *names: str) -> dict[int, dict]:
    """Step -> record over the given runs; a step recorded again by a later run must be recorded identically."""
    steps: dict[int, dict] = {}
    for name in names:
        for line in (tmp_path / f"{name}.jsonl").read_text().splitlines():
            record = json.loads(line)
            assert steps.setdefault(record["step"], record) == record, f"step {record['step']} differs on replay"
    return steps


def as_tensors(steps: dict[int, dict]) -> dict[str, torch.Tensor]:
    micro = [m for step in sorted(steps) for m in steps[step]["micro_batches"]]
    return {
        "step": torch.tensor(sorted(steps)),
        "lr": torch.tensor([float.fromhex(steps[s]["lr"]) for s in sorted(steps)], dtype=torch.float64),
        "loss": torch.tensor([float.fromhex(m["loss"]) for m in micro], dtype=torch.float64),
        "aux": torch.tensor([float.fromhex(m["aux"]) for m in micro], dtype=torch.float64),
        "z": torch.tensor([float.fromhex(m["z"]) for m in micro], dtype=torch.float64),
        "index": torch.tensor([m["index"] for m in micro]),
        "rows": torch.tensor([m["rows"] for m in micro]),
    }


def assert_same_state(reference: Path, resumed: Path) -> None:
    """Both last.ckpt files hold the same step, bit-identical weights and optimizer moments."""
    a, b = (torch.load(p, map_location="cpu", weights_only=True) for p in (reference, resumed))
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    moments_a, moments_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for index in moments_a:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(moments_a[index][name], moments_b[index][name]), (index, name)
    assert a["lr_schedulers"] == b["lr_schedulers"]
    guard = next(key for key in a["callbacks"] if key.startswith("StepGuard"))
    assert a["callbacks"][guard] == b["callbacks"][guard]


def assert_same_run(tmp_path: Path, reference: str, *legs: str, steps: int, per_epoch: int) -> None:
    want, got = as_tensors(records(tmp_path, reference)), as_tensors(records(tmp_path, *legs))
    assert got["step"].tolist() == list(range(steps))
    for key in want:
        assert torch.equal(want[key], got[key]), key
    total_micro_batches = len(got["loss"])
    assert bool((got["aux"] > 0).all() and (got["z"] > 0).all())
    # Every training row once per epoch: distinct rows within an epoch, and the epoch covers all its samples.
    for first in range(0, total_micro_batches, per_epoch):
        epoch_rows = got["rows"][first:first + per_epoch].flatten().tolist()
        assert len(set(epoch_rows)) == len(epoch_rows)
        epoch_index = sorted(got["index"][first:first + per_epoch].flatten().tolist())
        assert epoch_index == list(range(first * BATCH, first * BATCH + len(epoch_index)))


def test_sigkill_mid_step_then_resume_is_exact(tmp_path, corpus):
    per_epoch = corpus[2]
    assert per_epoch >= 6, "the corpus must give two kills inside the first epoch"
    total = per_epoch + 3
    reference = start(tmp_path, corpus, "reference", total, tmp_path / "reference")  # beside the interrupted runs

    chain = tmp_path / "chain"
    # Killed during step 2's and step 4's backward (inside epoch 0), then at the first step of epoch 1; each time
    # resumed from last.ckpt, which holds the step before.
    previous = None
    legs = []
    for leg, kill_at in enumerate([2, 4, per_epoch]):
        result = run(tmp_path, corpus, f"leg{leg}", total, chain, ckpt_path=previous, signal_at=kill_at)
        assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
        previous = chain / "last.ckpt"
        assert torch.load(previous, map_location="cpu", weights_only=True)["global_step"] == kill_at
        legs.append(f"leg{leg}")
    result = run(tmp_path, corpus, "final", total, chain, ckpt_path=previous)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = Finished(reference)
    assert reference.returncode == 0, reference.stderr[-3000:]

    assert_same_run(tmp_path, "reference", *legs, "final", steps=total, per_epoch=per_epoch)
    assert_same_state(tmp_path / "reference" / "last.ckpt", chain / "last.ckpt")


def interrupt_and_resume(tmp_path: Path, corpus, total: int, saved_step: int, **signal) -> Path:
    """An uninterrupted run beside one that receives SIGTERM (`signal`: where), which must save `saved_step` to
    last.ckpt and exit with 143, and its resumption; the two must take the same steps and end in the same state."""
    common = {"every": total, "accumulate": signal.pop("accumulate", 1)}
    reference = start(tmp_path, corpus, "reference", total, tmp_path / "reference", **common)
    interrupted = run(tmp_path, corpus, "interrupted", total, tmp_path / "run", signal_name="SIGTERM", **signal,
                      **common)
    assert interrupted.returncode == 143, interrupted.stderr[-3000:]
    assert "SIGTERM: saved" in interrupted.stderr + interrupted.stdout
    last = tmp_path / "run" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == saved_step
    assert len(records(tmp_path, "interrupted")) == saved_step  # nothing ran after the saved step

    resumed = run(tmp_path, corpus, "resumed", total, tmp_path / "run", ckpt_path=last, **common)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = Finished(reference)
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "run").glob("last*")) == ["last.ckpt"]  # resumable by the same path
    assert_same_run(tmp_path, "reference", "interrupted", "resumed", steps=total, per_epoch=corpus[2])
    assert_same_state(tmp_path / "reference" / "last.ckpt", last)
    return last


def test_sigterm_saves_then_exits_and_resume_is_exact(tmp_path, corpus):
    """Under gradient accumulation: SIGTERM arrives in the first of step 2's two micro-batches; the process
    finishes that step (the whole accumulation cycle), writes last.ckpt, and exits with 143. No periodic checkpoint
    exists to fall back on. (Lightning steps on the last batch of an epoch even when it ends a cycle early.)"""
    interrupt_and_resume(tmp_path, corpus, total=5, saved_step=3, signal_at=2, accumulate=2)


def test_sigterm_during_validation_saves_the_step_before_it(tmp_path, corpus):
    """Validation runs after steps 3 and 6; SIGTERM in the first one ends it early, and the checkpoint then holds
    step 3 whole. The resumed run validates again and continues exactly."""
    interrupt_and_resume(tmp_path, corpus, total=5, saved_step=3, signal_at=3, in_validation=True)
