"""Multiple-choice evaluation scored as lm-evaluation-harness 0.4: `evaluate(model, tokenizer, tasks=[...])` with
shipped tasks (`task_names()`), groups (`group_names()`) or task files in lm-eval's YAML format."""

from eval.harness import evaluate
from eval.tasks import Group, Task, get_group, get_task, group_names, resolve, task_names

__all__ = ["Group", "Task", "evaluate", "get_group", "get_task", "group_names", "resolve", "task_names"]
