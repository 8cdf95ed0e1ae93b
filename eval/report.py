"""Zero-shot results as a table (one column per task and an average) and as JSON lines on disk."""

from __future__ import annotations

import json
from pathlib import Path


def format_table(results: dict[str, dict]) -> str:
    """Rows acc and acc_norm (percent, lm-eval's metric names) and n; columns the tasks and their average.
    A task without acc_norm (winogrande, boolq, as in lm-eval) shows '-' and is left out of that average."""
    tasks = list(results)
    width = max([8, *(len(t) for t in tasks)])
    lines = [f"{'metric':<10}" + "".join(f"{t:>{width + 2}}" for t in tasks) + f"{'average':>{width + 2}}"]
    for metric in ("acc", "acc_norm"):
        values = [results[t].get(metric) for t in tasks]
        present = [v for v in values if v is not None]
        if not present:
            continue
        cells = "".join(f"{'-' if v is None else f'{100 * v:.2f}':>{width + 2}}" for v in values)
        lines.append(f"{metric:<10}{cells}{100 * sum(present) / len(present):>{width + 2}.2f}")
    lines.append(f"{'n':<10}" + "".join(f"{results[t]['n']:>{width + 2}}" for t in tasks))
    rule = "-" * len(lines[0])
    return "\n".join([lines[0], rule, *lines[1:]])


def append_results(path: str | Path, record: dict) -> None:
    """Append one evaluation (step, stage, results) as a JSON line; earlier lines are never rewritten."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
