"""Rows of an evaluation task: from a local file or folder when one is given, else from the HF Hub dataset that
lm-evaluation-harness uses for the task.

Local layouts: a `.jsonl` / `.json` file of one JSON object per line (read here, so that a malformed line is
reported with its file and line number), any other file `datasets` can read by extension (parquet, csv), or a
folder holding `<split>.jsonl`, `<task>/<split>.jsonl` or `<dataset>/<name>/<split>.jsonl` (MMLU's subjects).

Bad or missing data raises an EvalDataError (an InputError: the command line prints its message, which names the
file and line, without a traceback).
"""

from __future__ import annotations

from pathlib import Path

from eval.tasks import Task
from moe.data.readers import DataError, json_records


class EvalDataError(DataError):
    """An evaluation row that cannot be scored; the message names the file and line (or dataset row) at fault."""


class MissingEvalData(EvalDataError, FileNotFoundError):
    """No data file for a task where one was looked for; the message lists the places looked at."""


def read_jsonl(path: Path) -> tuple[list[dict], list[int]]:
    """One dict per non-blank line of `path`, and the line numbers they came from; a bad line raises a
    DataError naming the file and line (moe.data's reader: also catches non-UTF-8 and truncated lines)."""
    records = list(json_records(path))
    return [record for _, record in records], [line_number for line_number, _ in records]


def local_candidates(task: Task, folder: Path, split: str) -> list[Path]:
    """Where a split's rows may lie in a folder: `<split>.jsonl`, `<task>/<split>.jsonl`, and for a dataset with
    configurations `<dataset>/<name>/<split>.jsonl` (MMLU: mmlu/anatomy/test.jsonl, from cais/mmlu's anatomy)."""
    candidates = [folder / f"{split}.jsonl", folder / task.name / f"{split}.jsonl"]
    if task.dataset_path and task.dataset_name:
        candidates.append(folder / Path(task.dataset_path).name / task.dataset_name / f"{split}.jsonl")
    return candidates


def resolve_local(task: Task, path: str | Path, split: str | None = None) -> Path:
    """The data file of `task`'s split (default: the scored one) at `path`: the file itself, or one of
    local_candidates inside a folder. A MissingEvalData (a FileNotFoundError) lists the places looked at."""
    path, split = Path(path), split or task.split
    candidates = [path] if not path.is_dir() else local_candidates(task, path, split)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise MissingEvalData(f"no data for task {task.name!r} ({split} split); looked for: "
                          f"{', '.join(map(str, candidates))}")


def _read(task: Task, path: Path | None, split: str) -> tuple[list[dict], list[str]]:
    """Rows and where each came from ("file:line" or "dataset row i"), for error messages."""
    if path is not None and path.suffix in (".jsonl", ".json"):
        rows, line_numbers = read_jsonl(path)
        return rows, [f"{path}:{n}" for n in line_numbers]
    import datasets

    if path is not None:
        rows = list(datasets.load_dataset(path.suffix.lstrip("."), data_files=str(path), split="train"))
        source = str(path)
    else:
        source = f"{task.dataset_path} {task.dataset_name or ''} {split}".replace("  ", " ")
        files = {split: task.data_files[split]} if split in task.data_files else None
        try:
            rows = list(datasets.load_dataset(task.dataset_path, task.dataset_name, data_files=files, split=split))
        except (OSError, ValueError) as error:  # offline, no such dataset or split (ConnectionError, ...)
            raise MissingEvalData(f"no data for task {task.name!r}: the HF dataset {source} cannot be loaded "
                                  f"({type(error).__name__}: {error}); set data_dir to a folder holding "
                                  f"{task.name}/{split}.jsonl to read local files") from error
    return rows, [f"{source} row {i}" for i in range(len(rows))]


def read_rows(task: Task, path: str | Path | None = None, split: str | None = None) -> tuple[list[dict], list[str]]:
    """The split's raw rows (default: the scored split) in file order, and where each came from ("file:line" or
    "dataset row i"): from `path` (see resolve_local) or the HF Hub. A line that is not a JSON object fails
    here, naming file and line."""
    split = split or task.split
    return _read(task, None if path is None else resolve_local(task, path, split), split)


def check_doc(task: Task, row: dict, place: str) -> dict:
    """The preprocessed row, checked by building its context, choices and gold answer now, so that a row lacking
    a field fails with its file and line rather than in the middle of scoring."""
    from jinja2 import UndefinedError

    try:
        doc = task.process_docs(row) if task.process_docs is not None else row
        choices = task.choices(doc)
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise TypeError(f"choices must be a list of strings, got {choices!r}")
        task.gold(doc, choices)
        text = task.text(doc)
        if isinstance(text, int):
            if not isinstance(task.target(doc), str):
                raise TypeError("a task whose doc_to_text is an index needs a string doc_to_target (the "
                                 "continuation scored after each choice)")
        elif not isinstance(text, str):
            raise TypeError(f"doc_to_text must give a string, got {text!r}")
    except (KeyError, ValueError, TypeError, IndexError, AttributeError, SyntaxError, UndefinedError) as error:
        raise EvalDataError(f"{place}: malformed {task.name} row ({type(error).__name__}: {error})") from None
    return doc


def load_docs(task: Task, path: str | Path | None = None, split: str | None = None) -> list[dict]:
    """Every row of the split (default: the scored one), preprocessed and checked (check_doc), in file order."""
    rows, places = read_rows(task, path, split)
    return [check_doc(task, row, place) for row, place in zip(rows, places)]


def data_path(task: Task, data_dir: str | Path | None, data_files: dict | None,
              split: str | None = None) -> Path | None:
    """Where the rows of `task`'s split (default: the scored one) come from, None meaning the HF Hub: the
    evaluation's data_files[task] (the scored split only), else the task file's own data_files for that split,
    else data_dir, else dataset_path when it is a local folder."""
    split = split or task.split
    if data_files and task.name in data_files and split == task.split:
        return Path(data_files[task.name])
    remote = "://" in task.data_files.get(split, "")  # hf://..., https://...: `datasets` downloads it
    if split in task.data_files and not remote:
        return Path(task.data_files[split])
    if data_dir is not None:
        return Path(data_dir)
    if remote:
        return None
    if task.dataset_path and Path(task.dataset_path).is_dir():
        return Path(task.dataset_path)
    if task.dataset_path in ("json", "csv", "parquet", "text", None):
        raise MissingEvalData(f"no data for task {task.name!r} ({split} split): {task.source or 'its file'} "
                              f"names no file for it (dataset_kwargs.data_files) and no data_dir is set")
    return None
