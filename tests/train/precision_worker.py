"""What tests/train/test_precision.py runs in training processes: a callback that records what each optimizer step
was given (the gradient norm before clipping, as logged, and after clipping, as the optimizer sees it), and the
real `fit` command as one of two processes (`python precision_worker.py STRATEGY OUT WORKDIR`)."""

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent)]  # tests/train, tests


def _norm_seen_by_optimizer(trainer, module) -> float:
    """The gradient norm over all processes, after clipping (a collective under sharding)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    from moe.train.parallel import total_norm

    if isinstance(trainer.strategy.model, FullyShardedDataParallel):
        return float(trainer.strategy.model.clip_grad_norm_(float("inf")))
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(total_norm(grads))


class RecordClipping(pl.Callback):
    """Per optimizer step: the logged gradient norm (before clipping), the norm the optimizer steps with, the
    logged train/loss; and the parameter dtypes and final full weights. Written to `out`.rank<R>.pt at the end."""

    def __init__(self, out: str | None = None):
        self.out, self.before, self.after, self.losses, self.dtypes = out, [], [], [], set()

    def on_train_start(self, trainer, module):
        # After the step: Lightning runs the backward inside optimizer.step(closure), after any pre-hook; the
        # update leaves the gradients as they were.
        optimizer = trainer.optimizers[0]
        optimizer.register_step_post_hook(lambda *_: self.after.append(_norm_seen_by_optimizer(trainer, module)))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        metrics = trainer.callback_metrics
        if len(self.before) < trainer.global_step:  # one optimizer step done since the last record
            self.before.append(float(metrics["train/grad_norm"]))
            self.losses.append(float(metrics["train/loss"]))

    def on_train_end(self, trainer, module):
        from launch import full_state

        self.dtypes = {str(p.dtype) for p in module.model.parameters()}
        if self.out is not None:
            weights = full_state(module.model)
            torch.save({"before": self.before, "after": self.after, "losses": self.losses, "dtypes": self.dtypes,
                        "weights": weights}, f"{self.out}.rank{trainer.global_rank}.pt")


STRATEGIES = {"ddp": ["--trainer.strategy", "ddp"], "fsdp2": ["--config", "configs/strategy/fsdp2.yaml"],
              "fsdp2-ep": ["--config", "configs/strategy/fsdp2-ep.yaml"]}


def run_cli(strategy: str, out: Path, workdir: Path) -> None:
    from cli_runs import ROOT, tiny_run_args

    import cli

    os.chdir(workdir)
    sys.argv = sys.argv[:1]  # LightningCLI warns when given both arguments and a command line
    given = [str(ROOT / a) if a.startswith("configs/") else a for a in STRATEGIES[strategy]]
    cli.main(["fit", *tiny_run_args(workdir), *given, "--trainer.devices", "2", "--trainer.precision", "bf16-mixed",
              "--trainer.gradient_clip_val", "0.5", "--data.batch_size", "2",
              "--trainer.max_steps", "4", "--trainer.val_check_interval", "4",
              "--trainer.callbacks+=precision_worker.RecordClipping", f"--trainer.callbacks.out={out / strategy}"])


if __name__ == "__main__":
    run_cli(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
