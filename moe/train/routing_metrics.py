"""What MoE routing did, logged by two callbacks that LanguageModel registers by default.

- `RouterLossMonitor`: train/aux_loss and train/z_loss of each optimizer step's whole global batch (all its
  micro-batches, all processes). The z-loss is a token mean, so that is the token-weighted mean of the micro-batch
  values. The load-balancing loss is not linear: it is recomputed from the summed assignment counts and router
  probabilities (`RouterSums`), which makes it exactly the loss of the global batch in one forward pass, whatever
  the world size and gradient accumulation. (Its gradient, under accumulation, is that of each micro-batch's own
  loss with fractions counted over the processes: a micro-batch cannot see the later ones' routing.)
- `ExpertLoadMonitor`: per MoE layer, experts/layer_<i>/max_over_mean (the busiest expert's load over the mean; 1 is
  perfect balance) and experts/layer_<i>/idle (experts that received no token), and with a capacity limit
  experts/dropped_fraction (assignments the limit dropped), over the steps since the last log; under expert
  parallelism, experts/layer_<i>/ep_rows_max_over_mean: the rows the busiest process's experts ran over the mean
  over processes, the imbalance of the all-to-all that runs one process out of memory in the first hundreds of
  steps, when routing is still far from balanced.

Both read the routing statistics `LanguageModel.training_step` returns (`outputs["moe"]`, one `MoEStats` per MoE
layer). Shapes: L MoE layers, k choices per token, E experts.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch

from moe.losses import load_balancing_loss_from_sums
from moe.moe_layer import MoEStats
from moe.train.loggers import log_expert_load_images
from moe.train.parallel import data_parallel_size
from moe.train.throughput import is_log_step


@dataclass
class RouterSums:
    """Routing of some tokens, summable over micro-batches and processes: float64 sums."""

    assignment_counts: torch.Tensor  # (L, k, E) top-k choices per expert
    probability_sum: torch.Tensor  # (L, E) router probabilities summed over the tokens
    n_tokens: torch.Tensor  # () tokens routed (each makes exactly one first choice)
    z_loss_sum: torch.Tensor  # () the z-loss (mean over layers) times n_tokens

    @classmethod
    def of(cls, stats: list[MoEStats]) -> RouterSums:
        counts = torch.stack([s.assignment_counts for s in stats])
        n_tokens = counts[0, 0].sum()
        z_loss = torch.stack([s.z_loss.detach() for s in stats]).mean()
        return cls(counts.double(), torch.stack([s.probability_sum.detach() for s in stats]).double(),
                   n_tokens.double(), (z_loss * n_tokens).double())

    def __add__(self, other: RouterSums) -> RouterSums:
        return RouterSums(*(a + b for a, b in zip(self._tensors(), other._tensors())))

    def _tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]

    def summed_over_processes(self, strategy) -> RouterSums:
        """The sums over every process, in one collective: the fields travel flattened together and are
        reshaped by their own shapes."""
        tensors = self._tensors()
        flat = strategy.reduce(torch.cat([t.flatten() for t in tensors]), reduce_op="sum")
        parts = flat.split([t.numel() for t in tensors])
        return RouterSums(*(part.view(t.shape) for part, t in zip(parts, tensors)))

    def losses(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(load-balancing loss averaged over the layers, z-loss) of these tokens, float32."""
        aux = load_balancing_loss_from_sums(self.assignment_counts, self.probability_sum, self.n_tokens).mean()
        return aux.float(), (self.z_loss_sum / self.n_tokens).float()


class RouterLossMonitor(pl.Callback):
    """Logs train/aux_loss and train/z_loss once per optimizer step, of the step's whole global batch."""

    def __init__(self):
        self._sums: RouterSums | None = None
        self._step = -1  # global_step when the sums were last logged (or training started)

    def on_train_start(self, trainer, pl_module) -> None:
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stats = outputs.get("moe") if isinstance(outputs, dict) else None
        if not stats:
            return
        sums = RouterSums.of(stats)
        self._sums = sums if self._sums is None else self._sums + sums
        if trainer.global_step == self._step:  # the step is still accumulating micro-batches
            return
        self._step = trainer.global_step
        sums, self._sums = self._sums, None
        if not is_log_step(trainer, -1):  # Lightning writes only these steps: no collective for the others
            return
        aux, z = sums.summed_over_processes(trainer.strategy).losses()
        pl_module.log("train/aux_loss", aux)
        pl_module.log("train/z_loss", z)


