"""eval.data, eval.metrics, eval.scoring and eval.harness beyond lm-eval parity: bad input, deterministic
subsampling, lm-eval's mean_stderr, the batching plan (contexts really shared, whole items per batch), and a
two-rank split simulated in one process against the one-rank result."""

from __future__ import annotations

import random

import pytest

from eval import evaluate, get_task
from eval.data import load_docs
from eval.harness import build_task_items, subsample
from eval.metrics import TaskScores, binary_mean_stderr, item_scores
from eval.scoring import FULL, SHARED, forward_calls, plan_batches, run_plan

from .conftest import MAX_SEQ_LEN


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "piqa.jsonl"
    path.write_text('{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}\n\n{"goal": "g", "sol1": \n')
    with pytest.raises(ValueError, match=rf"{path}:3: malformed JSON"):
        load_docs(get_task("piqa"), path)


def test_row_missing_a_field_names_file_and_line(tmp_path):
    path = tmp_path / "piqa.jsonl"
    path.write_text('{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}\n{"goal": "g", "sol1": "a", "label": 1}\n')
    with pytest.raises(ValueError, match=rf"{path}:2: malformed piqa row \(UndefinedError: 'sol2' is undefined\)"):
        load_docs(get_task("piqa"), path)


def test_missing_data_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"looked for: {tmp_path}/validation.jsonl, "
                                                rf"{tmp_path}/boolq/validation.jsonl"):
        load_docs(get_task("boolq"), tmp_path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.jsonl")):
        load_docs(get_task("boolq"), tmp_path / "nope.jsonl")


def test_unknown_task_lists_the_available_ones(model, tokenizer):
    with pytest.raises(ValueError, match=r"^unknown task 'arc': not a shipped task \(arc_challenge, arc_easy, "
                                         r"boolq, .*\), group \(mmlu, mmlu_continuation, .*olmo_core8\), tag, or "
                                         "task file$"):
        evaluate(model, tokenizer, ["arc_easy", "arc"], data_dir="/nonexistent")


def test_subsample_is_deterministic_and_seeded():
    first = subsample(1000, 30, seed=1234)
    assert first == subsample(1000, 30, seed=1234) == sorted(set(first)) and len(first) == 30
    assert first != subsample(1000, 30, seed=1)
    assert subsample(10, 30, seed=1234) == subsample(10, None, seed=5) == list(range(10))


@pytest.mark.parametrize("n", [2, 3, 17, 100])
def test_stderr_matches_lm_eval_mean_stderr(n):
    from lm_eval.api.metrics import mean_stderr

    scores = [float(random.Random(n).random() < 0.3) for _ in range(n - 1)] + [1.0]
    assert binary_mean_stderr(sum(scores), n) == pytest.approx(mean_stderr(scores), rel=1e-12)
    sums = TaskScores(("acc",))
    for s in scores:
        sums.update({"acc": s})
    assert sums.compute() == {"acc": pytest.approx(sum(scores) / n), "acc_stderr": pytest.approx(mean_stderr(scores)),
                              "n": n}


def test_item_scores_break_ties_like_numpy_and_normalise_by_characters():
    import numpy as np

    lls, chars = [-4.0, -4.0, -6.0], [2, 4, 12]
    assert np.argmax(lls) == 0 and np.argmax(np.array(lls) / chars) == 2
    assert item_scores(lls, chars, gold=0) == {"acc": 1.0, "acc_norm": 0.0}
    assert item_scores(lls, chars, gold=2) == {"acc": 0.0, "acc_norm": 1.0}


@pytest.fixture(scope="module")
def items(tokenizer, evaldata):
    def encode(text):
        return tokenizer.encode(text, add_special_tokens=False).ids

    return build_task_items(["arc_easy", "hellaswag", "winogrande", "boolq"], encode,
                            tokenizer.token_to_id("<|endoftext|>"), evaldata, limit=12, seed=7)


def test_plan_shares_contexts_and_keeps_items_whole(items):
    plan = plan_batches(items, MAX_SEQ_LEN, batch_tokens=1024, share_context=True)
    assert sorted(i for batch in plan for i in batch.items) == list(range(len(items)))
    shared = {items[i].task for batch in plan if batch.kind == SHARED for i in batch.items}
    assert {"arc_easy", "hellaswag", "winogrande"} <= shared  # partial Winogrande shares its common prefix
    assert any(batch.kind == FULL for batch in plan)  # BoolQ passages past the max length run in full
    unshared = plan_batches(items, MAX_SEQ_LEN, batch_tokens=1024, share_context=False)
    assert {batch.kind for batch in unshared} == {FULL}


def test_two_ranks_equal_one_rank_with_equal_forward_calls(model, items):
    eos = 0
    plan = plan_batches(items, MAX_SEQ_LEN, batch_tokens=600, share_context=True)
    one, _ = run_plan(model, items, plan, MAX_SEQ_LEN, eos)
    per_rank = [run_plan(model, items, plan, MAX_SEQ_LEN, eos, rank=r, world_size=2) for r in range(2)]
    assert per_rank[0][1] == per_rank[1][1] == max(forward_calls(plan, r, 2) for r in range(2))
    assert forward_calls(plan, 0, 2) != forward_calls(plan, 1, 2)  # so a rank did run dummy passes
    assert sorted(per_rank[0][0].keys() | per_rank[1][0].keys()) == sorted(one) == list(range(len(items)))
    assert not per_rank[0][0].keys() & per_rank[1][0].keys()
    combined = {**per_rank[0][0], **per_rank[1][0]}
    for i, lls in one.items():
        assert combined[i] == pytest.approx(lls, abs=1e-4)


def test_evaluate_on_two_ranks_sums_to_one_rank(model, tokenizer, evaldata):
    kwargs = dict(data_dir=evaldata, limit=10, seed=3, batch_tokens=700)
    whole = evaluate(model, tokenizer, ["piqa", "winogrande"], **kwargs)
    parts = [evaluate(model, tokenizer, ["piqa", "winogrande"], rank=r, world_size=2, **kwargs) for r in range(2)]
    for task in whole:
        assert parts[0][task]["n"] + parts[1][task]["n"] == whole[task]["n"] == 10
        correct = sum(p[task]["acc"] * p[task]["n"] for p in parts if p[task]["n"])
        assert correct == pytest.approx(whole[task]["acc"] * 10)


def test_continuation_longer_than_max_length_scores_its_last_tokens(model):
    """Where lm-eval asserts, the last max_length continuation tokens are scored on the whole-sequence logits."""
    import torch

    from eval.requests import Item

    context, continuation = [5, 6, 7], list(range(10, 22))  # 12 continuation tokens, max_length 8
    item = Item("t", 0, [("c", "x")], [(context, continuation)], 0, [1])
    plan = plan_batches([item], 8, batch_tokens=100, share_context=True)
    assert [b.kind for b in plan] == [FULL]
    lls, _ = run_plan(model, [item], plan, 8, pad_id=0)
    whole = torch.tensor([context + continuation])
    x = whole[:, -9:-1]  # the last 8 input tokens, which predict the last 8 continuation tokens
    log_probs = model(x).logits.float().log_softmax(-1)[0]
    expected = log_probs.gather(1, whole[0, -8:, None]).sum().item()
    assert lls[0] == pytest.approx([expected], abs=1e-4)


def test_shared_batch_of_single_token_continuations(model):
    """A shared batch whose every continuation is one token scores it all from the prefill, leaving no position
    for the remainder pass (BoolQ's ' yes' / ' no' with a tokenizer that has them as single tokens)."""
    from eval.requests import Item

    items = [Item("boolq", 0, [("a", " no"), ("a", " yes")], [([5, 6, 7], [8]), ([5, 6, 7], [9])], 1, [2, 3])]
    plan = plan_batches(items, MAX_SEQ_LEN, batch_tokens=1024, share_context=True)
    assert [batch.kind for batch in plan] == [SHARED]
    shared, _ = run_plan(model, items, plan, MAX_SEQ_LEN, pad_id=0)
    full, _ = run_plan(model, items, plan_batches(items, MAX_SEQ_LEN, 1024, share_context=False), MAX_SEQ_LEN, 0)
    assert shared[0] == pytest.approx(full[0], abs=1e-4)


def _alone(model, item) -> list[float]:
    """Each choice's log-likelihood from its own input run alone, one sequence with no padding: the oracle of
    batched scoring (lm-eval's request by request, left-truncated to the max length as there)."""
    import torch

    lls = []
    for context, continuation in item.tokens:
        x = torch.tensor([(context + continuation)[-(MAX_SEQ_LEN + 1):][:-1]])
        log_probs = model(x).logits.float().log_softmax(-1)[0, -len(continuation):]  # (n, V)
        lls.append(log_probs.gather(1, torch.tensor(continuation)[:, None]).double().sum().item())
    return lls


@pytest.mark.parametrize("share_context", [True, False])
def test_padding_never_reaches_a_score(model, items, share_context):
    """Batched scoring pads every input to its batch's longest and runs everything but attention on the real
    tokens only (moe/unpadded.py), the last block's feed-forward only where logits are read: each choice scores
    as its input alone does, and the pad token's id changes nothing, bit for bit."""
    import torch

    plan = plan_batches(items, MAX_SEQ_LEN, batch_tokens=600, share_context=share_context)
    assert any(len(batch.items) > 1 for batch in plan)
    with torch.inference_mode():
        scores, _ = run_plan(model, items, plan, MAX_SEQ_LEN, pad_id=0)
        other_pad, _ = run_plan(model, items, plan, MAX_SEQ_LEN, pad_id=model.config.vocab_size - 1)
        assert other_pad == scores
        for i in (0, 13, 25, 40):  # one item per task
            assert scores[i] == pytest.approx(_alone(model, items[i]), abs=1e-5)


def test_batch_encoding_gives_the_ids_of_one_by_one_encoding(tokenizer, evaldata):
    """build_task_items encodes every distinct string once, all of a task's together (encode_batch): the same
    ids as encoding each request's strings one by one (lm-eval's way)."""
    from eval.requests import encode_pair

    def encode(text):
        return tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(texts):
        return [encoding.ids for encoding in tokenizer.encode_batch(texts, add_special_tokens=False)]

    eos = tokenizer.token_to_id("<|endoftext|>")
    tasks = ["arc_easy", "hellaswag", "winogrande", "boolq", "piqa"]
    batched = build_task_items(tasks, encode, eos, evaldata, limit=12, seed=7, encode_batch=encode_batch)
    assert len(batched) == 60
    for item in batched:
        assert item.tokens == [encode_pair(encode, context, continuation, eos) for context, continuation in
                               item.requests]
