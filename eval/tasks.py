"""Multiple-choice tasks and groups of tasks, defined by files in lm-evaluation-harness 0.4's task YAML format
(eval/task_yaml.py reads them, eval/templates.py resolves their fields).

Shipped: the eight tasks of OLMo's table in eval/task_files/*.yaml, MMLU's 57 subjects in two forms (lettered,
`mmlu_<subject>`, and cloze, `mmlu_<subject>_continuation`) made from eval/task_files/mmlu/, and the groups
`olmo_core8`, `mmlu`, `mmlu_continuation` and MMLU's four categories. Any other task is a file: `resolve` takes
names, group names, tags and paths alike.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

from eval.task_yaml import FunctionRef, TaskFileError, check_group_keys, check_task_keys, read_config
from eval.templates import Field, resolve_choices, resolve_description, resolve_target, resolve_text

Doc = dict
TASK_FILES = Path(__file__).parent / "task_files"


# ------------------------------------------------------------------------------------------ our functions
def hellaswag_clean(text: str) -> str:
    """HellaSwag text cleaning as lm-eval's hellaswag/utils.preprocess: WikiHow's "[title]" becomes a sentence
    break and other bracketed artifacts go. Double spaces are replaced once (not collapsed), as there."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_doc(doc: Doc) -> Doc:
    """Add lm-eval's query / choices / gold fields to a raw HellaSwag row."""
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {**doc, "query": hellaswag_clean(doc["activity_label"] + ": " + ctx),
            "choices": [hellaswag_clean(ending) for ending in doc["endings"]], "gold": int(doc["label"])}


def _winogrande_text(doc: Doc) -> int:
    return {"1": 0, "2": 1}[doc["answer"]]


def _winogrande_choices(doc: Doc) -> list[str]:
    blank = doc["sentence"].index("_")
    return [doc["sentence"][:blank] + doc["option1"], doc["sentence"][:blank] + doc["option2"]]


def _winogrande_target(doc: Doc) -> str:
    return doc["sentence"][doc["sentence"].index("_") + 1:].strip()


# Row preprocessing a file may name in `process_docs`: by our name, or by the `!function` lm-eval's own file uses.
PROCESS_DOCS: dict[str, Callable[[Doc], Doc]] = {"hellaswag": hellaswag_doc,
                                                 "hellaswag/utils.process_docs": hellaswag_doc}
# lm-eval modules our functions reproduce (lm-eval 0.4.13), by module_digest: a `!function` whose module beside the
# task file differs (a user's edited copy, another lm-eval version) is refused rather than replaced by ours.
KNOWN_MODULES = {"hellaswag/utils": "98884c6d161f1cb2", "winogrande/preprocess_winogrande": "636e36a861afc8f6"}
# Functions lm-eval's own files name with `!function` for doc_to_text / doc_to_choice / doc_to_target.
FUNCTIONS: dict[str, Callable] = {"winogrande/preprocess_winogrande.doc_to_text": _winogrande_text,
                                  "winogrande/preprocess_winogrande.doc_to_choice": _winogrande_choices,
                                  "winogrande/preprocess_winogrande.doc_to_target": _winogrande_target}


