"""Reading task and group files in the subset of lm-evaluation-harness 0.4's task YAML format that
multiple-choice log-likelihood tasks use, so that such an lm-eval file runs here unchanged.

A task file names a dataset, splits and three fields of a document (eval/templates.py); a group file (`group:`)
lists tasks, groups or tags and how their scores aggregate. `include: FILE` (relative to the including file)
merges a base file under this one. `!function module.name` is accepted where it names one of our functions
(FUNCTIONS: the lm-eval helpers of the shipped tasks, written here again); anything else, and any key outside the
subset, is refused with the file and key named, so that a task never silently scores differently from lm-eval.
"""

from __future__ import annotations

import ast
import hashlib
from dataclasses import dataclass
from pathlib import Path

import yaml

from moe.errors import InputError


class TaskFileError(InputError):
    """A task or group file that cannot be used; the message names the file and key."""


# Keys of a task file that are read.
TASK_KEYS = {"task", "dataset_path", "dataset_name", "dataset_kwargs", "training_split", "validation_split",
             "test_split", "fewshot_split", "fewshot_config", "output_type", "doc_to_text", "doc_to_choice",
             "doc_to_target", "target_delimiter", "fewshot_delimiter", "description", "metric_list",
             "process_docs", "num_fewshot", "tag"}
# Keys that change no score (decontamination, bookkeeping): accepted and not used.
IGNORED_KEYS = {"should_decontaminate", "doc_to_decontamination_query", "metadata", "task_alias", "group_alias"}
GROUP_KEYS = {"group", "task", "aggregate_metric_list", "group_alias", "metadata", "tag"}
METRICS = ("acc", "acc_norm")


@dataclass(frozen=True)
class FunctionRef:
    """`!function module.name` in a file: resolved through FUNCTIONS by "folder/module.name" (the lm-eval task
    folder the file lives in) or by "module.name". module_hash: a digest of the module file beside the task file
    (its syntax tree, so formatting and comments do not count), None when there is none; tasks.py refuses a
    module that is not the lm-eval version our function reproduces."""

    name: str
    folder: str
    module_hash: str | None = None

    def lookup_names(self) -> list[str]:
        return [f"{self.folder}/{self.name}", self.name]

    @property
    def module(self) -> str:
        return f"{self.folder}/{self.name.rsplit('.', 1)[0]}"


def module_digest(path: Path) -> str | None:
    """sha256 (16 hex digits) of the module's syntax tree, None if it is missing or does not parse."""
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError, ValueError):
        return None
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()[:16]


class _Loader(yaml.SafeLoader):
    pass


def _function(loader: _Loader, node: yaml.Node) -> FunctionRef:
    name = loader.construct_scalar(node)
    module_file = loader.directory / f"{name.rsplit('.', 1)[0]}.py"
    return FunctionRef(name, loader.directory.name, module_digest(module_file) if module_file.is_file() else None)


_Loader.add_constructor("!function", _function)


