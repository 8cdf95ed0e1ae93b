"""Few-shot prompting, MMLU and task files against lm-evaluation-harness itself (as test_parity.py does
zero-shot): lm-eval's HF backend runs a seeded tiny MoE exported with its tokenizer, on lm-eval's own task YAMLs
pointed at the local files (eval/lm_eval_tasks.py), for the same subsampled documents (lm-eval's `samples`).

Our harness runs the same documents three ways: by shipped task and group names, on lm-eval's own files read by
our YAML reader (eval/task_yaml.py), and on a user file that rewrites a shipped task. Requests must be identical,
log-likelihoods within 1e-4, and acc / acc_norm / standard errors equal, for:
- MMLU zero-shot, lettered and cloze (two subjects) and a group of subjects weighted by size, whose per-subject
  sizes come from a stratified subsample (group_limit);
- five-shot: MMLU (the dev rows, first_n), SciQ, OpenBookQA, ARC-Easy (lm-eval's seeded draw, with the scored
  document left out of its own examples), Winogrande (partial scoring) and HellaSwag (preprocessed examples).
"""

from __future__ import annotations

import math

import pytest
import torch

from eval import evaluate
from eval.harness import subsample, task_limits
from eval.lm_eval_tasks import write_lm_eval_tasks
from eval.tasks import resolve
from moe import build_model
from moe.hf import save_hf_checkpoint
from moe.hf_tokenizer import save_hf_tokenizer

SEED = 1234
MAX_LENGTH = 1024  # long enough for most 5-shot prompts, short enough that SciQ's are left-truncated
ZERO_SHOT = ["mmlu_anatomy", "mmlu_astronomy", "mmlu_anatomy_continuation", "mmlu_astronomy_continuation"]
FEW_SHOT = ["mmlu_anatomy", "mmlu_anatomy_continuation", "sciq", "openbookqa", "arc_easy", "winogrande", "hellaswag"]
GROUP_LIMIT, ZERO_SHOT_LIMIT, FEW_SHOT_LIMIT = 30, 20, 6


@pytest.fixture(scope="module")
def long_model(tokenizer):
    torch.manual_seed(1)
    return build_model("tiny-moe", vocab_size=tokenizer.get_vocab_size(), max_seq_len=MAX_LENGTH).eval()


@pytest.fixture(scope="module")
def setup(long_model, tokenizer, evaldata, tmp_path_factory):
    """lm-eval's model, the folder of local lm-eval task files (with a group file both harnesses read) and the
    documents scored per task."""
    from lm_eval.models.huggingface import HFLM

    hf_dir = tmp_path_factory.mktemp("hf")
    save_hf_checkpoint(long_model, hf_dir)
    save_hf_tokenizer(tokenizer, hf_dir, "<|endoftext|>", MAX_LENGTH)
    folder = tmp_path_factory.mktemp("tasks")
    write_lm_eval_tasks(folder, evaldata, list(dict.fromkeys(ZERO_SHOT + FEW_SHOT)))
    (folder / "local_mmlu_pair.yaml").write_text(
        "group: local_mmlu_pair\ntask: [local_mmlu_anatomy, local_mmlu_astronomy]\n"
        "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\n")
    lm = HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=16, max_length=MAX_LENGTH)
    return lm, folder


def _indices(tasks: list, limits: dict[str, int], data_dir) -> dict[str, list[int]]:
    """The documents our harness scores per task name (its fixed-seed subsample)."""
    from eval.data import data_path, read_rows

    return {t.name: subsample(len(read_rows(t, data_path(t, data_dir, None))[0]), limits[t.name], SEED)
            for t in tasks}


def _lm_eval(setup, tasks: list[str], samples: dict[str, list[int]], num_fewshot: int) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    lm, folder = setup
    return simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(include_path=str(folder)),
                           samples=samples, log_samples=True, num_fewshot=num_fewshot, bootstrap_iters=1,
                           fewshot_random_seed=SEED)


@pytest.fixture(scope="module")
def zero_shot(setup, long_model, tokenizer, evaldata, tmp_path_factory):
    """MMLU zero-shot: a group of two subjects (stratified: group_limit) and both subjects' cloze form, read from
    lm-eval's files and, by shipped names, from a user group file."""
    _, folder = setup
    user = tmp_path_factory.mktemp("user") / "pair.yaml"
    user.write_text("group: pair\ntask: [mmlu_anatomy, mmlu_astronomy]\n"
                    "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\n")
    common = dict(seed=SEED, max_length=MAX_LENGTH, batch_tokens=4096, return_requests=True, num_fewshot=0,
                  limit=ZERO_SHOT_LIMIT, group_limit=GROUP_LIMIT)
    by_name = evaluate(long_model, tokenizer, [str(user), "mmlu_anatomy_continuation", "mmlu_astronomy_continuation"],
                       data_dir=evaldata, **common)
    files = [str(folder / "local_mmlu_pair.yaml")] + [str(folder / f"local_{t}.yaml") for t in ZERO_SHOT[2:]]
    by_file = evaluate(long_model, tokenizer, files, **common)
    selection = resolve(files)
    limits = task_limits(selection, ZERO_SHOT_LIMIT, GROUP_LIMIT)
    samples = _indices([t for item in selection for t in (item.leaves() if hasattr(item, "leaves") else [item])],
                       limits, None)
    theirs = _lm_eval(setup, ["local_mmlu_pair", "local_mmlu_anatomy_continuation",
                              "local_mmlu_astronomy_continuation"], samples, 0)
    return theirs, by_name, by_file, samples


