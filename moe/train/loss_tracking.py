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

    def add(self, total: torch.Tensor, ce: torch.Tensor) -> None:
        self.total.append(total.detach())
        self.ce.append(ce.detach())

    def total_mean(self, device: torch.device) -> torch.Tensor:
        """This process's mean total objective over the step's micro-batches (0 before any)."""
        return torch.stack(self.total).mean() if self.total else torch.zeros((), device=device)

    def reduce(self, strategy) -> tuple[float, float]:
        """(cross-entropy, total objective) of the global batch, averaged over micro-batches and processes; the
        next step starts empty."""
        values = torch.stack([torch.stack(self.ce).mean(), torch.stack(self.total).mean()])
        ce, total = strategy.reduce(values.float(), reduce_op="mean").tolist()
        self.total, self.ce = [], []
        return ce, total


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
