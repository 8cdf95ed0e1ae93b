"""Bad evaluation input raises an InputError naming the file and line (the command line prints it as one line, see
tests/test_input_errors.py): a row the task cannot read, a missing task file or an unreachable HF dataset, a row
whose answer has no tokens; and callback settings that are not positive are refused when the callback is built (a
zero limit used to fail only at the first evaluation, zero batch tokens to run one item per forward pass)."""

from __future__ import annotations

import json

import pytest

from eval import get_task
from eval.callback import ZeroShotEvaluation
from eval.data import EvalDataError, MissingEvalData, load_docs
from eval.harness import build_task_items
from moe.errors import InputError

PIQA_ROW = {"goal": "g", "sol1": "a", "sol2": "b", "label": 0}


def test_a_malformed_row_is_an_input_error_naming_file_and_line(tmp_path):
    path = tmp_path / "piqa.jsonl"
    path.write_text(json.dumps(PIQA_ROW) + "\n" + json.dumps({**PIQA_ROW, "label": 2}) + "\n")
    with pytest.raises(EvalDataError, match=rf"^{path}:2: malformed piqa row \(ValueError: gold answer 2 is not one"):
        load_docs(get_task("piqa"), path)


def test_a_missing_task_file_is_an_input_error_and_a_file_not_found_error(tmp_path):
    with pytest.raises(MissingEvalData, match=f"looked for: {tmp_path}/validation.jsonl") as error:
        load_docs(get_task("boolq"), tmp_path)
    assert isinstance(error.value, InputError) and isinstance(error.value, FileNotFoundError)



def test_an_unreachable_hub_dataset_says_how_to_read_local_files(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'allenai/ai2_arc' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(MissingEvalData, match=r"^no data for task 'arc_easy': the HF dataset allenai/ai2_arc ARC-Easy "
                                              r"validation cannot be loaded \(ConnectionError: Couldn't reach .*\); "
                                              r"set data_dir to a folder holding arc_easy/validation.jsonl"):
        load_docs(get_task("arc_easy"))

def test_a_continuation_without_tokens_names_file_and_line(tmp_path):
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "validation.jsonl").write_text(
        json.dumps(PIQA_ROW) + "\n\n" + json.dumps({**PIQA_ROW, "sol2": "~"}) + "\n")

    def encode(text: str) -> list[int]:  # a tokenizer with no token for " ~"
        return [ord(c) for c in text if c not in " ~"]

    with pytest.raises(EvalDataError, match=rf"^{tmp_path}/piqa/validation.jsonl:3: piqa continuation ' ~' has no "
                                            "tokens"):
        build_task_items(["piqa"], encode, 0, data_dir=tmp_path)


@pytest.mark.parametrize("name", ["limit", "batch_tokens", "every_n_steps"])
def test_callback_settings_that_are_not_positive_are_refused_when_built(name):
    with pytest.raises(ValueError, match=f"^ZeroShotEvaluation.{name}=0 must be positive or None"):
        ZeroShotEvaluation(tasks=["piqa"], **{name: 0})