# ------------------------------------------------------------------------------------------ tasks
@dataclass(frozen=True, eq=False)
class Task:
    """One multiple-choice task (the fields of an lm-eval task file that such tasks use).

    Ordinary documents give requests (context, target_delimiter + choice) per choice. A document whose
    doc_to_text is an int (Winogrande) is "partial": its choices are the contexts and the shared continuation
    target_delimiter + doc_to_target is scored after each (lm-eval's multiple-input tasks)."""

    name: str
    doc_to_text: Field
    doc_to_choice: Field
    doc_to_target: Field
    dataset_path: str | None = None  # HF Hub dataset, or a local folder
    dataset_name: str | None = None
    data_files: dict[str, str] = field(default_factory=dict)  # split -> file (dataset_kwargs.data_files)
    training_split: str | None = None
    validation_split: str | None = None
    test_split: str | None = None
    fewshot_split: str | None = None
    fewshot_sampler: str = "default"  # lm-eval's seeded random draw, or first_n (the split's first rows in order)
    num_fewshot: int | None = None  # the file's default; an evaluation's num_fewshot overrides it
    process_docs: Callable[[Doc], Doc] | None = None  # applied to every row as it is loaded
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    description: str = ""
    metrics: tuple[str, ...] = ("acc", "acc_norm")
    tags: tuple[str, ...] = ()
    source: str = ""  # the file it was read from
    fingerprint: str = field(default="", repr=False)  # its definition, so caches never mix two tasks of one name

    @property
    def split(self) -> str:
        """The split scored: the test split when the file names one, else the validation split (as lm-eval)."""
        return self.test_split or self.validation_split

    @property
    def fewshot_source(self) -> str | None:
        """Where few-shot examples come from: fewshot_split, else the training, validation or test split."""
        return self.fewshot_split or self.training_split or self.validation_split or self.test_split

    @property
    def fewshot_excludes_doc(self) -> bool:
        """lm-eval leaves the scored document out of its own examples when fewshot_split equals test_split
        (both unset included: then examples may come from the scored split)."""
        return self.fewshot_split == self.test_split

    def text(self, doc: Doc) -> str | int:
        return resolve_text(self.doc_to_text, doc)

    def choices(self, doc: Doc) -> list[str]:
        return resolve_choices(self.doc_to_choice, doc)

    def target(self, doc: Doc) -> int | str | list:
        return resolve_target(self.doc_to_target, doc)

    def description_for(self, doc: Doc) -> str:
        return resolve_description(self.description, doc)

    def gold(self, doc: Doc, choices: list[str] | None = None) -> int:
        """Index of the correct choice: doc_to_text for partial documents, else doc_to_target (an index, or a
        string that is one of the choices, as lm-eval maps it). A ValueError when it is neither."""
        choices = self.choices(doc) if choices is None else choices
        text = self.text(doc)
        gold = text if isinstance(text, int) else self.target(doc)
        if isinstance(gold, str):
            if gold not in choices:
                raise ValueError(f"answer {gold!r} is not one of the choices {choices}")
            gold = choices.index(gold)
        if not isinstance(gold, int) or isinstance(gold, bool):
            raise TypeError(f"answer {gold!r} is not a choice index (multiple correct answers are not supported)")
        if not 0 <= gold < len(choices):
            raise ValueError(f"gold answer {gold} is not one of the {len(choices)} choices")
        return gold


def _check_module(ref: FunctionRef, key: str, source: str) -> None:
    if ref.module_hash is not None and KNOWN_MODULES.get(ref.module) != ref.module_hash:
        raise TaskFileError(f"{source}: {key}: !function {ref.name}: {ref.module}.py beside the file is not the "
                            "lm-eval 0.4.13 module our function reproduces; write the change as a Jinja template")


def _field(value, key: str, source: str):
    """A doc_to_* value with `!function` references resolved through FUNCTIONS."""
    if isinstance(value, FunctionRef):
        _check_module(value, key, source)
        for name in value.lookup_names():
            if name in FUNCTIONS:
                return FUNCTIONS[name]
        raise TaskFileError(f"{source}: {key}: !function {value.name} is not one of ours (known: "
                            f"{', '.join(sorted(FUNCTIONS))}); write it as a Jinja template")
    if not isinstance(value, (int, str, list, dict)) or isinstance(value, bool):
        raise TaskFileError(f"{source}: {key} must be a field name, a Jinja template, an int or a list; got "
                            f"{value!r}")
    if isinstance(value, str) and ("{{" in value or "{%" in value):
        from jinja2 import TemplateSyntaxError

        from eval.templates import compile_template

        try:
            compile_template(value)
        except TemplateSyntaxError as error:
            raise TaskFileError(f"{source}: {key}: bad Jinja template ({error.message})") from None
    return value


def _process_docs(value, source: str):
    if value is None:
        return None
    if isinstance(value, FunctionRef):
        _check_module(value, "process_docs", source)
    names = value.lookup_names() if isinstance(value, FunctionRef) else [value]
    for name in names:
        if isinstance(name, str) and name in PROCESS_DOCS:
            return PROCESS_DOCS[name]
    shown = value.name if isinstance(value, FunctionRef) else value
    raise TaskFileError(f"{source}: process_docs {shown!r} is not one of ours (known: "
                        f"{', '.join(sorted(PROCESS_DOCS))})")


