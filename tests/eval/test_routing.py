"""eval.routing: the per-task routing statistics of a zero-shot evaluation against a brute force that runs every
request's whole input alone and recomputes each router's top-k from its input and gate weights in float64; shared
and unshared scoring, and two ranks, agree with it; the JSON lines and the heatmap are written; no hook is left
behind. (The two-process DDP run through the callback is in test_ddp_eval.py.)"""

from __future__ import annotations

import json
import math

import pytest
import torch

from eval import evaluate
from eval.harness import task_items
from eval.routing import (
    RoutingRecorder,
    RoutingSums,
    draw_routing_heatmap,
    heatmap_size,
    js_divergence_bits,
    moe_routers,
    record_batches,
    routing_rows,
    write_routing_jsonl,
)
from eval.scoring import plan_batches, run_plan

from .conftest import MAX_SEQ_LEN

TASKS = ["arc_easy", "hellaswag", "winogrande", "boolq"]  # shared contexts, partial scoring, truncated passages
KWARGS = dict(limit=4, seed=11, batch_tokens=900)


@torch.no_grad()
def brute_force(model, sequences: dict[str, list[list[int]]]) -> RoutingSums:
    """The figures of eval.routing counted one sequence at a time, each alone in its forward pass, with top-k
    recomputed in float64 from the router's input: {task: sequences} -> sums in that task order."""
    routers = [router for _, router in moe_routers(model)]
    k, E = routers[0].top_k, routers[0].gate.out_features
    captured = {}
    hooks = [router.register_forward_pre_hook(lambda module, args, j=j: captured.__setitem__(j, args[0]))
             for j, router in enumerate(routers)]
    S, L = len(sequences), len(routers)
    counts, entropy, same = torch.zeros(S, L, E, dtype=torch.float64), torch.zeros(S, L, dtype=torch.float64), \
        torch.zeros(S, L, dtype=torch.float64)
    tokens, pairs = torch.zeros(S, dtype=torch.float64), torch.zeros(S, dtype=torch.float64)
    try:
        for s, task_sequences in enumerate(sequences.values()):
            for x in task_sequences:
                model(torch.tensor([x]))
                tokens[s] += len(x)
                pairs[s] += len(x) - 1
                for j, router in enumerate(routers):
                    probs = (captured[j].double() @ router.gate.weight.double().T).softmax(-1)  # (n, E)
                    chosen = probs.argsort(-1, descending=True)[:, :k]
                    for t in range(len(x)):
                        for e in chosen[t].tolist():
                            counts[s, j, e] += 1
                        entropy[s, j] -= (probs[t] * probs[t].log()).sum()
                        same[s, j] += t > 0 and chosen[t, 0] == chosen[t - 1, 0]
    finally:
        for hook in hooks:
            hook.remove()
    return RoutingSums(list(sequences), [i for i, _ in moe_routers(model)], counts, tokens, entropy, same, pairs)


def request_inputs(items, max_length: int) -> dict[str, list[list[int]]]:
    """{task: lm-eval's input of every request}: (context + continuation)[-(max_length + 1):][:-1]."""
    out = {}
    for item in items:
        out.setdefault(item.task, []).extend((c + x)[-(max_length + 1):][:-1] for c, x in item.tokens)
    return out


