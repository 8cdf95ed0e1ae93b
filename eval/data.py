"""Rows of an evaluation task: from a local file or folder when one is given, else from the HF Hub dataset that
lm-evaluation-harness uses for the task.

Local layouts: a `.jsonl` / `.json` file of one JSON object per line (read here, so that a malformed line is
reported with its file and line number), any other file `datasets` can read by extension (parquet, csv), or a
folder holding `<split>.jsonl` or `<task>/<split>.jsonl`.

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


def resolve_local(task: Task, path: str | Path) -> Path:
    """The data file for `task` at `path`: the file itself, or inside a folder `<split>.jsonl` or
    `<task>/<split>.jsonl`. A MissingEvalData (a FileNotFoundError) lists the places looked at."""
    path = Path(path)
    candidates = [path] if not path.is_dir() else [path / f"{task.split}.jsonl",
                                                    path / task.name / f"{task.split}.jsonl"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise MissingEvalData(f"no data for task {task.name!r}; looked for: {', '.join(map(str, candidates))}")


def _read(task: Task, path: Path | None) -> tuple[list[dict], list[str]]:
    """Rows and where each came from ("file:line" or "dataset row i"), for error messages."""
    if path is not None and path.suffix in (".jsonl", ".json"):
        rows, line_numbers = read_jsonl(path)
        return rows, [f"{path}:{n}" for n in line_numbers]
    import datasets

    if path is not None:
        rows = list(datasets.load_dataset(path.suffix.lstrip("."), data_files=str(path), split="train"))
        source = str(path)
    else:
        source = f"{task.hf_path} {task.hf_name or ''} {task.split}".replace("  ", " ")
        try:
            rows = list(datasets.load_dataset(task.hf_path, task.hf_name, split=task.split))
        except OSError as error:  # offline, or no such dataset (ConnectionError, DatasetNotFoundError)
            raise MissingEvalData(f"no data for task {task.name!r}: the HF dataset {source} cannot be loaded "
                                  f"({type(error).__name__}: {error}); set data_dir to a folder holding "
                                  f"{task.name}/{task.split}.jsonl to read local files") from error
    return rows, [f"{source} row {i}" for i in range(len(rows))]


def read_rows(task: Task, path: str | Path | None = None) -> tuple[list[dict], list[str]]:
    """The task's raw rows in file order, and where each came from ("file:line" or "dataset row i"): from `path`
    (see resolve_local) or the HF Hub. A line that is not a JSON object fails here, naming file and line."""
    return _read(task, None if path is None else resolve_local(task, path))


def check_doc(task: Task, row: dict, place: str) -> dict:
    """The preprocessed row, checked by building its context, choices and gold answer now, so that a row lacking
    a field fails with its file and line rather than in the middle of scoring."""
    try:
        doc = task.preprocess(row) if task.preprocess is not None else row
        choices = task.choices(doc)
        gold = task.gold(doc)
        if task.partial:
            task.continuation(doc)
        else:
            task.context(doc)
        if not 0 <= gold < len(choices):
            raise ValueError(f"gold answer {gold} is not one of the {len(choices)} choices")
    except (KeyError, ValueError, TypeError, IndexError, AttributeError) as error:
        raise EvalDataError(f"{place}: malformed {task.name} row ({type(error).__name__}: {error})") from None
    return doc


def load_docs(task: Task, path: str | Path | None = None) -> list[dict]:
    """Every row of the task, preprocessed and checked (check_doc), in file order."""
    rows, places = read_rows(task, path)
    return [check_doc(task, row, place) for row, place in zip(rows, places)]


def data_path(task: Task, data_dir: str | Path | None, data_files: dict | None) -> Path | None:
    """Where `task`'s rows come from: its entry in data_files, else data_dir, else None (the HF Hub)."""
    if data_files and task.name in data_files:
        return Path(data_files[task.name])
    return None if data_dir is None else Path(data_dir)