def _data_files(config: dict, source: str) -> dict[str, str]:
    files = (config.get("dataset_kwargs") or {}).get("data_files") or {}
    if isinstance(files, str):
        files = {"train": files}  # datasets' convention for a single file
    if not isinstance(files, dict):
        raise TaskFileError(f"{source}: dataset_kwargs.data_files must map split names to files")
    base = Path(source).parent
    resolved = {}
    for split, file in files.items():
        if "://" in str(file):  # hf://datasets/..., https://...: read by `datasets`, not a local path
            resolved[split] = str(file)
            continue
        file = Path(str(file))
        # As written (relative to the working directory, as lm-eval reads it), else beside the task file.
        resolved[split] = str(file if file.is_absolute() or file.exists() or not (base / file).exists()
                              else base / file)
    return resolved


def task_from_config(config: dict) -> Task:
    """A Task from a task file's merged keys (read_config); a TaskFileError names the file and key."""
    check_task_keys(config)
    source = config.get("source", "")
    name = str(config["task"])
    if not (config.get("test_split") or config.get("validation_split")):
        raise TaskFileError(f"{source}: task {name!r} names no split to score (test_split or validation_split)")
    metrics = tuple(entry["metric"] for entry in config.get("metric_list") or []) or ("acc", "acc_norm")
    tags = config.get("tag") or ()
    num_fewshot = config.get("num_fewshot")
    if num_fewshot is not None and (not isinstance(num_fewshot, int) or num_fewshot < 0):
        raise TaskFileError(f"{source}: num_fewshot must be a non-negative integer, got {num_fewshot!r}")
    for key in ("target_delimiter", "fewshot_delimiter", "description"):
        if key in config and not isinstance(config[key], str):
            raise TaskFileError(f"{source}: {key} must be a string, got {config[key]!r}")
    return Task(
        name=name, source=source,
        doc_to_text=_field(config["doc_to_text"], "doc_to_text", source),
        doc_to_choice=_field(config["doc_to_choice"], "doc_to_choice", source),
        doc_to_target=_field(config["doc_to_target"], "doc_to_target", source),
        dataset_path=config.get("dataset_path"), dataset_name=config.get("dataset_name"),
        data_files=_data_files(config, source),
        training_split=config.get("training_split"), validation_split=config.get("validation_split"),
        test_split=config.get("test_split"), fewshot_split=config.get("fewshot_split"),
        fewshot_sampler=(config.get("fewshot_config") or {}).get("sampler", "default"),
        num_fewshot=num_fewshot, process_docs=_process_docs(config.get("process_docs"), source),
        target_delimiter=config.get("target_delimiter", " "),
        fewshot_delimiter=config.get("fewshot_delimiter", "\n\n"),
        description=config.get("description", ""), metrics=metrics,
        tags=tuple([tags] if isinstance(tags, str) else tags),
        fingerprint=repr(sorted((k, repr(v)) for k, v in config.items() if k != "source")),
    )


# ------------------------------------------------------------------------------------------ groups
@dataclass(frozen=True, eq=False)
class Group:
    """Tasks (and groups) scored together. aggregate: (metric, weight_by_size) pairs; a size-weighted mean over
    the leaf tasks with the pooled standard error, or a plain mean, as lm-eval 0.4 aggregates (eval/groups.py)."""

    name: str
    members: tuple[Task | Group, ...]
    aggregate: tuple[tuple[str, bool], ...] = (("acc", True),)
    source: str = ""

    def leaves(self) -> list[Task]:
        """Every task under this group, depth first, each once."""
        seen, out = set(), []
        for member in self.members:
            for task in member.leaves() if isinstance(member, Group) else [member]:
                if task.name not in seen:
                    seen.add(task.name)
                    out.append(task)
        return out

    def subgroups(self) -> list[Group]:
        """Groups under this one, depth first (not itself)."""
        out = []
        for member in self.members:
            if isinstance(member, Group):
                out += [member, *member.subgroups()]
        return out


def _is_group(config: dict) -> bool:
    """A group file names a group and lists its tasks; a file with a task's fields is a task file (whose old-style
    `group:` key check_task_keys refuses)."""
    return "group" in config and not any(key in config for key in ("doc_to_text", "doc_to_choice", "dataset_path"))


