"""Zero-shot multiple-choice metrics as lm-evaluation-harness 0.4 computes them (lm_eval/api/task.py
ConfigurableTask.process_results; lm_eval/api/metrics.py mean and mean_stderr), aggregated with torchmetrics
so that sums reduce across processes.

acc: the choice of highest summed log-likelihood is the gold one (the first on ties, as numpy's argmax).
acc_norm: the same after dividing each log-likelihood by the choice's length in characters.
stderr: sample standard deviation (ddof = 1) of the per-item 0/1 scores over sqrt(n). For 0/1 scores with s
correct of n, sum((x - mean)^2) = s - s^2 / n, so sums of correct counts and item counts are all it needs.
"""

from __future__ import annotations

import math

from torchmetrics import SumMetric


def argmax(values: list[float]) -> int:
    """Index of the first largest value."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def item_scores(lls: list[float], choice_chars: list[int], gold: int) -> dict[str, float]:
    """acc and acc_norm (0 or 1) of one item from its per-choice log-likelihoods."""
    return {"acc": float(argmax(lls) == gold),
            "acc_norm": float(argmax([ll / chars for ll, chars in zip(lls, choice_chars)]) == gold)}


def binary_mean_stderr(correct: float, n: float) -> float:
    """lm-eval's mean_stderr of n scores in {0, 1} of which `correct` are 1 (nan below two items)."""
    if n < 2:
        return math.nan
    return math.sqrt((correct - correct * correct / n) / (n - 1) / n)


class TaskScores:
    """Correct counts per metric and the item count of one task, as torchmetrics sums.

    sync: reduce over torch.distributed's default group at compute() (every rank must then call it). replicas:
    how many processes scored each item (tensor-parallel peers run the same batches), so sums divide by it."""

    def __init__(self, metrics: tuple[str, ...], sync: bool = False, replicas: int = 1):
        self.metrics, self.replicas = metrics, replicas
        self.correct = {m: SumMetric(sync_on_compute=sync) for m in metrics}
        self.count = SumMetric(sync_on_compute=sync)
        for metric in (*self.correct.values(), self.count):
            metric.update(0.0)  # a rank with no items of this task still computes (and syncs) a zero

    def update(self, scores: dict[str, float]) -> None:
        for m in self.metrics:
            self.correct[m].update(scores[m])
        self.count.update(1.0)

    def compute(self) -> dict[str, float]:
        """{metric: mean, metric_stderr: its standard error, ..., n: items}."""
        n = float(self.count.compute()) / self.replicas
        out = {}
        for m in self.metrics:
            correct = float(self.correct[m].compute()) / self.replicas
            out[m] = correct / n if n else math.nan
            out[f"{m}_stderr"] = binary_mean_stderr(correct, n)
        out["n"] = round(n)
        return out
