"""Zero-shot multiple-choice evaluation scored as lm-evaluation-harness 0.4: `evaluate(model, tokenizer,
tasks=[...])`, with the shipped tasks listed by `task_names()`."""

from eval.harness import evaluate
from eval.tasks import Task, get_task, task_names

__all__ = ["Task", "evaluate", "get_task", "task_names"]