def _aggregate(config: dict) -> tuple[tuple[str, bool], ...]:
    return tuple((entry["metric"], bool(entry.get("weight_by_size", True)))
                 for entry in config.get("aggregate_metric_list") or [])


# ------------------------------------------------------------------------------------------ shipped ones
@dataclass
class Registry:
    tasks: dict[str, Task]
    groups: dict[str, Group]

    def tagged(self, tag: str) -> list[Task]:
        return [task for task in self.tasks.values() if tag in task.tags]


def _mmlu(tasks: dict[str, Task], groups: dict[str, Group]) -> None:
    """MMLU's subjects from eval/task_files/mmlu: each subject is the template with its name, description and
    category tag, as lm-eval's generated per-subject files are."""
    folder = TASK_FILES / "mmlu"
    subjects = yaml.safe_load((folder / "subjects.yaml").read_text())
    forms = {"": (read_config(folder / "default.yaml"),
                  "The following are multiple choice questions (with answers) about {}.\n\n"),
             "_continuation": (read_config(folder / "continuation.yaml"),
                               "The following are questions (with answers) about {}.\n\n")}
    for suffix, (template, description) in forms.items():
        categories = []
        for category, names in subjects.items():
            members = []
            for subject in names:
                name = f"mmlu_{subject}{suffix}"
                tasks[name] = task_from_config({**template, "task": name, "dataset_name": subject,
                                                "description": description.format(subject.replace("_", " ")),
                                                "tag": f"mmlu_{category}_tasks" if not suffix else
                                                f"mmlu_{category}_continuation"})
                members.append(tasks[name])
            groups[f"mmlu_{category}{suffix}"] = Group(f"mmlu_{category}{suffix}", tuple(members),
                                                       source=str(folder / "subjects.yaml"))
            categories.append(groups[f"mmlu_{category}{suffix}"])
        groups[f"mmlu{suffix}"] = Group(f"mmlu{suffix}", tuple(categories), source=str(folder / "subjects.yaml"))


@lru_cache(maxsize=1)
def shipped() -> Registry:
    """The shipped tasks and groups (read once)."""
    tasks, groups, group_configs = {}, {}, []
    for path in sorted(TASK_FILES.glob("*.yaml")):
        config = read_config(path)
        if _is_group(config):
            group_configs.append(config)
        else:
            task = task_from_config(config)
            tasks[task.name] = task
    _mmlu(tasks, groups)
    registry = Registry(tasks, groups)
    for config in group_configs:  # names resolve to the shipped tasks (the registry), not to files beside them
        groups[config["group"]] = _group_from_config(config, registry, Path("/nonexistent"), {})
    return registry


def task_names() -> list[str]:
    """The shipped tasks defined by their own files (OLMo's eight), sorted; MMLU's subjects are the leaves of
    the `mmlu` and `mmlu_continuation` groups (group_names())."""
    return sorted(name for name in shipped().tasks if not name.startswith("mmlu_"))


def group_names() -> list[str]:
    return sorted(shipped().groups)


def _unknown(spec: str) -> TaskFileError:
    return TaskFileError(
        f"unknown task {spec!r}: not a shipped task ({', '.join(task_names())}, mmlu_<subject>, "
        f"mmlu_<subject>_continuation), group ({', '.join(group_names())}), tag, or task file")


# ------------------------------------------------------------------------------------------ resolving names
@dataclass
class FolderIndex:
    """The task, group and tag names defined by the task files under a folder (recursively), as lm-eval indexes
    an include path: names in a group file resolve here before the shipped ones, so a user's copy of a task
    shadows ours."""

    names: dict[str, Path]
    tags: dict[str, list[Path]]

    @classmethod
    def of(cls, folder: Path) -> FolderIndex:
        names, tags = {}, {}
        for path in sorted(folder.rglob("*.yaml")):
            if any(part.startswith(".") for part in path.relative_to(folder).parts):
                continue
            try:
                config = read_config(path)
            except TaskFileError:
                continue  # an unreadable neighbour only matters if something names it
            name = config.get("group") if _is_group(config) else config.get("task")
            if isinstance(name, str):
                names.setdefault(name, path)
            file_tags = config.get("tag") or []
            for tag in [file_tags] if isinstance(file_tags, str) else file_tags:
                tags.setdefault(str(tag), []).append(path)
        return cls(names, tags)


