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

# lm-eval's YAML for each shipped task, relative to lm_eval/tasks.
LM_EVAL_YAML = {"arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
                "hellaswag": "hellaswag/hellaswag.yaml", "piqa": "piqa/piqa.yaml",
                "winogrande": "winogrande/default.yaml", "boolq": "super_glue/boolq/default.yaml",
                "sciq": "sciq/sciq.yaml", "openbookqa": "openbookqa/openbookqa.yaml"}
# Where the local file's layout differs from lm-eval's dataset: google/boolq's bool `answer` is super_glue's
# integer `label`.
OVERRIDES = {"boolq": "doc_to_target: '{{answer | int}}'\n"}
PREFIX = "local_"


def write_lm_eval_tasks(folder: str | Path, data_dir: str | Path, tasks: list[str] | None = None) -> list[str]:
    """Write `local_<task>.yaml` for each task into `folder`; returns the lm-eval task names."""
    import lm_eval

    tasks_dir = Path(lm_eval.__file__).parent / "tasks"
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for task in tasks or list(LM_EVAL_YAML):
        local_file = resolve_local(get_task(task), data_dir).resolve()
        (folder / f"{PREFIX}{task}.yaml").write_text(
            f"include: {tasks_dir / LM_EVAL_YAML[task]}\ntask: {PREFIX}{task}\ntag: []\ndataset_path: json\n"
            f"dataset_name: null\ndataset_kwargs:\n  data_files:\n    validation: {local_file}\n"
            "training_split: null\ntest_split: null\n" + OVERRIDES.get(task, ""))
        names.append(f"{PREFIX}{task}")
    return names
