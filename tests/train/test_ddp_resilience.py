"""The multi-process promises of docs/resume.md, in real 2-process DDP runs on CPU (gloo, Lightning's own launcher,
`cli.main`): SIGTERM received by one process only stops every process at the same step, with one last.ckpt from
which a resumed run takes the same steps as one never interrupted; a non-finite loss on one process stops every
process at the same step, or with `on_nonfinite skip` drops the same update on every process.

A run must end on its own: one still going after RUN_TIMEOUT seconds is a hang (a collective that one rank never
reaches), and is killed and fails its test. Startup (importing torch and Lightning, twice per run, one rank after
the other) is nearly all of a run's time, so one fixture starts the file's runs side by side.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from .launch import code_corpus

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "ddp_resilience_worker.py"
SEQ_LEN, BATCH, RANKS = 16, 4, 2
RUN_TIMEOUT = 120  # seconds; a passing run takes about 10, or 30 beside the file's other runs

TOTAL, SIGNAL_AT = 5, 2  # SIGTERM in step 2's backward: step 2 completes, last.ckpt holds global step 3
# Who receives SIGTERM: the launching process only (`kill`, a Kubernetes pod deletion), or only a process it started.
# (SLURM signals every task, {"every-rank": [0, 1]}: the same agreement at the end of the step; each run costs ~5 s.)
SIGNALLED = {"rank0": [0], "rank1": [1]}
GUARD_STEPS, NONFINITE_AT = 4, 2  # rank 1's loss is NaN at step 2


class Run:
    """One `fit` on two processes: rank 0 is the process started here, and starts rank 1 itself."""

    def __init__(self, tmp_path: Path, corpus: tuple[Path, Path], name: str, max_steps: int,
                 ckpt_path: Path | None = None, on_nonfinite: str = "stop", **recorder):
        self.name, self.folder = name, tmp_path / name  # the working directory: Lightning writes config.yaml there
        self.folder.mkdir()
        self.prefix, self.ckpt_dir = self.folder / "record", self.folder / "checkpoints"
        path, cache = corpus
        config = {
            "model": {
                "config": {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 32,
                           "max_seq_len": SEQ_LEN, "n_experts": 4, "top_k": 2, "aux_loss_coef": 0.01,
                           "z_loss_coef": 0.001},
                "lr": 0.01, "warmup_steps": 2,
            },
            "data": {"sources": [{"path": str(path)}], "vocab_size": 300, "batch_size": BATCH, "num_workers": 0,
                     "val_fraction": 0.1, "cache_dir": str(cache)},
            "trainer": {
                "devices": RANKS, "strategy": "ddp", "max_steps": max_steps, "logger": False,
                "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 0,
                "num_sanity_val_steps": 0,
                "callbacks": [
                    # No periodic checkpoint before the end: last.ckpt of an interrupted run is the SIGTERM one.
                    {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                     "init_args": {"dirpath": str(self.ckpt_dir), "every_n_train_steps": max_steps,
                                   "save_last": True}},
                    {"class_path": "moe.train.guard.StepGuard", "init_args": {"on_nonfinite": on_nonfinite}},
                    {"class_path": "ddp_resilience_worker.RankRecorder",
                     "init_args": {"prefix": str(self.prefix), **recorder}},
                ],
            },
        }
        (self.folder / "run.yaml").write_text(yaml.safe_dump(config))
        args = [sys.executable, str(WORKER), "fit", "--config", str(ROOT / "configs/model/tiny-moe.yaml"),
                "--config", str(ROOT / "configs/trainer/cpu.yaml"), "--config", str(self.folder / "run.yaml")]
        if ckpt_path is not None:
            args += ["--ckpt_path", str(ckpt_path)]
        env = {k: v for k, v in os.environ.items()
               if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK")}
        env["OMP_NUM_THREADS"] = "1"
        # A session of its own, so that a hung run is killed with the rank it started.
        self.process = subprocess.Popen(args, cwd=self.folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, start_new_session=True)
        self.started, self.returncode, self.hung = time.monotonic(), None, ""

    def finish(self) -> Run:
        """Waits for rank 0, then for every other rank; a run still going after RUN_TIMEOUT seconds, or a rank still
        there 30 s after rank 0 ended, is killed and marked as hung."""
        if self.returncode is not None:
            return self
        try:
            self.stdout, self.stderr = self.process.communicate(
                timeout=max(1.0, self.started + RUN_TIMEOUT - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            self.stdout, self.stderr = self.process.communicate()
            self.hung = f"still running after {RUN_TIMEOUT} s"
        self.returncode = self.process.returncode
        for rank in range(1, RANKS):  # rank 1 is rank 0's child, not ours: watch its pid
            pid_file = self.rank_file(rank, "pid")
            if not self.hung and pid_file.exists() and not _ended(int(pid_file.read_text()), timeout=30):
                self.kill()
                self.hung = f"rank {rank} still running 30 s after rank 0 ended"
        return self

    def kill(self) -> None:
        """Ends every process of the run that is still there."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def rank_file(self, rank: int, suffix: str) -> Path:
        return Path(f"{self.prefix}.rank{rank}.{suffix}")

    def records(self, rank: int) -> list[dict]:
        path = self.rank_file(rank, "jsonl")
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def exit(self, rank: int) -> dict:
        path = self.rank_file(rank, "exit.json")
        return json.loads(path.read_text()) if path.exists() else {"exception": "(rank wrote nothing)"}

    def weights(self, rank: int) -> dict[str, torch.Tensor]:
        return torch.load(self.rank_file(rank, "pt"), weights_only=True)

    def checkpoint(self) -> dict:
        return torch.load(self.ckpt_dir / "last.ckpt", weights_only=True)

    def output(self) -> str:
        return f"{self.name}: {self.hung or 'exit status'} {self.returncode}\n{self.stderr[-4000:]}"


