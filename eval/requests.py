"""Log-likelihood requests of a multiple-choice task, as lm-evaluation-harness 0.4 builds and tokenizes them
(lm_eval/api/task.py ConfigurableTask.construct_requests; lm_eval/api/model.py TemplateLM.loglikelihood and
_encode_pair for causal models).

A request is (context, continuation). Its tokens are those of the whole string: trailing whitespace of the
context moves to the continuation (so " Paris" stays one word), and the continuation's tokens are
encode(context + continuation)[len(encode(context)):], which keeps merges across the boundary exactly as the
whole text tokenizes. An empty context is replaced by the prefix token (EOS here, as lm-eval's HF backend uses
for tokenizers without BOS) unless the continuation already starts with it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from eval.data import EvalDataError
from eval.fewshot import context_prefix
from eval.tasks import Doc, Task


@dataclass(frozen=True)
class Item:
    """One document's requests: strings, tokens and what scoring needs (gold index, choice lengths)."""

    task: str
    index: int  # position of the document in the task's rows
    requests: list[tuple[str, str]]  # (context, continuation) per choice
    tokens: list[tuple[list[int], list[int]]]  # (context ids, continuation ids) per choice
    gold: int
    choice_chars: list[int]  # length in characters of each choice, the acc_norm divisor


def doc_requests(task: Task, doc: Doc, examples: list[Doc] = ()) -> list[tuple[str, str]]:
    """(context, continuation) per choice of one document, after the task's description and the solved few-shot
    `examples` (none: zero-shot)."""
    prefix = context_prefix(task, doc, list(examples))
    text = task.text(doc)
    if isinstance(text, int):  # partial: every choice completes the context, the same continuation is scored
        continuation = task.target_delimiter + task.target(doc)
        return [(prefix + choice, continuation) for choice in task.choices(doc)]
    return [(prefix + text, task.target_delimiter + choice) for choice in task.choices(doc)]


def _move_spaces(context: str, continuation: str) -> tuple[str, str]:
    """The context's trailing whitespace moved to the start of the continuation."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        return context[:-n_spaces], context[-n_spaces:] + continuation
    return context, continuation


def pair_texts(context: str, continuation: str) -> list[str]:
    """The strings encode_pair encodes for this request."""
    if context == "":
        return [continuation]
    context, continuation = _move_spaces(context, continuation)
    return [context + continuation, context]


def encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str,
                prefix_id: int) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) of one request, as lm-eval tokenizes it for a causal model."""
    texts = pair_texts(context, continuation)  # what is encoded, in one place (bulk encoding reads it too)
    if len(texts) == 1:  # no context
        continuation_ids = encode(texts[0])
        if continuation_ids and continuation_ids[0] == prefix_id:
            return continuation_ids[:1], continuation_ids[1:]
        return [prefix_id], continuation_ids
    whole, context_ids = (encode(text) for text in texts)
    return context_ids, whole[len(context_ids):]


def build_items(task: Task, docs: dict[int, Doc], indices: list[int], encode: Callable[[str], list[int]],
                prefix_id: int, places: list[str] | None = None, examples: dict[int, list[Doc]] | None = None,
                encode_batch: Callable[[list[str]], list[list[int]]] | None = None) -> list[Item]:
    """Items for the documents at `indices` (with their few-shot `examples` when given); a request whose
    continuation has no tokens is an error (lm-eval asserts the same), as it would score 0 for every choice: an
    EvalDataError naming the row's place (places[index], "file:line") when given. Every distinct string is
    encoded once, all of them in one encode_batch call when given (the same ids as encode's, string by string:
    a Rust tokenizer's batch runs on all cores)."""
    requests = {index: doc_requests(task, docs[index], examples[index] if examples else ()) for index in indices}
    texts = list(dict.fromkeys(text for pairs in requests.values() for pair in pairs for text in pair_texts(*pair)))
    encoded = dict(zip(texts, encode_batch(texts) if encode_batch is not None else map(encode, texts)))
    items = []
    for index in indices:
        doc = docs[index]
        tokens = [encode_pair(encoded.__getitem__, context, continuation, prefix_id)
                  for context, continuation in requests[index]]
        for (context, continuation), (_, continuation_ids) in zip(requests[index], tokens):
            if not continuation_ids:
                place = places[index] if places is not None else f"row {index}"
                raise EvalDataError(f"{place}: {task.name} continuation {continuation!r} has no tokens")
        choices = task.choices(doc)
        items.append(Item(task.name, index, requests[index], tokens, task.gold(doc, choices),
                          [len(c) for c in choices]))
    return items