def assert_same_routing(got: RoutingSums, expected: RoutingSums, flips: int = 0):
    """Token and pair counts exactly; assignments and same-expert counts within `flips` near-tie decisions per
    (task, layer) (the brute force's float64 recomputation may break a float32 tie the other way); entropies."""
    got = got.select(expected.tasks)
    assert got.layers == expected.layers
    torch.testing.assert_close(got.tokens, expected.tokens, rtol=0, atol=0)
    torch.testing.assert_close(got.pairs, expected.pairs, rtol=0, atol=0)
    assert (got.counts - expected.counts).abs().sum(-1).max() <= 2 * flips
    assert (got.same_top1 - expected.same_top1).abs().max() <= 2 * flips
    torch.testing.assert_close(got.entropy_sum, expected.entropy_sum, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def items(model, tokenizer, evaldata):
    return task_items(tokenizer, TASKS, evaldata, limit=KWARGS["limit"], seed=KWARGS["seed"])


@pytest.fixture(scope="module")
def expected(model, items):
    return brute_force(model, request_inputs(items, MAX_SEQ_LEN))


def recorded(model, tokenizer, evaldata, **kwargs) -> RoutingSums:
    recorder = RoutingRecorder(model)
    with recorder:
        evaluate(model, tokenizer, TASKS, data_dir=evaldata, **{**KWARGS, **kwargs}, routing=recorder)
    return recorder.sums()


@pytest.mark.parametrize("share_context", [True, False])
def test_evaluation_routing_equals_each_request_alone(model, tokenizer, evaldata, items, expected, share_context):
    plan = plan_batches(items, MAX_SEQ_LEN, KWARGS["batch_tokens"], share_context)
    assert {batch.kind for batch in plan} == ({"shared", "full"} if share_context else {"full"})
    got = recorded(model, tokenizer, evaldata, share_context=share_context)
    assert sorted(got.tasks) == sorted(TASKS)
    assert_same_routing(got, expected)


def test_shared_and_unshared_scoring_give_equal_routing(model, tokenizer, evaldata):
    shared = recorded(model, tokenizer, evaldata, share_context=True)
    unshared = recorded(model, tokenizer, evaldata, share_context=False)
    assert_same_routing(shared, unshared.select(shared.tasks))


def test_two_ranks_with_dummy_passes_sum_to_one_rank(model, items, expected):
    plan = plan_batches(items, MAX_SEQ_LEN, 600, share_context=True)
    parts = []
    for rank in range(2):
        recorder = RoutingRecorder(model)
        with torch.inference_mode(), recorder:
            run_plan(model, items, plan, MAX_SEQ_LEN, 0, rank=rank, world_size=2, observer=recorder)
        parts.append(recorder.sums().select(expected.tasks))
    summed = RoutingSums(expected.tasks, expected.layers, *(a + b for a, b in zip(parts[0]._tensors(),
                                                                                    parts[1]._tensors())))
    assert_same_routing(summed, expected)


def test_figures_from_sums():
    counts = torch.tensor([[[3.0, 1.0, 0.0, 0.0]], [[1.0, 1.0, 1.0, 1.0]]])  # (S=2, L=1, E=4), k=2
    sums = RoutingSums(["a", "b"], [5], counts, torch.tensor([2.0, 2.0]), torch.tensor([[0.2], [2.0]]),
                       torch.tensor([[1.0], [0.0]]), torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(sums.expert_fraction()[:, 0], torch.tensor([[0.75, 0.25, 0, 0], [0.25] * 4]))
    torch.testing.assert_close(sums.router_entropy(), torch.tensor([[0.1], [1.0]]))
    torch.testing.assert_close(sums.load_entropy()[:, 0], torch.tensor([-0.75 * math.log(0.75) - 0.25 *
                                                                       math.log(0.25), math.log(4)]))
    torch.testing.assert_close(sums.same_top1_as_previous(), torch.tensor([[1.0], [0.0]]))


@pytest.mark.parametrize("seed", range(4))
def test_js_divergence_matches_scipy(seed):
    from scipy.spatial.distance import jensenshannon

    g = torch.Generator().manual_seed(seed)
    p, q = torch.rand(8, generator=g, dtype=torch.float64), torch.rand(8, generator=g, dtype=torch.float64)
    p[seed] = 0.0  # a zero-probability expert
    p, q = p / p.sum(), q / q.sum()
    assert float(js_divergence_bits(p, q)) == pytest.approx(jensenshannon(p, q, base=2) ** 2, abs=1e-12)
    assert float(js_divergence_bits(p, p)) == 0.0
    assert float(js_divergence_bits(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))) == 1.0


def test_reference_batches_equal_brute_force(model):
    ids = torch.randint(0, 100, (3, 2, 20), generator=torch.Generator().manual_seed(0))
    got = record_batches(model, iter(ids), max_batches=2)  # the third batch is past the cap
    expected = brute_force(model, {"reference": [row.tolist() for batch in ids[:2] for row in batch]})
    assert_same_routing(got, expected)


def test_no_hooks_unless_recording(model, tokenizer, evaldata):
    routers = [router for _, router in moe_routers(model)]
    evaluate(model, tokenizer, ["piqa"], data_dir=evaldata, limit=2)
    assert all(not router._forward_hooks for router in routers)
    recorder = RoutingRecorder(model)
    with pytest.raises(RuntimeError, match="inside `with recorder:`"):
        recorder.before_forward(torch.zeros(1, 1, dtype=torch.long), [1], ["piqa"], [1])
    with recorder, torch.no_grad():
        assert all(len(router._forward_hooks) == 1 for router in routers)
        with pytest.raises(RuntimeError, match="did not announce"):
            model(torch.zeros(1, 3, dtype=torch.long))
        recorder.before_forward(torch.zeros(1, 3, dtype=torch.long), [3], ["piqa"], [1])
        model(torch.zeros(1, 3, dtype=torch.long))
        with pytest.raises(RuntimeError, match="did not announce"):  # one announcement, one pass
            model(torch.zeros(1, 3, dtype=torch.long))
    assert all(not router._forward_hooks for router in routers)


def test_dense_model_is_refused():
    from moe import build_model

    with pytest.raises(ValueError, match="model with MoE layers; this one has none"):
        RoutingRecorder(build_model("tiny-moe", n_experts=0, vocab_size=64, n_layers=1))


def test_jsonl_and_heatmap_are_written(model, expected, tmp_path):
    reference = RoutingSums(["reference"], expected.layers, expected.counts.sum(0, keepdim=True),
                            expected.tokens.sum(0, keepdim=True), expected.entropy_sum.sum(0, keepdim=True),
                            expected.same_top1.sum(0, keepdim=True), expected.pairs.sum(0, keepdim=True))
    rows = routing_rows(expected, reference)
    L, E = expected.counts.shape[1:]
    assert len(rows) == (len(TASKS) + 1) * L
    path = tmp_path / "routing.jsonl"
    for step in (3, 6):
        write_routing_jsonl(path, {"stage": "train", "step": step, "rows": rows})
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 2 * len(rows) and [line["step"] for line in lines[:: len(rows)]] == [3, 6]
    arc = next(line for line in lines if line["task"] == "arc_easy" and line["layer"] == expected.layers[-1])
    s = expected.tasks.index("arc_easy")
    assert arc["tokens"] == expected.tokens[s] and sum(arc["expert_fraction"]) == pytest.approx(1.0)
    assert arc["js_to_reference_bits"] == pytest.approx(float(js_divergence_bits(
        expected.expert_fraction()[s, -1], reference.expert_fraction()[0, -1])))
    assert lines[0]["task"] is None and "js_to_reference_bits" not in lines[0]

    import matplotlib.image

    png = draw_routing_heatmap(tmp_path / "routing.png", expected, reference)
    height, width, _ = matplotlib.image.imread(png).shape
    assert (width, height) == heatmap_size(len(TASKS) + 1, L, E)
