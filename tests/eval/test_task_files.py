"""Task and group files (eval/task_yaml.py, eval/tasks.py), few-shot draws (eval/fewshot.py) and group scores
(eval/groups.py) against lm-evaluation-harness's own code and files. End-to-end parity of the requests and scores
is in test_parity.py and test_fewshot_parity.py."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from eval.data import data_path, load_docs, read_rows
from eval.fewshot import draw_examples
from eval.groups import aggregate, pooled_stderr, proportional_limits, unweighted_stderr
from eval.lm_eval_tasks import write_lm_eval_tasks
from eval.requests import doc_requests
from eval.task_yaml import TaskFileError
from eval.tasks import get_group, get_task, resolve, task_names

EIGHT = ["arc_challenge", "arc_easy", "boolq", "hellaswag", "openbookqa", "piqa", "sciq", "winogrande"]


@pytest.mark.parametrize("task", EIGHT + ["mmlu_anatomy", "mmlu_anatomy_continuation"])
def test_lm_eval_files_load_unchanged_and_give_our_requests(task, evaldata, tmp_path):
    """lm-eval's own task file (include'd, only the data pointed at the local files; `!function` references of
    Winogrande and HellaSwag resolved to ours) gives the shipped task's requests, zero- and 3-shot."""
    (name,) = write_lm_eval_tasks(tmp_path, evaldata, [task])
    (theirs,) = resolve([str(tmp_path / f"{name}.yaml")])
    ours = get_task(task)
    their_docs = load_docs(theirs, data_path(theirs, None, None))[:40]
    our_docs = load_docs(ours, evaldata)[:40]
    assert [doc_requests(theirs, d) for d in their_docs] == [doc_requests(ours, d) for d in our_docs]
    assert theirs.metrics == ours.metrics
    pools = [load_docs(t, path, t.fewshot_source) for t, path in
             ((theirs, data_path(theirs, None, None, theirs.fewshot_source)), (ours, evaldata))]
    examples = [draw_examples(t, dict(enumerate(docs)), pool, 3)
                for t, docs, pool in zip((theirs, ours), (their_docs, our_docs), pools)]
    assert ([doc_requests(theirs, d, examples[0][i]) for i, d in enumerate(their_docs)] ==
            [doc_requests(ours, d, examples[1][i]) for i, d in enumerate(our_docs)])


@pytest.mark.parametrize("sampler, exclude", [("default", True), ("default", False), ("first_n", True),
                                              ("first_n", False)])
def test_fewshot_draws_match_lm_eval_samplers(sampler, exclude):
    """Our draws for scored documents in index order equal lm-eval's sampler called document by document, with
    the scored document left out of its own examples when the task says so (duplicates in the pool included)."""
    from lm_eval.api.samplers import get_sampler

    from eval.tasks import Task

    pool = [{"q": f"question {i % 37}", "a": i % 37} for i in range(60)]  # 23 rows appear twice
    task = Task("t", "q", ["x"], 0, fewshot_sampler=sampler, validation_split="validation",
                test_split=None if exclude else "test", fewshot_split=None if exclude else "train")
    docs = {i: pool[i] for i in range(0, 60, 3)}
    ours = draw_examples(task, docs, pool, 5, seed=1234)
    theirs = get_sampler(sampler)(list(pool), rnd=None).set_rnd(1234)
    for i in sorted(docs):
        assert ours[i] == list(theirs.sample(n=5, eval_doc=docs[i] if exclude else None)), i
        if exclude:
            assert docs[i] not in ours[i]


def test_group_scores_use_lm_evals_formulas():
    from lm_eval.api.metrics import aggregate_subtask_metrics, pooled_sample_stderr, unweighted_mean_stderr

    rng = random.Random(0)
    stderrs, sizes = [rng.random() / 10 for _ in range(5)], [rng.randint(2, 300) for _ in range(5)]
    assert pooled_stderr(stderrs, sizes) == pytest.approx(float(pooled_sample_stderr(stderrs, sizes)), rel=1e-12)
    assert unweighted_stderr(stderrs) == pytest.approx(unweighted_mean_stderr(stderrs), rel=1e-12)
    # Size-weighted acc of a group is acc over all its items pooled (MMLU's figure).
    group = get_group("mmlu_humanities")
    correct = {t.name: rng.randint(0, 20) for t in group.leaves()}
    results = {t.name: {"acc": correct[t.name] / 20, "acc_stderr": 0.1, "n": 20} for t in group.leaves()}
    score = aggregate(group, results)
    assert score["acc"] == pytest.approx(sum(correct.values()) / (20 * len(correct)), rel=1e-12)
    assert score["acc"] == pytest.approx(aggregate_subtask_metrics([r["acc"] for r in results.values()],
                                                                   [20] * len(results)), rel=1e-12)
    assert score["n"] == 20 * 13 and score["tasks"] == 13


