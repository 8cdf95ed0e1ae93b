"""Run by test_distributed_moe.py, one process per rank, launched by the test itself (the environment names the
rank: LOCAL_RANK and WORLD_SIZE, plus NODE_RANK for the simulated multi-node run). Modes:
- `ddp OUT`: 2-process DDP fits of a tiny MoE on CPU (gloo): with an expert idle on rank 0 only, for each CPU
  expert backend; then the same global batch as (batch 4, accumulate 1) and (batch 2, accumulate 2).
- `cli OUT WORKDIR`: the real command line (`cli.main(["fit", ...])`) with num_nodes=2, devices=1.
Each rank writes OUT/<name>.rank<r>.pt: its logged metrics, recorded routing and final weights.
`fit_run` is also what the test calls in-process for the single-process references.
"""

import os
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from test_module import TINY, PatternData, trainer

from moe.train import LanguageModel

IDLE = 3  # the expert that rank 0 never routes to in the idle-expert runs


class OrderedData(PatternData):
    """PatternData dealt to the ranks in order (Lightning's own sampler would shuffle it), so that step 0's global
    batch is rows 0-7 at every world size: rank r reads rows r, r + W, r + 2W, ..."""

    def train_dataloader(self):
        dataset = super().train_dataloader().dataset
        t = self.trainer
        sampler = DistributedSampler(dataset, num_replicas=t.world_size, rank=t.global_rank, shuffle=False)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler)


class MemoryLogger(Logger):
    """Keeps every logged metric in memory, by optimizer step."""

    def __init__(self):
        super().__init__()
        self.rows: list[tuple[int, dict]] = []

    name, version = "memory", 0

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, {k: float(v) for k, v in metrics.items()}))

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def series(self, key: str) -> list[float]:
        return [m[key] for _, m in self.rows if key in m]


class Record(pl.Callback):
    """Gradients at the first optimizer step (after DDP's reduction), the step losses averaged over processes and
    the final weights; optionally writes them to `out` at the end of training."""

    def __init__(self, out: str | None = None):
        self.out, self.first_grads, self.losses = out, None, []

    def on_before_optimizer_step(self, trainer, module, optimizer):
        if self.first_grads is None:
            self.first_grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        # The micro-batch loss, divided by the accumulation, so the sum over micro-batches is the step's loss.
        loss = trainer.strategy.reduce(outputs["loss"].detach().float(), reduce_op="mean")
        self.losses.append(float(loss))

    def on_train_end(self, trainer, module):
        self.weights = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
        if self.out is not None:
            torch.save({"losses": self.losses, "weights": self.weights, "first_grads": self.first_grads},
                       f"{self.out}.rank{trainer.global_rank}.pt")


def bias_router(model, rank: int) -> list[list[torch.Tensor]]:
    """On rank 0 push expert IDLE's logit far down (no token picks it), on the other ranks up (tokens do pick it):
    a routing that differs between ranks without changing any weight. Returns the per-layer (E,) counts of every
    training forward, for the test to verify the condition."""
    seen = [[] for _ in model.layers]

    def record(layer):
        def hook(mod, args, out):
            if mod.training:
                seen[layer].append(out[1].tokens_per_expert.clone())
        return hook

    shift = torch.zeros(TINY.n_experts)
    shift[IDLE] = -1e3 if rank == 0 else 3.0
    for layer, block in enumerate(model.layers):
        block.mlp.router.gate.register_forward_hook(lambda mod, args, out: out + shift)
        block.mlp.register_forward_hook(record(layer))
    return seen


def fit_run(batch_size: int, accumulate: int, backend: str = "loop", max_steps: int = 2, idle_rank: int | None = None,
            devices: int = 1, strategy="auto"):
    """A seeded fit of the tiny MoE; returns the module, the memory logger, the Record callback and routing seen."""
    torch.manual_seed(0)
    module = LanguageModel(TINY.replace(expert_backend=backend), warmup_steps=1)
    module.configure_model()
    seen = bias_router(module.model, idle_rank) if idle_rank is not None else None
    logger, record = MemoryLogger(), Record()
    t = trainer(max_steps=max_steps, devices=devices, strategy=strategy, accumulate_grad_batches=accumulate,
                log_every_n_steps=1, limit_val_batches=0, logger=logger, callbacks=[record])
    t.fit(module, datamodule=OrderedData(batch_size=batch_size))
    return module, logger, record, seen


def save(out: Path, name: str, rank: int, logger, record, seen=None) -> None:
    torch.save({"aux": logger.series("train/aux_loss"), "z": logger.series("train/z_loss"),
                "ce": logger.series("train/loss"), "losses": record.losses,
                "first_grads": record.first_grads, "weights": record.weights,
                "seen": [torch.stack(s) for s in seen] if seen is not None else None},
               out / f"{name}.rank{rank}.pt")


def run_ddp(out: Path) -> None:
    warnings.simplefilter("ignore")
    rank = int(os.environ["LOCAL_RANK"])
    for backend in ("loop", "grouped"):
        _, logger, record, seen = fit_run(4, 1, backend, max_steps=3, idle_rank=rank, devices=2, strategy="ddp")
        save(out, f"idle_{backend}", rank, logger, record, seen)
    for batch_size, accumulate in ((4, 1), (2, 2)):
        _, logger, record, _ = fit_run(batch_size, accumulate, devices=2, strategy="ddp")
        save(out, f"b{batch_size}a{accumulate}", rank, logger, record)


SHORT_RUN = ["--trainer.max_steps", "4", "--trainer.val_check_interval", "4"]  # tiny_run_args' run, shortened


def run_cli(out: Path, workdir: Path) -> None:
    from cli_runs import tiny_run_args

    import cli

    os.chdir(workdir)
    sys.argv = sys.argv[:1]  # LightningCLI warns when given both arguments and a command line
    cli.main(["fit", *tiny_run_args(workdir), "--trainer.num_nodes", "2", "--trainer.devices", "1",
              "--trainer.strategy", "ddp", "--data.batch_size", "2", *SHORT_RUN,
              "--trainer.callbacks+=distributed_moe_worker.Record", f"--trainer.callbacks.out={out / 'cli'}"])


if __name__ == "__main__":
    if sys.argv[1] == "ddp":
        run_ddp(Path(sys.argv[2]))
    else:
        run_cli(Path(sys.argv[2]), Path(sys.argv[3]))