def _load(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as error:
        raise TaskFileError(f"{path}: cannot read task file ({error.strerror or error})") from None
    loader = _Loader(text)
    loader.directory = path.resolve().parent
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise TaskFileError(f"{where}: not valid YAML ({getattr(error, 'problem', None) or error})") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise TaskFileError(f"{path}: a task file holds a mapping of keys (task:, dataset_path:, ...), "
                            f"got {type(data).__name__}")
    return data


def read_config(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """The file's keys with its `include` chain merged under them (the including file wins), `include` removed.
    Relative data file paths are kept as written; `source` records the file."""
    path = Path(path)
    if path.resolve() in _seen:
        raise TaskFileError(f"{path}: include cycle through {', '.join(map(str, _seen))}")
    data = _load(path)
    include = data.pop("include", None)
    merged = {}
    for name in [] if include is None else include if isinstance(include, list) else [include]:
        if not isinstance(name, str):
            raise TaskFileError(f"{path}: include: {name!r} is not a file name")
        base_path = Path(name) if Path(name).is_absolute() else path.parent / name
        if not base_path.is_file():
            raise TaskFileError(f"{path}: include: {name} not found (looked at {base_path})")
        merged.update(read_config(base_path, (*_seen, path.resolve())))  # later files win, as lm-eval merges
    merged.pop("source", None)
    return {**merged, **data, "source": str(path)}


def check_task_keys(config: dict) -> None:
    """Refuse what the subset does not cover, naming the file and key."""
    source = config.get("source", "<task>")
    for key in config:
        if key == "source" or key in TASK_KEYS or key in IGNORED_KEYS:
            continue
        if key == "group":
            raise TaskFileError(f"{source}: key 'group' in a task file (lm-eval's old grouping); list the task "
                                "in a group file instead (group: NAME, task: [...])")
        raise TaskFileError(f"{source}: key {key!r} is not supported (multiple-choice tasks use: "
                            f"{', '.join(sorted(TASK_KEYS - {'tag'}))})")
    output_type = config.get("output_type")
    if output_type is None:
        raise TaskFileError(f"{source}: no 'output_type' (lm-eval's default is generate_until); multiple-choice "
                            "tasks say output_type: multiple_choice")
    if output_type != "multiple_choice":
        raise TaskFileError(f"{source}: output_type {output_type!r} is not supported; only multiple_choice "
                            "(log-likelihood of each choice)")
    if "task" not in config:
        raise TaskFileError(f"{source}: no 'task' key (the task's name)")
    for key in ("doc_to_text", "doc_to_choice", "doc_to_target"):
        if key not in config:
            raise TaskFileError(f"{source}: task {config['task']!r} has no {key!r}")
    for key, allowed in (("dataset_kwargs", {"data_files", "trust_remote_code"}), ("fewshot_config", {"sampler"})):
        value = config.get(key) or {}
        if not isinstance(value, dict):
            raise TaskFileError(f"{source}: {key} must be a mapping")
        for sub in value:
            if sub not in allowed:
                raise TaskFileError(f"{source}: key '{key}.{sub}' is not supported (supported: "
                                    f"{', '.join(sorted(allowed))})")
    sampler = (config.get("fewshot_config") or {}).get("sampler", "default")
    if sampler not in ("default", "first_n"):
        raise TaskFileError(f"{source}: fewshot_config.sampler {sampler!r} is not supported (default, first_n)")
    for i, entry in enumerate(config.get("metric_list") or []):
        metric = entry.get("metric") if isinstance(entry, dict) else None
        if metric not in METRICS:
            raise TaskFileError(f"{source}: metric_list[{i}].metric {metric!r} is not supported "
                                f"({', '.join(METRICS)})")
        for sub, value in entry.items():
            if sub == "aggregation" and value != "mean" or sub == "higher_is_better" and value is not True:
                raise TaskFileError(f"{source}: metric_list[{i}].{sub}: {value!r} is not supported "
                                    "(acc and acc_norm are means, higher is better)")
            if sub not in ("metric", "aggregation", "higher_is_better"):
                raise TaskFileError(f"{source}: key 'metric_list[{i}].{sub}' is not supported")


def check_group_keys(config: dict) -> None:
    source = config.get("source", "<group>")
    for key in config:
        if key != "source" and key not in GROUP_KEYS:
            raise TaskFileError(f"{source}: key {key!r} is not supported in a group file (supported: "
                                f"{', '.join(sorted(GROUP_KEYS))})")
    if isinstance(config.get("task"), str):
        config["task"] = [config["task"]]
    if isinstance(config.get("aggregate_metric_list"), dict):
        config["aggregate_metric_list"] = [config["aggregate_metric_list"]]
    if not isinstance(config.get("task"), list) or not config["task"]:
        raise TaskFileError(f"{source}: group {config.get('group')!r} needs 'task': a list of tasks, groups or "
                            "task files")
    for i, entry in enumerate(config.get("aggregate_metric_list") or []):
        if not isinstance(entry, dict) or entry.get("metric") not in METRICS:
            raise TaskFileError(f"{source}: aggregate_metric_list[{i}].metric must be one of {', '.join(METRICS)}")
        for sub, value in entry.items():
            if sub == "aggregation" and value != "mean":
                raise TaskFileError(f"{source}: aggregate_metric_list[{i}].aggregation {value!r} is not "
                                    "supported (mean)")
            if sub not in ("metric", "weight_by_size", "aggregation", "filter_list"):
                raise TaskFileError(f"{source}: key 'aggregate_metric_list[{i}].{sub}' is not supported")
