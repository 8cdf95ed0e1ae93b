"""The gradient norm and gradient clipping, for every precision and strategy we configure, with torch's fused AdamW.

Lightning's mixed-precision plugins refuse to clip for an optimizer that unscales fp16 gradients inside its own
step (torch's fused AdamW says so with `_step_supports_amp_scaling`), and they refuse it under bf16-mixed too,
where no gradient is ever scaled: `bf16-mixed` crashed at the first optimizer step with gradient clipping on, the
LLaMA recipe's default. FSDPStrategy's plugin refuses norm clipping altogether (torch's `clip_grad_norm_` would
add up each process's shard only). So the norm is computed and applied here instead:

- fp16 (`16-mixed`): `unscale_gradients` divides out the loss scale before anything reads the gradients, as
  Lightning does for unfused optimizers; torch's GradScaler then steps the fused optimizer without scaling again,
  and still skips steps whose gradients overflowed.
- the norm of all gradients, as one process would compute it for the unsharded model: plain tensors (one device,
  DDP, whose gradients are already averaged), DTensors of FSDP2 and tensor parallelism (`parallel.total_norm`),
  and FSDPStrategy's flat shards, which only the FSDP root can add up over its process groups.
- clipping scales every gradient by max_norm / (norm + 1e-6) when that is below 1 (torch's coefficient), using
  the norm already computed for the step guard instead of a second pass over the gradients.
- DeepSpeed clips inside its engine (Lightning passes `gradient_clip_val` into its config): nothing to do here,
  and no norm to give the guard or the log before its step (the guard judges the loss alone).
"""

from __future__ import annotations

import math
import warnings

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, Strategy

from moe.train.parallel import total_norm

# DeepSpeedStrategy warns that an overridden configure_gradient_clipping "will not actually clip gradients" and
# asks for gradient_clip_val instead: ours leaves DeepSpeed to clip with that very value, so the warning misleads.
warnings.filterwarnings("ignore", message="Since DeepSpeed handles gradient clipping internally")


def unscale_gradients(precision_plugin, optimizer: torch.optim.Optimizer) -> None:
    """Divide the fp16 loss scale out of the gradients now, if Lightning left them scaled for the optimizer."""
    scaler = getattr(precision_plugin, "scaler", None)
    # Lightning unscales before this point itself, except for optimizers that unscale inside their step.
    if scaler is not None and scaler.is_enabled() and getattr(optimizer, "_step_supports_amp_scaling", False):
        scaler.unscale_(optimizer)


def gradient_norm(strategy: Strategy, parameters) -> torch.Tensor | None:
    """The L2 norm of the gradients of `parameters` over every process, the same value on each (a collective
    under FSDP, FSDP2 and tensor parallelism: every process must call it); None under DeepSpeed, whose engine
    keeps the gradients in its own partitioned buffers (parameters have no .grad) and computes the norm inside
    its step, after the step guard has to decide."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(strategy, DeepSpeedStrategy):
        return None
    root = strategy.model
    if isinstance(root, FullyShardedDataParallel):
        # FSDPStrategy: each process holds a shard of each gradient; the root adds the shards up over its sharding
        # and replication groups. An infinite max_norm makes its coefficient 1: nothing is scaled.
        return root.clip_grad_norm_(math.inf)
    grads = [p.grad for p in parameters if p.grad is not None]
    return total_norm(grads) if grads else torch.zeros((), device=strategy.root_device)


def clip_gradients(strategy: Strategy, optimizer: torch.optim.Optimizer, clip_val: float | None,
                   algorithm: str | None, norm: float | None) -> None:
    """Clip the optimizer's gradients to `clip_val`: by their global `norm` (from `gradient_norm`) or, with
    algorithm 'value', elementwise. A non-finite norm is left alone: the step guard or fp16's scaler drops it."""
    if not clip_val or isinstance(strategy, DeepSpeedStrategy):
        return
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if algorithm == "value":
        for grad in grads:
            grad.clamp_(-clip_val, clip_val)
        return
    if norm is None or not math.isfinite(norm):
        return
    coefficient = clip_val / (norm + 1e-6)
    if coefficient >= 1.0 or not grads:
        return
    from torch.distributed.tensor import DTensor

    # A Python float: a plain tensor cannot multiply a DTensor, and the norm is already a float for the guard.
    plain = [g for g in grads if not isinstance(g, DTensor)]
    if plain:
        torch._foreach_mul_(plain, coefficient)
    for grad in grads:
        if isinstance(grad, DTensor):
            grad.mul_(coefficient)


class StepGradientNorm:
    """The gradient norm of the optimizer step in flight, as a float, computed once (after fp16's unscaling) by
    whichever needs it first, the step guard or clipping, and forgotten after the step. None under DeepSpeed."""

    def __init__(self):
        self._value: float | None = None
        self._known = False

    def get(self, trainer, optimizer: torch.optim.Optimizer, parameters) -> float | None:
        if not self._known:
            unscale_gradients(trainer.precision_plugin, optimizer)
            norm = gradient_norm(trainer.strategy, parameters)
            self._value, self._known = (None if norm is None else float(norm)), True
        return self._value

    def forget(self) -> None:
        self._value, self._known = None, False
