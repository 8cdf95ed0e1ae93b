"""The losses a run reports, gathered where they are computed and reduced over processes once.

- `StepLosses`: the objectives of one optimizer step's micro-batches. Their mean over micro-batches and processes
  is the loss of the step's global batch, which is what the step trains on (logged as train/loss), and the step
  guard judges it before the update.
- `EvalLoss`: an evaluation epoch's token-weighted loss, summed in float64 and reduced at the end of the epoch, so
  that the result does not depend on how the windows were split into batches or over processes.
"""

from __future__ import annotations

import torch


class StepLosses:
    """Each micro-batch's total objective and cross-entropy (unscaled, detached, each a mean over its tokens)."""

    def __init__(self):
        self.total: list[torch.Tensor] = []
        self.ce: list[torch.Tensor] = []
        self._reduced: tuple[float, float, float | None] | None = None

    def add(self, total: torch.Tensor, ce: torch.Tensor) -> None:
        self.total.append(total.detach())
        self.ce.append(ce.detach())

    def reduce(self, strategy, grad_norm: float | None = None) -> tuple[float, float, float | None]:
        """(cross-entropy, total objective, gradient norm) of the step's global batch: the losses averaged over
        micro-batches and processes, in one collective per step. The step guard asks first, with the gradient norm,
        so that every process judges the very same numbers; the module's log of the step reuses the result until
        `clear`. The norm comes back None when none was given."""
        if self._reduced is None:
            device = strategy.root_device
            ce, total = ((torch.stack(values).mean() if values else torch.zeros((), device=device))
                         for values in (self.ce, self.total))
            values = torch.stack([ce.float(), total.float(), torch.tensor(grad_norm or 0.0, device=device)])
            ce, total, norm = strategy.reduce(values, reduce_op="mean").tolist()
            self._reduced = (ce, total, None if grad_norm is None else norm)
        return self._reduced

    def clear(self) -> None:
        """Start the next optimizer step."""
        self.total, self.ce, self._reduced = [], [], None


class EvalLoss:
    """Sum of per-token losses and the token count over an evaluation epoch."""

    def __init__(self):
        self.sums: torch.Tensor | None = None

    def start(self, device: torch.device) -> None:
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)

    def add(self, mean_loss: torch.Tensor, n_tokens: int) -> None:
        """A batch's loss, a mean over its `n_tokens` tokens."""
        self.sums += torch.stack([mean_loss.detach().double() * n_tokens,
                                  mean_loss.new_tensor(n_tokens, dtype=torch.float64)])

    def result(self, strategy) -> float | None:
        """The mean loss per token over every process's batches; None when the epoch had no tokens."""
        total, count = strategy.reduce(self.sums, reduce_op="sum").tolist()
        return total / count if count else None
