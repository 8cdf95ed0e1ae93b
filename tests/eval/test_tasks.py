"""eval.tasks and eval.requests against lm-eval's own code: HellaSwag preprocessing vs
lm_eval.tasks.hellaswag.utils on real rows, and lm-eval's tokenization of requests (trailing whitespace,
empty context) vs eval.requests.encode_pair. Request strings for every task are compared in test_parity."""

from __future__ import annotations

import pytest

from eval import get_task, task_names
from eval.requests import doc_requests, encode_pair
from eval.tasks import hellaswag_doc

from .conftest import rows


def test_task_names_and_unknown_task():
    assert task_names() == ["arc_challenge", "arc_easy", "boolq", "hellaswag", "openbookqa", "piqa", "sciq",
                            "winogrande"]
    with pytest.raises(ValueError, match=r"^unknown task 'arc': not a shipped task \(arc_challenge, arc_easy, boolq"):
        get_task("arc")


def test_hellaswag_preprocessing_matches_lm_eval(evaldata):
    datasets = pytest.importorskip("datasets")
    from lm_eval.tasks.hellaswag.utils import process_docs

    raw = rows("hellaswag")[::10]  # ActivityNet and WikiHow rows alike
    theirs = process_docs(datasets.Dataset.from_list(raw))
    ours = [hellaswag_doc(row) for row in raw]
    assert [d["query"] for d in ours] == theirs["query"]
    assert [d["choices"] for d in ours] == theirs["choices"]
    assert [d["gold"] for d in ours] == theirs["gold"]
    assert any(".." in c or c.startswith(" ") for d in ours for c in d["choices"])  # the quirks kept


def test_winogrande_requests_are_partial(evaldata):
    doc = rows("winogrande", 1)[0]
    blank = doc["sentence"].index("_")
    requests = doc_requests(get_task("winogrande"), doc)
    suffix = " " + doc["sentence"][blank + 1:].strip()
    assert requests == [(doc["sentence"][:blank] + doc["option1"], suffix),
                        (doc["sentence"][:blank] + doc["option2"], suffix)]


class _Recorder:
    """Stands in for lm-eval's HFLM: its tok_encode is our tokenizer, and it records what loglikelihood tokenizes."""

    def __init__(self, tokenizer, prefix_id):
        self.tokenizer = tokenizer
        self.prefix_token_id = prefix_id
        self.backend = "causal"

    def _encode_pair(self, context, continuation):
        from lm_eval.api.model import TemplateLM

        return TemplateLM._encode_pair(self, context, continuation)

    def tok_encode(self, text, add_special_tokens=None, **kwargs):
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def _loglikelihood_tokens(self, requests, disable_tqdm=False):
        return [(context, continuation) for _, context, continuation in requests]


@pytest.mark.parametrize("context, continuation", [
    ("Question: what?\nAnswer:", " yes"),  # the ordinary case
    ("Question: what?\nAnswer: ", "yes"),  # trailing space moves to the continuation
    ("A sentence ends here.\n\n", " Next"),  # trailing newlines too
    ("", " starts without context"),  # empty context: the prefix token conditions
    ("", "<|endoftext|> starts with the prefix token"),
])
def test_encode_pair_matches_lm_eval(tokenizer, context, continuation):
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import TemplateLM

    prefix_id = tokenizer.token_to_id("<|endoftext|>")
    recorder = _Recorder(tokenizer, prefix_id)
    request = Instance("loglikelihood", {}, (context, continuation), 0)
    expected = TemplateLM.loglikelihood(recorder, [request], disable_tqdm=True)[0]

    def encode(text):
        return tokenizer.encode(text, add_special_tokens=False).ids

    assert encode_pair(encode, context, continuation, prefix_id) == expected


def test_the_eval_configs_name_shipped_tasks_and_groups():
    import yaml

    from eval.tasks import get_group, resolve

    from ..cli_runs import ROOT

    config = {name: yaml.safe_load((ROOT / f"configs/eval/{name}.yaml").read_text())["eval"]
              for name in ("olmo-8", "zero-shot", "mmlu")}
    assert config["olmo-8"]["tasks"] == ["olmo_core8"]
    assert [t.name for t in get_group("olmo_core8").leaves()] == task_names()
    assert set(config["zero-shot"]["tasks"]) == set(task_names()) - {"sciq", "openbookqa"}
    (mmlu,) = resolve(config["mmlu"]["tasks"])
    assert len(mmlu.leaves()) == 57 and config["mmlu"]["num_fewshot"] == 5
