"""Evaluation results as a table (one row per task, then one per group, with standard errors) and as JSON lines
on disk."""

from __future__ import annotations

import json
import math
from pathlib import Path

METRICS = ("acc", "acc_norm")


def _cell(value: float | None, width: int) -> str:
    return f"{'-' if value is None or math.isnan(value) else f'{100 * value:.2f}':>{width}}"


def format_table(results: dict[str, dict]) -> str:
    """Rows: tasks (acc and acc_norm in percent with their standard errors, and items), the plain average of the
    tasks when no group is shown, then the groups (entries with a "tasks" count) as lm-eval aggregates them. A task
    without acc_norm (winogrande, boolq, MMLU's lettered form, as in lm-eval) shows '-'."""
    tasks = [name for name, r in results.items() if "tasks" not in r]
    groups = [name for name, r in results.items() if "tasks" in r]
    width = max([10, *(len(name) for name in results)])
    header = f"{'':<{width}}{'n':>8}" + "".join(f"{m:>10}{'±':>7}" for m in METRICS)
    rule = "-" * len(header)

    def row(name: str) -> str:
        r = results[name]
        cells = "".join(_cell(r.get(m), 10) + _cell(r.get(f"{m}_stderr"), 7) for m in METRICS)
        return f"{name:<{width}}{r['n']:>8}{cells}"

    lines = [header.replace(f"{'':<{width}}", f"{'task':<{width}}", 1), rule, *map(row, tasks)]
    if len(tasks) > 1 and not groups:
        means = []
        for m in METRICS:
            values = [results[t][m] for t in tasks if m in results[t]]
            means.append(sum(values) / len(values) if values else None)
        lines.append(f"{'average':<{width}}{'':>8}" + "".join(_cell(v, 10) + f"{'':>7}" for v in means))
    if groups:
        lines += [rule, header.replace(f"{'':<{width}}", f"{'group':<{width}}", 1), rule, *map(row, groups)]
    return "\n".join(lines)


def append_results(path: str | Path, record: dict) -> None:
    """Append one evaluation (step, stage, results) as a JSON line; earlier lines are never rewritten."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
