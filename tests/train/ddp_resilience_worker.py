"""A 2-process DDP training run on CPU (gloo) for test_ddp_resilience.py: `cli.main` with a callback that records
every optimizer step on every rank, and that can, on one chosen rank only, send that process SIGTERM mid-step or
make the loss of one step non-finite.

Usage: python ddp_resilience_worker.py <cli arguments>; the callback is configured in a --config file as
`ddp_resilience_worker.RankRecorder`. Lightning's launcher starts rank 1 by running the same command again.
"""

from __future__ import annotations

import errno
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


def step_guard(trainer):
    from moe.train.guard import StepGuard

    (guard,) = [c for c in trainer.callbacks if isinstance(c, StepGuard)]
    return guard


class RankRecorder(pl.Callback):
    def __init__(self, prefix: str, sigterm_ranks: list[int] | None = None, sigterm_step: int | None = None,
                 nonfinite_rank: int | None = None, nonfinite_step: int | None = None, dropout: float = 0.1,
                 disk_full_rank: int | None = None):
        """
        Args:
            prefix: Path prefix of what each rank writes: <prefix>.rank<r>.pid (its process id),
                <prefix>.rank<r>.jsonl (one line per optimizer step, floats as exact hex strings),
                <prefix>.rank<r>.exit.json (how training ended: the exception, or none) and <prefix>.rank<r>.pt (the
                weights at that point).
            sigterm_ranks: The ranks that send themselves SIGTERM in the backward pass of step `sigterm_step`
                (mid-step: after the forward, before the gradients are reduced and the update).
            sigterm_step: See sigterm_ranks.
            nonfinite_rank: The rank whose loss at step `nonfinite_step` is made NaN by adding a NaN constant. The
                gradients stay finite (the constant has none), so only the loss differs between the ranks: under
                DDP the gradients are averaged over processes, the loss is what a rank could judge alone.
            nonfinite_step: See nonfinite_rank.
            dropout: Dropout on the embeddings' output, so that training draws from torch's global generator and
                resuming must restore its state.
            disk_full_rank: The rank whose checkpoint writes fail as on a full disk (ENOSPC), as atomic_save writes
                them (a hidden temporary file beside the checkpoint); its other files are written.
        """
        self.prefix = prefix
        self.sigterm_ranks, self.sigterm_step = sigterm_ranks or [], sigterm_step
        self.nonfinite = (nonfinite_rank, nonfinite_step)
        self.dropout = dropout
        self.disk_full_rank = disk_full_rank
        self._exit: dict = {"exception": None}

    def _path(self, trainer, suffix: str) -> Path:
        return Path(f"{self.prefix}.rank{trainer.global_rank}.{suffix}")

    def on_fit_start(self, trainer, pl_module) -> None:
        self._path(trainer, "pid").write_text(str(os.getpid()))
        if trainer.global_rank == self.disk_full_rank:
            save = torch.save

            def save_on_a_full_disk(obj, f, *args, **kwargs):
                if ".ckpt.tmp-" in str(getattr(f, "name", f)):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return save(obj, f, *args, **kwargs)

            torch.save = save_on_a_full_disk
        if self.dropout:
            p = self.dropout
            pl_module.model.embed_tokens.register_forward_hook(
                lambda module, args, out: F.dropout(out, p, training=module.training))
        objective = pl_module.objective

        def objective_with_nan(out, labels):
            parts = objective(out, labels)
            if (trainer.global_rank, trainer.global_step) == self.nonfinite:
                parts["loss"] = parts["loss"] + float("nan")
            return parts

        pl_module.objective = objective_with_nan

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if trainer.global_rank in self.sigterm_ranks and trainer.global_step == self.sigterm_step:
            self.sigterm_step = None  # once, whatever the process does next
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        record = {"step": trainer.global_step - 1, "loss": float(outputs["loss"]).hex(),
                  "lr": float(trainer.optimizers[0].param_groups[0]["lr"]).hex(), "index": batch["index"].tolist(),
                  "skipped": step_guard(trainer).skipped}
        with open(self._path(trainer, "jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._exit = {"exception": type(exception).__name__, "code": getattr(exception, "code", None),
                      "message": str(exception), "global_step": trainer.global_step}
        self._save(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._exit["global_step"] = trainer.global_step
        self._save(trainer, pl_module)

    def _save(self, trainer, pl_module) -> None:
        torch.save({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()},
                   self._path(trainer, "pt"))
        self._path(trainer, "exit.json").write_text(json.dumps(self._exit))


if __name__ == "__main__":
    torch.set_num_threads(1)
    from jsonargparse import set_parsing_settings

    import cli

    # Attribute docstrings only make --help text, and reading them takes most of cli.main's start-up (the suite's
    # conftest caches them for the same reason); each rank of each run would read them again.
    set_parsing_settings(docstring_parse_attribute_docstrings=False)
    cli.main(sys.argv[1:])
