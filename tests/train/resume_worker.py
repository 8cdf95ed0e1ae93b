"""A training process for the resume tests: `cli.main` with a callback that records every optimizer step exactly
and can end the process at a chosen step, the way a crash or a preemption would.

Usage: python resume_worker.py <cli arguments>; the callback is configured in a --config file as
`resume_worker.StepRecorder`.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent.parent), str(HERE)]


from ddp_resilience_worker import step_guard


class StepRecorder(pl.Callback):
    def __init__(self, path: str, signal_at_step: int | None = None, signal_name: str = "SIGKILL",
                 dropout: float = 0.0, signal_in_validation: bool = False):
        """
        Args:
            path: JSON lines file; one line per optimizer step, floats as exact hex strings.
            signal_at_step: Send `signal_name` to this process in the backward pass of the micro-batch that runs
                when global_step reaches this value (mid-step: after the forward, before the update).
            signal_name: SIGKILL (a crash nothing can catch) or SIGTERM (a preemption).
            dropout: Dropout on the embeddings' output, so that training draws from torch's global generator and
                resuming must restore its state.
            signal_in_validation: Send the signal in the first validation batch after step `signal_at_step`.
        """
        self.path = Path(path)
        self.signal_at_step = signal_at_step
        self.signal = getattr(signal, signal_name)
        self.dropout = dropout
        self.in_validation = signal_in_validation
        self._micro_batches: list[dict] = []
        self._step_seen = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._step_seen = trainer.global_step

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.dropout:
            p = self.dropout
            pl_module.model.embed_tokens.register_forward_hook(
                lambda module, args, out: F.dropout(out, p, training=module.training))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        # With signal_in_validation: during the first validation after step `signal_at_step`, instead.
        if self.in_validation and not trainer.sanity_checking and trainer.global_step == self.signal_at_step:
            self.signal_at_step = None
            os.kill(os.getpid(), self.signal)

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if not self.in_validation and trainer.global_step == self.signal_at_step:
            self.signal_at_step = None  # once, even if the process survives (SIGTERM)
            os.kill(os.getpid(), self.signal)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = trainer.callback_metrics
        self._micro_batches.append({
            "loss": float(outputs["loss"]).hex(),
            "aux": float(metrics["train/aux_loss_micro_batch"]).hex(),
            "z": float(metrics["train/z_loss_micro_batch"]).hex(),
            "index": batch["index"].tolist(),
            "rows": [hash(tuple(row)) for row in batch["input_ids"].tolist()],
        })
        if trainer.global_step == self._step_seen:  # inside an accumulation cycle
            return
        self._step_seen = trainer.global_step
        record = {"step": trainer.global_step - 1, "lr": trainer.optimizers[0].param_groups[0]["lr"],
                  "micro_batches": self._micro_batches, "skipped": step_guard(trainer).skipped}
        record["lr"] = float(record["lr"]).hex()
        self._micro_batches = []
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    torch.set_num_threads(1)
    import cli

    cli.main(sys.argv[1:])