def test_shipped_groups(evaldata):
    assert [t.name for t in get_group("olmo_core8").leaves()] == EIGHT == task_names()
    assert get_group("olmo_core8").aggregate == (("acc", False),)
    mmlu = get_group("mmlu")
    assert [g.name for g in mmlu.members] == ["mmlu_stem", "mmlu_humanities", "mmlu_social_sciences", "mmlu_other"]
    assert [len(g.leaves()) for g in mmlu.members] == [19, 13, 12, 13]
    assert len(get_group("mmlu_continuation").leaves()) == 57
    assert sum(len(read_rows(t, evaldata)[0]) for t in mmlu.leaves()) == 14042  # cais/mmlu's test split
    anatomy = get_task("mmlu_anatomy")
    assert anatomy.description == "The following are multiple choice questions (with answers) about anatomy.\n\n"
    assert (anatomy.split, anatomy.fewshot_source, anatomy.fewshot_sampler) == ("test", "dev", "first_n")
    assert get_task("mmlu_college_computer_science_continuation").description == \
        "The following are questions (with answers) about college computer science.\n\n"


@pytest.mark.parametrize("total", [1, 57, 100, 1000, 14042, 20000])
def test_stratified_limits_are_proportional(total, evaldata):
    sizes = {t.name: len(read_rows(t, evaldata)[0]) for t in get_group("mmlu").leaves()}
    limits = proportional_limits(sizes, total)
    assert all(1 <= limits[t] <= sizes[t] for t in sizes)
    assert sum(limits.values()) == max(min(total, 14042), 57)
    rest = max(0, min(total, 14042) - 57)
    for t, size in sizes.items():  # one each, and the rest in proportion to the sizes (within one item)
        assert abs(limits[t] - 1 - rest * (size - 1) / (14042 - 57)) < 1