@pytest.fixture(scope="module")
def five_shot(setup, long_model, tokenizer, evaldata, tmp_path_factory):
    """Five-shot on the tasks of FEW_SHOT by name and from lm-eval's files, and PIQA rewritten as a user file."""
    _, folder = setup
    user = tmp_path_factory.mktemp("user") / "my_piqa.yaml"
    user.write_text(
        "task: my_piqa\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    validation: {evaldata / 'piqa' / 'validation.jsonl'}\n"
        "output_type: multiple_choice\nvalidation_split: validation\n"
        "doc_to_text: \"Question: {{goal}}\\nAnswer:\"\ndoc_to_target: label\n"
        "doc_to_choice: \"{{[sol1, sol2]}}\"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    common = dict(seed=SEED, max_length=MAX_LENGTH, batch_tokens=8192, return_requests=True, num_fewshot=5,
                  limit=FEW_SHOT_LIMIT)
    by_name = evaluate(long_model, tokenizer, FEW_SHOT + [str(user)], data_dir=evaldata, **common)
    files = [str(folder / f"local_{t}.yaml") for t in FEW_SHOT + ["piqa"]]
    write_lm_eval_tasks(folder, evaldata, ["piqa"])
    by_file = evaluate(long_model, tokenizer, files, **common)
    selection = resolve(files)
    samples = _indices(selection, {t.name: FEW_SHOT_LIMIT for t in selection}, None)
    theirs = _lm_eval(setup, list(samples), samples, 5)
    return theirs, by_name, by_file, samples


def lm_eval_requests(run: dict, task: str) -> list[tuple[int, int, str, str, float]]:
    """(document index in the file, choice, context, continuation, log-likelihood) per request lm-eval logged."""
    out = []
    for sample in run["samples"][task]:
        for choice, (args, resp) in enumerate(zip(sample["arguments"], sample["resps"])):
            out.append((sample["doc_id"], choice, args[0], args[1], resp[0][0]))
    return sorted(out)


def _same_requests(theirs_run, theirs_task: str, our_requests: list[dict], indices: list[int]):
    theirs = lm_eval_requests(theirs_run, theirs_task)
    mine = sorted((r["index"], r["choice"], r["context"], r["continuation"], r["loglikelihood"])
                  for r in our_requests)
    assert sorted({r["index"] for r in our_requests}) == indices
    assert len(mine) == len(theirs) > 0
    assert [t[:4] for t in mine] == [t[:4] for t in theirs]
    worst = max(abs(a[4] - b[4]) / max(1.0, abs(b[4]) / 100) for a, b in zip(mine, theirs))
    assert worst < 1e-4, worst


def _same_metrics(ours: dict, theirs: dict):
    metrics = [m for m in ("acc", "acc_norm") if f"{m},none" in theirs]
    assert metrics and all(m in ours for m in metrics)
    for m in metrics:
        assert ours[m] == pytest.approx(theirs[f"{m},none"], abs=1e-12)
        assert math.isclose(ours[f"{m}_stderr"], theirs[f"{m}_stderr,none"], abs_tol=1e-12)


@pytest.mark.parametrize("how", ["by_name", "by_file"])
@pytest.mark.parametrize("task", ZERO_SHOT)
def test_mmlu_zero_shot_matches_lm_eval(zero_shot, task, how):
    theirs, by_name, by_file, samples = zero_shot
    results, requests = by_name if how == "by_name" else by_file
    ours = task if how == "by_name" else f"local_{task}"
    _same_requests(theirs, f"local_{task}", requests[ours], samples[f"local_{task}"])
    assert results[ours]["n"] == len(samples[f"local_{task}"])
    _same_metrics(results[ours], theirs["results"][f"local_{task}"])


@pytest.mark.parametrize("how", ["by_name", "by_file"])
def test_a_group_weighted_by_size_matches_lm_eval(zero_shot, how):
    theirs, by_name, by_file, samples = zero_shot
    results = (by_name if how == "by_name" else by_file)[0]
    group = results["pair" if how == "by_name" else "local_mmlu_pair"]
    sizes = [len(samples["local_mmlu_anatomy"]), len(samples["local_mmlu_astronomy"])]
    assert group["n"] == sum(sizes) and group["tasks"] == 2 and sizes[0] != sizes[1]  # a stratified subsample
    assert sum(sizes) == GROUP_LIMIT
    _same_metrics(group, theirs["results"]["local_mmlu_pair"])


@pytest.mark.parametrize("how", ["by_name", "by_file"])
@pytest.mark.parametrize("task", FEW_SHOT + ["piqa"])
def test_five_shot_matches_lm_eval(five_shot, task, how):
    theirs, by_name, by_file, samples = five_shot
    results, requests = by_name if how == "by_name" else by_file
    ours = (task if task != "piqa" else "my_piqa") if how == "by_name" else f"local_{task}"
    _same_requests(theirs, f"local_{task}", requests[ours], samples[f"local_{task}"])
    _same_metrics(results[ours], theirs["results"][f"local_{task}"])


def test_five_shot_contexts_hold_five_solved_examples(five_shot):
    _, (_, requests), _, _ = five_shot
    mmlu = requests["mmlu_anatomy"][0]["context"]
    assert mmlu.startswith("The following are multiple choice questions (with answers) about anatomy.\n\n")
    assert mmlu.count("\nAnswer:") == 6 and mmlu.count("\n\n") == 6  # description, 5 examples, the question
    sciq = requests["sciq"][0]["context"]
    assert sciq.count("\nAnswer:") == 6
