"""lm-evaluation-harness task definitions for our shipped tasks on local files.

Each one `include`s lm-eval's own task YAML unchanged and points only its dataset at a local validation file,
so lm-eval (`lm_eval --include_path DIR --tasks local_arc_easy,...`) scores exactly its task on the rows our
harness reads offline. Used by the parity tests and the speed benchmark, and by anyone who wants lm-eval's
numbers on the same files.
"""

from __future__ import annotations

from pathlib import Path

from eval.data import resolve_local
from eval.tasks import get_task

# lm-eval's YAML for each shipped task, relative to lm_eval/tasks (MMLU's subjects: lm_eval_yaml).
LM_EVAL_YAML = {"arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
                "hellaswag": "hellaswag/hellaswag.yaml", "piqa": "piqa/piqa.yaml",
                "winogrande": "winogrande/default.yaml", "boolq": "super_glue/boolq/default.yaml",
                "sciq": "sciq/sciq.yaml", "openbookqa": "openbookqa/openbookqa.yaml"}
# Where the local file's layout differs from lm-eval's dataset: google/boolq's bool `answer` is super_glue's
# integer `label`.
OVERRIDES = {"boolq": "doc_to_target: '{{answer | int}}'\n"}
PREFIX = "local_"


def lm_eval_yaml(task: str) -> str:
    """lm-eval's file for one of our tasks, relative to lm_eval/tasks."""
    if task in LM_EVAL_YAML:
        return LM_EVAL_YAML[task]
    if task.startswith("mmlu_") and task.endswith("_continuation"):
        return f"mmlu/continuation/{task.removesuffix('_continuation')}.yaml"
    if task.startswith("mmlu_"):
        return f"mmlu/default/{task}.yaml"
    raise KeyError(f"no lm-eval task file known for {task!r}")


def write_lm_eval_tasks(folder: str | Path, data_dir: str | Path, tasks: list[str] | None = None) -> list[str]:
    """Write `local_<task>.yaml` for each task into `folder` (default: the eight of LM_EVAL_YAML); returns the
    lm-eval task names. The scored split and, where it differs, the few-shot split point at local files."""
    import lm_eval

    tasks_dir = Path(lm_eval.__file__).parent / "tasks"
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for name in tasks or list(LM_EVAL_YAML):
        task = get_task(name)
        splits = dict.fromkeys(s for s in (task.split, task.fewshot_split) if s)
        files = "".join(f"    {split}: {resolve_local(task, data_dir, split).resolve()}\n" for split in splits)
        (folder / f"{PREFIX}{name}.yaml").write_text(
            f"include: {tasks_dir / lm_eval_yaml(name)}\ntask: {PREFIX}{name}\ntag: []\ndataset_path: json\n"
            f"dataset_name: null\ndataset_kwargs:\n  data_files:\n{files}training_split: null\n"
            + ("" if task.test_split else "test_split: null\n") + OVERRIDES.get(name, ""))
        names.append(f"{PREFIX}{name}")
    return names
