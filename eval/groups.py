"""Scores of a group of tasks from its tasks' scores, as lm-evaluation-harness 0.4 aggregates them
(lm_eval/api/group.py Group.aggregate; lm_eval/api/metrics.py aggregate_subtask_metrics, pooled_sample_stderr,
unweighted_mean_stderr): always from the leaf tasks, never from subgroups' scores.

- weight_by_size (MMLU): the mean of the tasks' scores weighted by their item counts, which is the score over
  all items pooled; standard error from the pooled sample variance,
  sqrt(sum((n_i - 1) * n_i * se_i^2) / (N - k) / N) for k tasks of n_i items, N in all.
- otherwise (olmo_core8): the plain mean of the k task scores; standard error sqrt(sum(se_i^2)) / k, that of a mean
  of k independent means.
"""

from __future__ import annotations

import math

from eval.tasks import Group


def pooled_stderr(stderrs: list[float], sizes: list[int]) -> float:
    total = sum(sizes)
    if total <= len(sizes) or any(math.isnan(se) for se in stderrs):
        return math.nan  # lm-eval's "N/A": some task has no standard error (a single item)
    variance = sum((n - 1) * se * se * n for se, n in zip(stderrs, sizes)) / (total - len(sizes))
    return math.sqrt(variance / total)


def unweighted_stderr(stderrs: list[float]) -> float:
    return math.sqrt(sum(se * se for se in stderrs)) / len(stderrs)


def aggregate(group: Group, results: dict[str, dict]) -> dict:
    """{metric, metric_stderr, ..., "n": items, "tasks": leaf tasks} of `group` from its leaves' results."""
    leaves = [results[task.name] for task in group.leaves()]
    out = {}
    for metric, by_size in group.aggregate:
        scored = [r for r in leaves if metric in r]
        if not scored:
            continue
        sizes = [r["n"] for r in scored]
        weights = sizes if by_size else [1] * len(scored)
        out[metric] = sum(r[metric] * w for r, w in zip(scored, weights)) / sum(weights)
        stderrs = [r[f"{metric}_stderr"] for r in scored]
        out[f"{metric}_stderr"] = pooled_stderr(stderrs, sizes) if by_size else unweighted_stderr(stderrs)
    out["n"] = sum(r["n"] for r in leaves)
    out["tasks"] = len(leaves)
    return out


def proportional_limits(sizes: dict[str, int], total: int) -> dict[str, int]:
    """A stratified subsample's size per task: one item each, and the other `total - k` items split in proportion
    to the tasks' sizes (largest remainders get the rounding, never more than a task has), so that the
    size-weighted group score of the subsample estimates the whole group's. All items when total covers them."""
    population = sum(sizes.values())
    if total >= population:
        return dict(sizes)
    rest = max(0, total - len(sizes))
    spread = max(1, population - len(sizes))  # items beyond each task's first one
    quotas = {name: rest * (n - 1) / spread for name, n in sizes.items()}
    limits = {name: 1 + math.floor(q) for name, q in quotas.items()}
    spare = max(total, len(sizes)) - sum(limits.values())
    for name in sorted(sizes, key=lambda name: (-(quotas[name] - math.floor(quotas[name])), name)):
        if spare <= 0:
            break
        if limits[name] < sizes[name]:
            limits[name] += 1
            spare -= 1
    return limits
