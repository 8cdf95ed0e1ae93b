"""Zero-shot multiple-choice task definitions, following lm-evaluation-harness 0.4's task YAMLs
(lm_eval/tasks/{arc,hellaswag,piqa,winogrande,super_glue/boolq,sciq,openbookqa}) so that the same documents give
the same requests.

A task is data (where its rows live) plus four small functions of one row: the context, the choices, the gold
choice index and, for "partial" tasks (Winogrande, Sakaguchi et al. 2020), the continuation shared by all
choices. Adding a multiple-choice task means adding one `Task(...)` to TASKS.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

Doc = dict


@dataclass(frozen=True)
class Task:
    """One multiple-choice task.

    Ordinary task: requests are (context(doc), " " + c) for c in choices(doc).
    Partial task: requests are (c, " " + continuation(doc)) for c in choices(doc): each choice fills in the
    context and the shared continuation is scored (lm-eval's "multiple_input" tasks)."""

    name: str
    hf_path: str  # HF Hub dataset used when no local file is given
    hf_name: str | None
    split: str
    context: Callable[[Doc], str] | None
    choices: Callable[[Doc], list[str]]
    gold: Callable[[Doc], int]
    metrics: tuple[str, ...] = ("acc", "acc_norm")
    continuation: Callable[[Doc], str] | None = None  # set for partial tasks
    preprocess: Callable[[Doc], Doc] | None = None  # applied to every row as it is loaded
    target_delimiter: str = " "

    @property
    def partial(self) -> bool:
        return self.continuation is not None


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


def _winogrande_blank(doc: Doc) -> int:
    return doc["sentence"].index("_")


def _question_answer(field: str) -> Callable[[Doc], str]:
    return lambda doc: f"Question: {doc[field]}\nAnswer:"


def _arc(name: str, hf_name: str) -> Task:
    return Task(name, "allenai/ai2_arc", hf_name, "validation", context=_question_answer("question"),
                choices=lambda doc: list(doc["choices"]["text"]),
                gold=lambda doc: list(doc["choices"]["label"]).index(doc["answerKey"]))


TASKS: dict[str, Task] = {task.name: task for task in [
    _arc("arc_easy", "ARC-Easy"),
    _arc("arc_challenge", "ARC-Challenge"),
    Task("hellaswag", "Rowan/hellaswag", None, "validation", context=lambda doc: doc["query"],
         choices=lambda doc: doc["choices"], gold=lambda doc: doc["gold"], preprocess=hellaswag_doc),
    Task("piqa", "baber/piqa", None, "validation", context=_question_answer("goal"),
         choices=lambda doc: [doc["sol1"], doc["sol2"]], gold=lambda doc: int(doc["label"])),
    # Each option fills the blank; the rest of the sentence is scored given each filled-in prefix.
    Task("winogrande", "allenai/winogrande", "winogrande_xl", "validation", context=None,
         choices=lambda doc: [doc["sentence"][:_winogrande_blank(doc)] + option
                              for option in (doc["option1"], doc["option2"])],
         continuation=lambda doc: doc["sentence"][_winogrande_blank(doc) + 1:].strip(),
         gold=lambda doc: {"1": 0, "2": 1}[doc["answer"]], metrics=("acc",)),
    # google/boolq's layout (answer: bool); lm-eval reads super_glue's copy, whose label is int(answer).
    Task("boolq", "google/boolq", None, "validation",
         context=lambda doc: f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:",
         choices=lambda doc: ["no", "yes"], gold=lambda doc: int(doc["answer"] if "answer" in doc else doc["label"]),
         metrics=("acc",)),
    # The supporting paragraph (empty for some rows, which then start with the newline), then the question; the
    # correct answer is always the fourth choice.
    Task("sciq", "allenai/sciq", None, "validation",
         context=lambda doc: f"{doc['support'].lstrip()}\nQuestion: {doc['question']}\nAnswer:",
         choices=lambda doc: [doc["distractor1"], doc["distractor2"], doc["distractor3"], doc["correct_answer"]],
         gold=lambda doc: 3),
    # The bare question stem, no "Question:"/"Answer:" frame (lm-eval's openbookqa.yaml).
    Task("openbookqa", "allenai/openbookqa", "main", "validation", context=lambda doc: doc["question_stem"],
         choices=lambda doc: list(doc["choices"]["text"]),
         gold=lambda doc: list(doc["choices"]["label"]).index(doc["answerKey"].lstrip())),
]}


def task_names() -> list[str]:
    """Names of the shipped tasks, sorted."""
    return sorted(TASKS)


def get_task(name: str) -> Task:
    """The task called `name`; a ValueError lists the available ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; available tasks: {', '.join(task_names())}") from None