class ExpertLoadMonitor(pl.Callback):
    """Logs, per MoE layer, the busiest expert's load over the mean load and the number of experts that received no
    token, over the optimizer steps since the previous log (every `trainer.log_every_n_steps`), summed over
    processes; tensor-parallel replicas, which route the same tokens, are counted once. Global rank zero appends the
    whole load to expert_load.jsonl in the run's folder and draws it on TensorBoard and W&B."""

    FILE_NAME = "expert_load.jsonl"

    def __init__(self):
        self._tokens: torch.Tensor | None = None  # (L, E) assignments processed since the last log
        self._dropped: torch.Tensor | None = None  # (L,) assignments dropped by a capacity limit since then
        self._received: torch.Tensor | None = None  # (L,) rows this process's experts ran since then
        self._last_report_step = -1
        self._path: Path | None = None  # expert_load.jsonl, or None without a run folder

    def on_train_start(self, trainer, pl_module) -> None:
        # Resolved here on every rank: trainer.log_dir is a broadcast from rank zero. Without a logger there is no run
        # folder (log_dir falls back to the working directory), so no file.
        log_dir = trainer.log_dir if trainer.loggers else None
        self._path = Path(log_dir) / self.FILE_NAME if log_dir else None
        if trainer.ckpt_path and trainer.is_global_zero and self._path is not None and self._path.is_file():
            # Resumed from an earlier checkpoint: the steps after it are logged again (as metrics.csv's rows are
            # dropped by moe.train.run_paths.forget_rows_from), so their lines go.
            lines = self._path.read_text().splitlines(keepends=True)
            kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= trainer.global_step]
            if len(kept) < len(lines):
                self._path.write_text("".join(kept))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stats = outputs.get("moe") if isinstance(outputs, dict) else None
        if not stats:
            return
        counts = torch.stack([s.tokens_per_expert for s in stats]).float()
        dropped = torch.stack([s.dropped for s in stats]).float()
        received = torch.stack([s.rows_received for s in stats]).float()
        self._tokens = counts if self._tokens is None else self._tokens + counts
        self._dropped = dropped if self._dropped is None else self._dropped + dropped
        self._received = received if self._received is None else self._received + received
        if not is_log_step(trainer, self._last_report_step):
            return
        self._last_report_step = trainer.global_step
        replicas = trainer.world_size // data_parallel_size(trainer)
        tokens = trainer.strategy.reduce(self._tokens, reduce_op="sum") / replicas
        self.log_load(pl_module, tokens)
        if trainer.is_global_zero:
            self.write_load(trainer, pl_module.model_config.moe_layer_indices(), tokens)
        if pl_module.model_config.capacity_factor is not None:
            dropped = trainer.strategy.reduce(self._dropped, reduce_op="sum").sum() / replicas
            pl_module.log("experts/dropped_fraction", dropped / (dropped + tokens.sum()).clamp_min(1.0))
        if getattr(trainer.strategy, "expert_parallel_size", 1) > 1:
            # Each process's row of a (processes, L) table, gathered as a sum (Lightning's all_gather is deprecated
            # in torch's autograd form).
            table = self._received.new_zeros(trainer.world_size, len(self._received))
            table[trainer.global_rank] = self._received
            self.log_rows_received(pl_module, trainer.strategy.reduce(table, reduce_op="sum"))
        self._tokens = self._dropped = self._received = None

    def write_load(self, trainer, layers: tuple[int, ...], tokens: torch.Tensor) -> None:
        """Append the (L, E) assignment counts as fractions of each layer's assignments to expert_load.jsonl (append
        mode: a resumed run in the same folder continues the file) and draw them on the loggers that show images."""
        tokens = tokens.double().cpu()
        load = tokens / tokens.sum(dim=1, keepdim=True).clamp_min(1.0)  # (L, E), each row sums to 1
        step = trainer.global_step
        if self._path is not None:
            # Six decimals keep the file small (a line per log step for the whole run) and every load readable.
            rows = [[round(value, 6) for value in row] for row in load.tolist()]
            self._path.parent.mkdir(parents=True, exist_ok=True)
            with open(self._path, "a") as file:
                file.write(json.dumps({"step": step, "layers": list(layers), "load": rows}) + "\n")
        # At the step Lightning gives the loggers this step's scalars (global_step - 1 here, as `_batches_that_stepped`
        # is counted after logging), so that the image lines up with experts/layer_i/max_over_mean.
        log_expert_load_images(trainer.loggers, layers, load, trainer.fit_loop.epoch_loop._batches_that_stepped)

    def log_rows_received(self, pl_module, received: torch.Tensor) -> None:
        """Log the spread over processes of (processes, L) expert rows run (tensor-parallel replicas repeat a
        row, which changes neither the maximum nor the mean)."""
        imbalance = received.max(dim=0).values / received.mean(dim=0).clamp_min(1e-9)  # (L,)
        for row, layer in enumerate(pl_module.model_config.moe_layer_indices()):
            pl_module.log(f"experts/layer_{layer}/ep_rows_max_over_mean", imbalance[row])
        pl_module.log("experts/ep_rows_max_over_mean", imbalance.max())

    def log_load(self, pl_module, tokens: torch.Tensor) -> None:
        """Log the load of (L, E) assignment counts, one row per MoE layer."""
        imbalance = tokens.max(dim=1).values / tokens.mean(dim=1).clamp_min(1e-9)  # (L,)
        idle = (tokens == 0).sum(dim=1).float()  # (L,)
        config = pl_module.model_config
        layers = config.moe_layer_indices()  # row j of the statistics is block layers[j]
        for row, layer in enumerate(layers):
            pl_module.log(f"experts/layer_{layer}/max_over_mean", imbalance[row])
            pl_module.log(f"experts/layer_{layer}/idle", idle[row])
        pl_module.log("experts/max_over_mean", imbalance.max())
        pl_module.log("experts/idle", idle.sum())