def _from_file(path: Path, registry: Registry, indexes: dict) -> Task | Group:
    config = read_config(path)
    if _is_group(config):
        return _group_from_config(config, registry, path.parent, indexes)
    return task_from_config(config)


def _group_from_config(config: dict, registry: Registry, folder: Path, indexes: dict) -> Group:
    check_group_keys(config)
    source = config.get("source", "")
    members = []
    for entry in config["task"]:
        if isinstance(entry, dict) and "group" in entry:  # inline, as lm-eval's mmlu_continuation nests categories
            members.append(_group_from_config({"source": source, **entry}, registry, folder, indexes))
        elif isinstance(entry, dict):
            if set(entry) != {"task"}:
                raise TaskFileError(f"{source}: a task listed with settings ({', '.join(sorted(entry))}) is not "
                                    "supported; write those settings in a task file and list that")
            members += _resolve_in_folder(str(entry["task"]), registry, folder, indexes)
        else:
            members += _resolve_in_folder(str(entry), registry, folder, indexes)
    return Group(str(config["group"]), tuple(members), _aggregate(config), source)


def _resolve_in_folder(spec: str, registry: Registry, folder: Path, indexes: dict) -> list[Task | Group]:
    """A name inside a group file: a file, task, group or tag of the group file's folder first, then ours."""
    if folder.is_dir():
        if (folder / spec).is_file():
            return [_from_file(folder / spec, registry, indexes)]
        if folder not in indexes:
            indexes[folder] = FolderIndex.of(folder)
        index = indexes[folder]
        if spec in index.names:
            return [_from_file(index.names[spec], registry, indexes)]
        if spec in index.tags:
            return [_from_file(path, registry, indexes) for path in index.tags[spec]]
    return _resolve_one(spec, registry, indexes)


def _resolve_one(spec: str, registry: Registry, indexes: dict) -> list[Task | Group]:
    """A name given directly: a shipped task, group or tag, else a task or group file."""
    if spec in registry.tasks:
        return [registry.tasks[spec]]
    if spec in registry.groups:
        return [registry.groups[spec]]
    if registry.tagged(spec):
        return registry.tagged(spec)
    if not Path(spec).is_file():
        raise _unknown(spec)
    return [_from_file(Path(spec), registry, indexes)]


def resolve(specs: list[str]) -> list[Task | Group]:
    """Tasks and groups for `specs` (shipped task names, group names, tags, task or group files), in order; a
    tag gives its tasks. A TaskFileError names an unknown spec, a bad file and key, or two different tasks of
    one name (the same task reached twice is one task)."""
    registry, indexes = shipped(), {}
    out = []
    for spec in specs:
        out += _resolve_one(str(spec), registry, indexes)
    by_name: dict[str, Task] = {}
    for item in out:
        for task in item.leaves() if isinstance(item, Group) else [item]:
            known = by_name.setdefault(task.name, task)
            if known.fingerprint != task.fingerprint:
                raise TaskFileError(f"two different tasks are called {task.name!r} ({known.source} and "
                                    f"{task.source}); rename one")
    return out


def leaf_tasks(selection: list[Task | Group]) -> list[Task]:
    """Every task of a selection once (by name: resolve refuses two different tasks of one name), in order."""
    seen, out = set(), []
    for item in selection:
        for task in item.leaves() if isinstance(item, Group) else [item]:
            if task.name not in seen:
                seen.add(task.name)
                out.append(task)
    return out


def get_task(name: str) -> Task:
    """The shipped task called `name` (or the task in file `name`); a TaskFileError (a ValueError) lists the
    available ones."""
    resolved = _resolve_one(name, shipped(), {})
    if len(resolved) != 1 or not isinstance(resolved[0], Task):
        raise TaskFileError(f"{name!r} is a group or tag, not a task")
    return resolved[0]


def get_group(name: str) -> Group:
    try:
        return shipped().groups[name]
    except KeyError:
        raise _unknown(name) from None
