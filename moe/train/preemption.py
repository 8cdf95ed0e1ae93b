"""Checkpoint on SIGTERM, then exit: what a preempted or timed-out job (SLURM, Kubernetes, spot instances)
receives before it is killed.

Lightning's signal handler only records the signal, and its loop then ends the run after the current batch:
everything since the last periodic checkpoint would be lost. This callback takes the signal over from Lightning
and saves after the next optimizer step (under gradient accumulation, once the accumulation cycle is complete,
since the partial gradients are not part of a checkpoint), in the same place of the loop as ModelCheckpoint's
step-based saves so that resuming from it is the well-trodden path, as `last.ckpt` beside the run's other
checkpoints. It then exits with status 143 (128 + SIGTERM), skipping validation and end-of-training work that
would eat into the grace period.

A signal that arrives during validation inside `fit` ends the validation at its next batch (Lightning's own
behaviour); the checkpoint is then written from `on_exception`, with the training loop at the step just finished.

All processes must save together (a save is collective), so the decision is reduced over processes at each step:
a signal received by any of them stops all of them at the same step. With several processes our own handler
replaces Lightning's, which would deadlock them (see `_take_over_signal`); there a signal during validation is
acted on after the next training step.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

EXIT_STATUS = 143


class CheckpointOnSigterm(pl.Callback):
    def __init__(self, enabled: bool = True, dirpath: str | None = None):
        """
        Args:
            enabled: Save a checkpoint and exit when the process receives SIGTERM during training.
            dirpath: Folder of the checkpoint; None uses the ModelCheckpoint callback's folder, or
                <log_dir>/checkpoints without one.
        """
        self.enabled = enabled
        self.dirpath = dirpath
        self.saved_to: Path | None = None
        self._step_seen = 0
        self._pending = False

    def checkpoint_path(self, trainer: pl.Trainer) -> Path:
        if self.dirpath is not None:
            folder = Path(self.dirpath)
        elif isinstance(trainer.checkpoint_callback, ModelCheckpoint) and trainer.checkpoint_callback.dirpath:
            folder = Path(trainer.checkpoint_callback.dirpath)
        else:
            folder = Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
        return folder / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module) -> None:
        self._take_over_signal(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module) -> None:
        self._step_seen = trainer.global_step
        self._take_over_signal(trainer)

    def _take_over_signal(self, trainer: pl.Trainer) -> None:
        # Called after Lightning registered its handlers (before the sanity check, or at the start of training).
        if self.enabled and trainer.world_size > 1 and threading.current_thread() is threading.main_thread():
            # Lightning's handler (>= 2.5.2) calls dist.broadcast inside the signal handler: a collective that only
            # the signalled process enters, wherever it is in the step, so the processes deadlock (one waits in the
            # broadcast, the others in the gradient all-reduce). Only record the signal here; on_train_batch_end
            # agrees on it over processes at the end of the step. Lightning's teardown restores the previous handler.
            signal.signal(signal.SIGTERM, self._record_sigterm)

    def _record_sigterm(self, signum, frame) -> None:
        self._pending = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self.enabled:
            return
        if trainer.received_sigterm:
            # Taken over from Lightning, whose loop would otherwise stop after this batch, possibly in the middle
            # of an accumulation cycle. (Private attribute: Lightning has no public way to defer the stop.)
            self._pending = True
            trainer._signal_connector.received_sigterm = False
        stepped = trainer.global_step != self._step_seen  # the same on every process
        self._step_seen = trainer.global_step
        if not stepped:
            return
        pending = self._pending
        if trainer.world_size > 1:
            flag = torch.tensor(float(pending), device=pl_module.device)
            pending = bool(trainer.strategy.reduce(flag, reduce_op="sum").item() > 0)
        if pending:
            self._save(trainer)
            raise SIGTERMException(EXIT_STATUS)

    def on_exception(self, trainer: pl.Trainer, pl_module, exception: BaseException) -> None:
        # Lightning's own stop on SIGTERM, raised during validation inside fit: the training loop is between steps.
        if (self.enabled and isinstance(exception, SIGTERMException) and self.saved_to is None
                and trainer.state.fn == "fit" and not trainer.sanity_checking and trainer.global_step > 0):
            self._save(trainer)
            exception.code = EXIT_STATUS  # Lightning raises it without a status, which would exit with 0

    def _save(self, trainer: pl.Trainer) -> None:
        path = self.checkpoint_path(trainer)
        callback = trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath == str(path.parent):
            # Recorded in the checkpoint's callback state: the resumed ModelCheckpoint then treats last.ckpt as its
            # own and keeps writing there, instead of starting a last-v1.ckpt beside it.
            callback.last_model_path = str(path)
        trainer.save_checkpoint(path)
        self.saved_to = path
        rank_zero_info(f"SIGTERM: saved {path} after step {trainer.global_step}; resume with --ckpt_path {path}")