def _ended(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):  # exited, not yet reaped by whichever process adopted it
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Iterator[dict[str, Run]]:
    """Every run of the file, side by side: the uninterrupted reference and one run per SIGNALLED case; then, once
    `sigterm-rank1` has ended, its resumption and the two step-guard runs."""
    tmp_path = tmp_path_factory.mktemp("ddp")
    corpus = code_corpus(tmp_path, SEQ_LEN, BATCH)[:2]  # shared by every process: one tokenizer, one cache

    runs = {"reference": Run(tmp_path, corpus, "reference", TOTAL)}
    try:
        # Two waves of three runs, so that the resumed run need not wait for more than its own wave.
        for name, ranks in SIGNALLED.items():
            runs[f"sigterm-{name}"] = Run(tmp_path, corpus, f"sigterm-{name}", TOTAL, sigterm_ranks=ranks,
                                          sigterm_step=SIGNAL_AT)
        interrupted = runs["sigterm-rank1"].finish()
        if (interrupted.ckpt_dir / "last.ckpt").exists():
            runs["resumed"] = Run(tmp_path, corpus, "resumed", TOTAL, ckpt_path=interrupted.ckpt_dir / "last.ckpt")
        for action in ("stop", "skip"):
            runs[f"nonfinite-{action}"] = Run(tmp_path, corpus, f"nonfinite-{action}", GUARD_STEPS,
                                              on_nonfinite=action, nonfinite_rank=1, nonfinite_step=NONFINITE_AT)
        runs["disk-full"] = Run(tmp_path, corpus, "disk-full", GUARD_STEPS, disk_full_rank=0)
        for run in runs.values():
            run.finish()
        yield runs
    finally:
        for run in runs.values():
            run.kill()


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


