"""Auxiliary-loss-free load balancing (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for
Mixture-of-Experts"; DeepSeek-V3, section 2.1.2): after every optimizer step, each MoE layer's selection bias
(moe/router.py) moves toward balance by `ModelConfig.router_bias_update_rate`,

    bias_e += rate * sign(mean_load - load_e),

so an expert that received more than the mean of its layer's assignments becomes less likely to be chosen and one
that received fewer more likely, with no loss term whose gradient competes with the language model's.

load_e counts the top-k assignments expert e received over the step's whole global batch: all its micro-batches
(`StepLoads`, which LanguageModel.training_step feeds) and all processes (one sum over processes per step, all
layers in one tensor), so every process applies the same update and replicas stay equal. The processes of a
tensor-parallel group route the same tokens and all count them: that scales every load by the same factor, which
leaves the signs unchanged. Assignments are counted before any capacity drop (MoEStats.assignment_counts, not
tokens_per_expert): the bias answers the router's demand for an expert, which a capacity limit caps at the same
value for every overloaded expert, hiding which of them is the busiest.

When: in on_before_optimizer_step, once the step guard has judged the step and every micro-batch has run. The
optimizer never reads the bias (a buffer, not a parameter), so this is the same as updating after the step; and a
checkpoint saved at the end of the step, by whichever callback and in whatever order, holds the updated bias, so
a run resumed from it continues exactly. A step the guard drops leaves the bias alone, as it leaves the weights:
its routing may come from non-finite logits, and a dropped step is meant to change nothing. (Steps that fp16's
gradient scaler skips do update it: their routing is finite, only their gradients overflowed.)

Precision: the bias is float32 unless the whole model is cast (bf16-true, DeepSpeed bf16), which casts it too;
bf16 resolves about 1/256 of a value, coarse next to a rate of 0.001, so prefer bf16-mixed with this option.

Shapes: L MoE layers, E experts.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from moe.moe_layer import MoEStats
from moe.router import TopKRouter
from moe.train.guard import StepGuard
from moe.train.throughput import is_log_step


class StepLoads:
    """This process's top-k assignments per expert over one optimizer step's micro-batches."""

    def __init__(self):
        self.counts: torch.Tensor | None = None  # (L, E)

    def add(self, stats: list[MoEStats]) -> None:
        counts = torch.stack([s.assignment_counts.sum(dim=0) for s in stats])  # (L, E): summed over the k choices
        self.counts = counts if self.counts is None else self.counts + counts

    def take(self) -> torch.Tensor | None:
        """The step's counts (None before any micro-batch); the next step starts empty."""
        counts, self.counts = self.counts, None
        return counts


def bias_update(loads: torch.Tensor, rate: float) -> torch.Tensor:
    """(L, E) change of each layer's expert bias given the (L, E) loads of one optimizer step."""
    return rate * torch.sign(loads.mean(dim=1, keepdim=True) - loads)


def selection_routers(model: torch.nn.Module) -> list[TopKRouter]:
    """The routers with a selection bias, in layer order (the order of ModelOutput.moe)."""
    return [m for m in model.modules() if isinstance(m, TopKRouter) and m.expert_bias is not None]


class ExpertBiasUpdate(pl.Callback):
    """Moves every MoE layer's selection bias once per optimizer step (see the module docstring) and logs
    experts/layer_<i>/bias_absmax, the largest bias magnitude of the layer, at the steps Lightning writes. Does
    nothing for a model without a selection bias (ModelConfig.router_bias_update_rate None or 0)."""

    def __init__(self):
        self._routers: list[TopKRouter] = []
        self._guard: StepGuard | None = None
        self._skipped = 0  # the guard's count of dropped steps after the previous step
        self._last_report_step = -1

    def on_train_start(self, trainer, pl_module) -> None:
        self._routers = selection_routers(pl_module.model)
        guards = [c for c in trainer.callbacks if isinstance(c, StepGuard)]
        # The guard decides in its own on_before_optimizer_step: it must have run when this one does.
        if self._routers and guards and trainer.callbacks.index(guards[0]) > trainer.callbacks.index(self):
            raise ValueError("ExpertBiasUpdate must come after StepGuard in trainer.callbacks: it needs the guard's "
                             "verdict on the step")
        self._guard = guards[0] if guards else None
        self._skipped = self._guard.skipped if self._guard else 0
        pl_module.step_loads.take()  # nothing from an earlier fit

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        loads = pl_module.step_loads.take()
        if not self._routers or loads is None:
            return
        skipped = self._guard.skipped if self._guard else 0
        dropped, self._skipped = skipped != self._skipped, skipped
        if dropped:  # the same verdict on every process: all of them skip the collective together
            return
        loads = trainer.strategy.reduce(loads.double(), reduce_op="sum")  # (L, E) of the global batch
        delta = bias_update(loads, pl_module.model_config.router_bias_update_rate)
        with torch.no_grad():
            for router, change in zip(self._routers, delta, strict=True):
                router.expert_bias.add_(change.to(router.expert_bias.dtype))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._routers or not is_log_step(trainer, self._last_report_step):
            return
        self._last_report_step = trainer.global_step
        absmax = torch.stack([r.expert_bias for r in self._routers]).abs().amax(dim=1)  # (L,)
        for row, layer in enumerate(pl_module.model_config.moe_layer_indices()):
            pl_module.log(f"experts/layer_{layer}/bias_absmax", absmax[row])