def _write(tmp_path, text, name="t.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


BASE = ("task: my\ndataset_path: json\ndataset_kwargs: {data_files: {validation: rows.jsonl}}\n"
        "validation_split: validation\noutput_type: multiple_choice\ndoc_to_text: q\ndoc_to_choice: c\n"
        "doc_to_target: a\n")


@pytest.mark.parametrize("extra, message", [
    ("generation_kwargs: {until: ['\\n']}\n", "key 'generation_kwargs' is not supported"),
    ("filter_list: []\n", "key 'filter_list' is not supported"),
    ("output_type: generate_until\n", "output_type 'generate_until' is not supported"),
    ("metric_list:\n  - metric: mcc\n", r"metric_list\[0\].metric 'mcc' is not supported"),
    ("metric_list:\n  - metric: acc\n    aggregation: median\n", r"metric_list\[0\].aggregation: 'median'"),
    ("fewshot_config: {sampler: balanced}\n", "fewshot_config.sampler 'balanced' is not supported"),
    ("fewshot_config: {sampler: first_n, doc_to_text: x}\n", "key 'fewshot_config.doc_to_text' is not supported"),
    ("process_docs: !function utils.process_docs\n", "process_docs 'utils.process_docs' is not one of ours"),
    ("doc_to_choice: !function utils.choices\n", "doc_to_choice: !function utils.choices is not one of ours"),
    ("doc_to_text: '{{ q '\n", "doc_to_text: bad Jinja template"),
    ("group: old_style\n", "key 'group' in a task file"),
])
def test_keys_outside_the_subset_are_refused_naming_file_and_key(tmp_path, extra, message):
    path = _write(tmp_path, BASE.replace("output_type: multiple_choice\n", "") + extra
                  if extra.startswith("output_type") else BASE + extra)
    with pytest.raises(TaskFileError, match=f"^{path}: {message}"):
        resolve([path])


def test_accepted_bookkeeping_keys_and_a_user_task_file(tmp_path):
    (tmp_path / "rows.jsonl").write_text(json.dumps({"q": "Q?", "c": ["x", "y"], "a": "y"}) + "\n")
    path = _write(tmp_path, BASE + "should_decontaminate: true\ndoc_to_decontamination_query: q\nmetadata: "
                  "{version: 1.0}\ntag: [mine]\ntask_alias: Mine\ndescription: 'About {{q}} '\n")
    (task,) = resolve([path])
    rows, _ = read_rows(task, data_path(task, None, None))  # data_files relative to the task file
    assert doc_requests(task, rows[0]) == [("About Q? Q?", " x"), ("About Q? Q?", " y")]
    assert task.gold(rows[0]) == 1  # a target string that is one of the choices
    group = _write(tmp_path, "group: g\ntask: [my, arc_easy]\n", "g.yaml")  # a sibling file's task by name
    assert [t.name for t in resolve([group])[0].leaves()] == ["my", "arc_easy"]


def test_bad_group_and_unknown_names(tmp_path):
    with pytest.raises(TaskFileError, match="unknown task 'nope'"):
        resolve([_write(tmp_path, "group: g\ntask: [nope]\n")])
    with pytest.raises(TaskFileError, match=r"key 'aggregate_metric_list\[0\].bogus' is not supported"):
        resolve([_write(tmp_path, "group: g\ntask: [piqa]\naggregate_metric_list: [{metric: acc, bogus: 1}]\n")])
    with pytest.raises(TaskFileError, match="two different tasks are called 'piqa'"):
        resolve(["piqa", _write(tmp_path, BASE.replace("task: my", "task: piqa"), "p.yaml")])
    with pytest.raises(TaskFileError, match=r"t.yaml:2: not valid YAML"):
        resolve([_write(tmp_path, "task: x\n  - bad: [\n")])
    assert math.isnan(pooled_stderr([0.1], [1]))


def test_review_edge_cases_behave_as_lm_eval(tmp_path, monkeypatch):
    """Cases where a reader of lm-eval's files easily differs from lm-eval: the folder's own files shadow shipped
    names inside a group file (and their tags are found), list includes merge in order, a file's num_fewshot: 0
    stays zero-shot, a missing output_type is not multiple-choice, remote data files go to `datasets`."""
    from eval.harness import shots

    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"q": "Q?", "c": ["x", "y"], "a": 1}) + "\n")
    mine = BASE.replace("task: my", "task: arc_easy") + "tag: [my_tag]\n"  # a user's own arc_easy
    _write(tmp_path, mine, "arc_easy_copy.yaml")
    group = _write(tmp_path, "group: g\ntask: arc_easy\naggregate_metric_list: {metric: acc}\n", "g.yaml")
    (g,) = resolve([group])
    assert [t.source for t in g.leaves()] == [str(tmp_path / "arc_easy_copy.yaml")]
    tagged = _write(tmp_path, "group: h\ntask: [my_tag]\n", "h.yaml")
    assert [t.name for t in resolve([tagged])[0].leaves()] == ["arc_easy"]
    # The same file reached twice is one task, not a clash.
    assert [t.name for t in resolve([tagged, str(tmp_path / "arc_easy_copy.yaml")])[1:]] == ["arc_easy"]

    _write(tmp_path, "doc_to_text: 'first'\ntarget_delimiter: '|'\n", "a.yaml")
    _write(tmp_path, "doc_to_text: 'second'\n", "b.yaml")
    (listed,) = resolve([_write(tmp_path, "include: [a.yaml, b.yaml]\n" + BASE.replace("doc_to_text: q\n", "")
                               .replace("task: my", "task: listed"), "l.yaml")])
    assert (listed.doc_to_text, listed.target_delimiter) == ("second", "|")

    (zero,) = resolve([_write(tmp_path, BASE.replace("task: my", "task: zero") + "num_fewshot: 0\n", "z.yaml")])
    assert shots(zero, 5) == 0 and shots(listed, 5) == 5 and shots(listed, None) == 0

    with pytest.raises(TaskFileError, match="no 'output_type'"):
        resolve([_write(tmp_path, BASE.replace("output_type: multiple_choice\n", ""), "n.yaml")])

    import datasets

    seen = {}

    def load_dataset(path, name=None, data_files=None, split=None):
        seen.update(path=path, data_files=data_files, split=split)
        return [{"q": "Q?", "c": ["x", "y"], "a": 0}]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    (remote,) = resolve([_write(tmp_path, BASE.replace("task: my", "task: remote").replace(
        "rows.jsonl", "hf://datasets/someone/data/validation.jsonl"), "r.yaml")])
    assert load_docs(remote, data_path(remote, None, None))[0]["q"] == "Q?"
    assert seen == {"path": "json", "data_files": {"validation": "hf://datasets/someone/data/validation.jsonl"},
                    "split": "validation"}


def test_a_changed_lm_eval_helper_module_is_refused(tmp_path):
    """lm-eval's hellaswag file names `!function utils.process_docs`; ours reproduces lm-eval 0.4.13's module, so
    an edited copy beside the file is refused rather than silently replaced by ours."""
    import lm_eval

    source = Path(lm_eval.__file__).parent / "tasks" / "hellaswag"
    folder = tmp_path / "hellaswag"
    folder.mkdir()
    (folder / "hellaswag.yaml").write_text((source / "hellaswag.yaml").read_text())
    (folder / "utils.py").write_text((source / "utils.py").read_text())
    assert resolve([str(folder / "hellaswag.yaml")])[0].process_docs is not None
    (folder / "utils.py").write_text((source / "utils.py").read_text().replace('" [title]"', '" [header]"'))
    with pytest.raises(TaskFileError, match=r"process_docs: !function utils.process_docs: hellaswag/utils.py "
                                            "beside the file is not the lm-eval 0.4.13 module"):
        resolve([str(folder / "hellaswag.yaml")])


def test_group_scores_with_a_single_item_task_have_no_standard_error():
    assert math.isnan(pooled_stderr([0.1, math.nan], [10, 1]))  # lm-eval reports "N/A"
    assert proportional_limits({"a": 1, "b": 1, "c": 1}, 2) == {"a": 1, "b": 1, "c": 1}