def assert_same_checkpoint(a: object, b: object, where: str = "checkpoint") -> None:
    """Equal values, tensors bit for bit; ModelCheckpoint's state (the folder names) left out."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            if key != "callbacks":
                assert_same_checkpoint(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_checkpoint(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


# ---------------------------------------------------------------------------------------------------------- SIGTERM
@pytest.mark.parametrize("signalled", SIGNALLED)
def test_sigterm_stops_every_rank_at_the_same_step(runs, signalled):
    """Whichever processes receive SIGTERM mid-step, every rank finishes the step in flight and leaves training at
    the same step with SIGTERMException(143); one last.ckpt holds that step; the launching process exits with 143
    and no rank is left running. (Rank 1's exit status goes to rank 0, not to us: its record of the exception
    stands for it.)"""
    run = runs[f"sigterm-{signalled}"]
    assert not run.hung and run.returncode == 143, run.output()
    assert "SIGTERM: saved" in run.stderr + run.stdout
    for rank in range(RANKS):
        assert run.exit(rank) == {"exception": "SIGTERMException", "code": 143, "message": "143",
                                  "global_step": SIGNAL_AT + 1}, (rank, run.output())
        assert [r["step"] for r in run.records(rank)] == list(range(SIGNAL_AT + 1)), rank  # nothing after it
    assert sorted(p.name for p in run.ckpt_dir.iterdir()) == ["last.ckpt"]
    assert run.checkpoint()["global_step"] == SIGNAL_AT + 1


def test_sigterm_checkpoint_is_the_same_whichever_ranks_received_it(runs):
    """The states saved after SIGTERM at the same step to rank 0 and to rank 1 are the same, bit for bit:
    weights, optimizer moments, schedule, generator states, data position, loop counters and guard state. So the
    exact resume shown from one of them (next test) holds for all."""
    first, *others = (runs[f"sigterm-{name}"].checkpoint() for name in SIGNALLED)
    for other in others:
        assert_same_checkpoint(first, other)


def test_resume_after_sigterm_under_ddp_is_exact(runs):
    """Resumed on two processes from the last.ckpt written when rank 1 received SIGTERM, the run takes the same
    steps as the uninterrupted one on every rank (data rows, loss and learning rate, bit for bit) and ends with the
    same weights on every rank and the same final checkpoint."""
    reference, interrupted = runs["reference"], runs["sigterm-rank1"]
    assert not reference.hung and reference.returncode == 0, reference.output()
    assert "resumed" in runs, interrupted.output()
    resumed = runs["resumed"]
    assert not resumed.hung and resumed.returncode == 0, resumed.output()
    for rank in range(RANKS):
        want = reference.records(rank)
        assert [r["step"] for r in want] == list(range(TOTAL))
        assert interrupted.records(rank) + resumed.records(rank) == want, rank
        assert_same_weights(reference.weights(rank), resumed.weights(rank))
    # Weights, AdamW moments, schedule, guard state and generator states (the loops' restart counters differ).
    a, b = reference.checkpoint(), resumed.checkpoint()
    for key in ("global_step", "state_dict", "optimizer_states", "lr_schedulers"):
        assert_same_checkpoint(a[key], b[key], key)
    ours = [key for key in a["callbacks"] if key.startswith(("StepGuard", "RestoreRNG", "ThroughputMonitor"))]
    assert len(ours) == 3
    for key in ours:
        assert_same_checkpoint(a["callbacks"][key], b["callbacks"][key], key)
    assert_same_weights({f"model.{k}": v for k, v in resumed.weights(0).items()}, b["state_dict"])


# ------------------------------------------------------------------------------------------------------- step guard
def test_nonfinite_loss_on_one_rank_stops_every_rank_at_that_step(runs):
    """Rank 1's loss is NaN at step 2 (its gradients are finite, so only the loss tells the ranks apart). Every rank
    raises TrainingStopped naming step 2, before applying it (the ranks' weights are still the same), and the
    launching process exits with the CLI's status 1 and message; no rank waits in a collective."""
    run = runs["nonfinite-stop"]
    assert not run.hung and run.returncode == 1, run.output()
    assert "training stopped: non-finite total loss" in run.stderr, run.output()
    for rank in range(RANKS):
        ended = run.exit(rank)
        assert ended["exception"] == "TrainingStopped" and ended["global_step"] == NONFINITE_AT, (rank, ended)
        assert f"at step {NONFINITE_AT}:" in ended["message"]
        assert [r["step"] for r in run.records(rank)] == list(range(NONFINITE_AT)), rank
    assert_same_weights(run.weights(0), run.weights(1))


def test_nonfinite_loss_on_one_rank_is_skipped_on_every_rank(runs):
    """With on_nonfinite skip, every rank drops the update of step 2 and goes on: each counts one skipped step
    from step 2 on, and the runs end with the same weights on every rank."""
    run = runs["nonfinite-skip"]
    assert not run.hung and run.returncode == 0, run.output()
    for rank in range(RANKS):
        assert run.exit(rank) == {"exception": None, "global_step": GUARD_STEPS}, rank
        skipped = [r["skipped"] for r in run.records(rank)]
        assert skipped == [0] * NONFINITE_AT + [1] * (GUARD_STEPS - NONFINITE_AT), rank
    assert_same_weights(run.weights(0), run.weights(1))


# ---------------------------------------------------------------------------------------------------------- full disk
def test_a_full_disk_on_rank_0_stops_every_rank_with_one_line(runs):
    """Only rank 0 writes a checkpoint while the others wait in a barrier: a failed write must reach every rank
    (checkpoint_io.install_atomic_checkpoint_io), not leave them waiting or dying with a traceback."""
    run = runs["disk-full"].finish()
    assert not run.hung and run.returncode == 2, run.output()
    for rank in range(RANKS):
        assert run.exit(rank)["exception"] == "CheckpointNotSaved", (rank, run.output())
    assert "error: could not save checkpoint" in run.stderr and "No space left on device" in run.stderr
    assert "Traceback" not in run.stderr, run.output()
    assert not list(run.ckpt_dir.iterdir())  # nothing half-written, no temporary left
