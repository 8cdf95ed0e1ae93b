"""The harness against lm-evaluation-harness itself: lm-eval's HF backend (HFLM) runs the same seeded tiny MoE,
exported as an HF checkpoint with its tokenizer, on lm-eval's own task YAMLs (included unchanged, only the
dataset pointed at the local validation files). Same requests, same per-request log-likelihoods (within
1e-4), same acc / acc_norm and standard errors, for every shipped task, with contexts shared and not, and with
a max length short enough that BoolQ passages are left-truncated."""

from __future__ import annotations

import math

import pytest

from eval import evaluate, task_names
from eval.harness import subsample
from eval.lm_eval_tasks import write_lm_eval_tasks
from moe.hf import save_hf_checkpoint
from moe.hf_tokenizer import save_hf_tokenizer

from .conftest import rows

LIMIT, SEED = 24, 1234
MAX_LENGTH = 224  # below the model's 256 and many BoolQ passages (truncation), above every continuation (PIQA: 203)
@pytest.fixture(scope="module")
def lm_eval_run(model, tokenizer, evaldata, tmp_path_factory):
    """lm-eval's results and logged samples for every shipped task on our fixed-seed subsample."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    hf_dir = tmp_path_factory.mktemp("hf")
    save_hf_checkpoint(model, hf_dir)
    save_hf_tokenizer(tokenizer, hf_dir, "<|endoftext|>", model.config.max_seq_len)
    yaml_dir = tmp_path_factory.mktemp("tasks")
    write_lm_eval_tasks(yaml_dir, evaldata)
    lm = HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=32, max_length=MAX_LENGTH)
    samples = {f"local_{t}": subsample(len(rows(t)), LIMIT, SEED) for t in task_names()}
    out = simple_evaluate(model=lm, tasks=list(samples), task_manager=TaskManager(include_path=str(yaml_dir)),
                          samples=samples, log_samples=True, num_fewshot=0, bootstrap_iters=1)  # mean: closed-form stderr
    return out


@pytest.fixture(scope="module", params=[True, False], ids=["shared", "unshared"])
def ours(request, model, tokenizer, evaldata):
    return evaluate(model, tokenizer, task_names(), data_dir=evaldata, limit=LIMIT, seed=SEED,
                    max_length=MAX_LENGTH, batch_tokens=2048, share_context=request.param, return_requests=True)


def lm_eval_requests(lm_eval_run, task: str) -> list[tuple[int, int, str, str, float]]:
    """(doc index, choice, context, continuation, log-likelihood) per request lm-eval logged."""
    out = []
    for sample in lm_eval_run["samples"][f"local_{task}"]:
        for choice, (args, resp) in enumerate(zip(sample["arguments"], sample["resps"])):
            out.append((sample["doc_id"], choice, args[0], args[1], resp[0][0]))
    return sorted(out)


@pytest.mark.parametrize("task", task_names())
def test_requests_and_loglikelihoods_match_lm_eval(lm_eval_run, ours, task):
    _, requests = ours
    theirs = lm_eval_requests(lm_eval_run, task)
    mine = [(r["index"], r["choice"], r["context"], r["continuation"], r["loglikelihood"]) for r in requests[task]]
    assert [t[:4] for t in mine] == [t[:4] for t in theirs]
    # Within 1e-4, or 1e-6 relative past 100 nats: lm-eval sums in float32, and PIQA's continuations reach 203
    # tokens and |ll| ~ 1e3, where float32 rounding alone is ~1e-4.
    worst = max(abs(a[4] - b[4]) / max(1.0, abs(b[4]) / 100) for a, b in zip(mine, theirs))
    assert worst < 1e-4, worst


@pytest.mark.parametrize("task", task_names())
def test_metrics_match_lm_eval(lm_eval_run, ours, task):
    results, _ = ours
    theirs = lm_eval_run["results"][f"local_{task}"]
    assert results[task]["n"] == LIMIT
    metrics = [m for m in ("acc", "acc_norm") if f"{m},none" in theirs]
    assert metrics == (["acc"] if task in ("winogrande", "boolq") else ["acc", "acc_norm"])
    assert set(results[task]) == {"n", *metrics, *(f"{m}_stderr" for m in metrics)}
    for m in metrics:
        assert results[task][m] == pytest.approx(theirs[f"{m},none"], abs=1e-12)
        assert math.isclose(results[task][f"{m}_stderr"], theirs[f"{m}_stderr,none"], abs_tol=1e-12)


def test_truncation_is_exercised(ours, tokenizer):
    """Some scored BoolQ requests are longer than MAX_LENGTH + 1 tokens, so the parity above covers lm-eval's
    left truncation."""
    _, requests = ours
    lengths = [len(tokenizer.encode(r["context"] + r["continuation"]).ids) for r in requests["boolq"]]
    assert max(lengths) > MAX_LENGTH + 1 and min(lengths) <= MAX_LENGTH + 1
