"""Few-shot examples and the text they make, as lm-evaluation-harness 0.4 chooses and writes them
(lm_eval/api/samplers.py ContextSampler and FirstNSampler; ConfigurableTask.fewshot_context and build_qa_turn).

Samplers:
- default: one random.Random(seed) per task (lm-eval's fewshot_random_seed, 1234) draws, for each scored document
  in document order, n examples from the few-shot pool (n + 1 when the scored document may be in the pool, which
  is then removed: see Task.fewshot_excludes_doc). The draws of one document depend on those of every earlier
  scored document, so a subsample gets the examples lm-eval gives the same documents (its `samples` option).
- first_n: the pool's first n rows in order (MMLU's dev rows).

Text: the task's description, then per example its context, target_delimiter, its answer and fewshot_delimiter,
then the scored document's context.
"""

from __future__ import annotations

import random

from eval.tasks import Doc, Task

FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed


def draw_examples(task: Task, docs: dict[int, Doc], pool: list[Doc], n: int,
                  seed: int = FEWSHOT_SEED) -> dict[int, list[Doc]]:
    """n examples from `pool` for each scored document ({index: doc}), as lm-eval's sampler gives them when it
    builds the requests of those documents in index order. A ValueError if the pool is too small."""
    if n == 0:
        return {i: [] for i in docs}
    exclude = task.fewshot_excludes_doc
    needed = n + 1 if exclude and task.fewshot_sampler == "default" else n
    if len(pool) < needed:
        raise ValueError(f"task {task.name!r}: {n}-shot needs {needed} few-shot examples, its "
                         f"{task.fewshot_source} split has {len(pool)}")
    if task.fewshot_sampler == "first_n":
        return {i: ([x for x in pool if x != doc] if exclude else pool)[:n] for i, doc in docs.items()}
    rnd = random.Random(seed)
    out = {}
    for i in sorted(docs):
        doc = docs[i]
        if exclude:
            # random.sample picks positions from the population's length only, so drawing positions is drawing docs.
            examples = [pool[j] for j in rnd.sample(range(len(pool)), n + 1) if pool[j] != doc][:n]
            if len(examples) < n:  # copies of the document in the pool were drawn: redraw without any of them
                others = [x for x in pool if x != doc]
                examples = [others[j] for j in rnd.sample(range(len(others)), n)]
        else:
            examples = [pool[j] for j in rnd.sample(range(len(pool)), n)]
        out[i] = examples
    return out


def example_text(task: Task, example: Doc) -> str:
    """One solved example: its context, the target delimiter, its answer and the few-shot delimiter."""
    text, choices, target = task.text(example), task.choices(example), task.target(example)
    if isinstance(text, int):  # choices are the contexts: the example shows the correct one, then the continuation
        text, choices = choices[text], None
    if target is None or target == "":
        return text
    if choices and isinstance(target, int):
        answer = choices[target]
    else:
        answer = target[0] if isinstance(target, list) else target
    return text + task.target_delimiter + str(answer) + task.fewshot_delimiter


def context_prefix(task: Task, doc: Doc, examples: list[Doc]) -> str:
    """What precedes the scored document's own context: the description and the solved examples."""
    return task.description_for(doc) + "".join(example_text(task, example) for example in examples)
