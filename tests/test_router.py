"""moe.router.TopKRouter against a brute-force router: softmax, sort each token's experts, keep k, renormalise;
with a selection bias, sort by probability plus bias but weigh by probability.

Shapes: N tokens, D model dim, E experts, k experts per token.
"""

from __future__ import annotations

import math

import pytest
import torch

from moe.config import ModelConfig
from moe.router import TopKRouter


def brute_force_route(logits: torch.Tensor, top_k: int, normalize: bool, bias: list[float] | None = None):
    """Per token in plain Python: softmax in float64, sort experts by probability (plus bias), keep the first k,
    weigh them by their probabilities."""
    bias = bias or [0.0] * logits.shape[-1]
    weights, experts = [], []
    for row in logits.tolist():
        exps = [math.exp(v - max(row)) for v in row]
        probs = [e / sum(exps) for e in exps]
        chosen = sorted(range(len(row)), key=lambda e: -(probs[e] + bias[e]))[:top_k]
        kept = [probs[e] for e in chosen]
        if normalize:
            kept = [p / sum(kept) for p in kept]
        weights.append(kept)
        experts.append(chosen)
    return torch.tensor(weights), torch.tensor(experts)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("n_experts,top_k", [(4, 1), (4, 2), (8, 2), (8, 3), (6, 6)])
def test_router_matches_brute_force(n_experts, top_k, normalize):
    torch.manual_seed(n_experts * 10 + top_k)
    router = TopKRouter(d_model=16, n_experts=n_experts, top_k=top_k, normalize=normalize)
    torch.nn.init.normal_(router.gate.weight, std=1.0)
    x = torch.randn(37, 16)
    routing = router(x)

    torch.testing.assert_close(routing.logits, x @ router.gate.weight.T)
    weights, experts = brute_force_route(routing.logits, top_k, normalize)
    assert torch.equal(routing.experts, experts)
    torch.testing.assert_close(routing.weights, weights.float(), atol=1e-6, rtol=1e-5)
    assert routing.weights.shape == routing.experts.shape == (37, top_k)
    if normalize:
        torch.testing.assert_close(routing.weights.sum(-1), torch.ones(37))
    else:
        assert (routing.weights.sum(-1) < 1 + 1e-6).all()


def test_router_keeps_input_dtype_and_routes_in_float32():
    torch.manual_seed(0)
    router = TopKRouter(d_model=16, n_experts=8, top_k=2).to(torch.bfloat16)
    routing = router(torch.randn(5, 16, dtype=torch.bfloat16))
    assert routing.weights.dtype == torch.bfloat16
    _, experts = brute_force_route(routing.logits.float(), 2, True)
    assert torch.equal(routing.experts, experts)


def test_router_weights_carry_gradient_to_gate():
    torch.manual_seed(0)
    router = TopKRouter(d_model=16, n_experts=4, top_k=2, normalize=False)
    routing = router(torch.randn(10, 16))
    (routing.weights * torch.randn(10, 2)).sum().backward()
    assert router.gate.weight.grad is not None and router.gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("n_experts,top_k", [(4, 1), (8, 2), (8, 3)])
def test_selection_bias_chooses_by_probability_plus_bias_and_weighs_by_probability(n_experts, top_k, normalize):
    torch.manual_seed(n_experts + top_k)
    router = TopKRouter(d_model=16, n_experts=n_experts, top_k=top_k, normalize=normalize, selection_bias=True)
    torch.nn.init.normal_(router.gate.weight, std=0.3)
    # Biases of the size of the probability gaps, so that they change many tokens' choices but not all.
    bias = (torch.randn(n_experts) * 0.1).tolist()
    router.expert_bias.copy_(torch.tensor(bias))
    x = torch.randn(64, 16)
    routing = router(x)

    weights, experts = brute_force_route(routing.logits, top_k, normalize, bias)
    assert torch.equal(routing.experts, experts)
    torch.testing.assert_close(routing.weights, weights.float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(routing.probs, routing.logits.softmax(-1))  # the unbiased probabilities
    _, unbiased = brute_force_route(routing.logits, top_k, normalize)
    assert not torch.equal(experts, unbiased)  # the bias did change choices: the test can tell the two apart


def test_selection_bias_is_a_zero_float32_buffer_only_when_asked_for():
    plain = TopKRouter(d_model=16, n_experts=4, top_k=2)
    assert plain.expert_bias is None and list(plain.state_dict()) == ["gate.weight"]
    biased = TopKRouter(d_model=16, n_experts=4, top_k=2, selection_bias=True)
    assert set(biased.state_dict()) == {"gate.weight", "expert_bias"}  # persistent: checkpointed
    assert [name for name, _ in biased.named_parameters()] == ["gate.weight"]  # no optimizer sees it
    assert biased.expert_bias.dtype == torch.float32 and torch.equal(biased.expert_bias, torch.zeros(4))
    base = dict(d_model=16, n_layers=1, n_heads=2, n_experts=4)
    assert TopKRouter.from_config(ModelConfig(**base, router_bias_update_rate=0.001)).expert_bias is not None
    for off in (None, 0.0):
        assert TopKRouter.from_config(ModelConfig(**base, router_bias_update_rate=off)).expert_bias is None


def test_a_zero_bias_routes_as_no_bias():
    torch.manual_seed(0)
    plain = TopKRouter(d_model=16, n_experts=8, top_k=2)
    biased = TopKRouter(d_model=16, n_experts=8, top_k=2, selection_bias=True)
    biased.load_state_dict({**plain.state_dict(), "expert_bias": torch.zeros(8)})
    x = torch.randn(20, 16)
    for got, expected in zip(biased(x), plain(x)):
        assert torch.equal(got, expected)


def test_meta_construction_then_reset_zeroes_the_bias():
    with torch.device("meta"):
        router = TopKRouter(d_model=16, n_experts=4, top_k=2, selection_bias=True)
    router.to_empty(device="cpu")
    router.expert_bias.fill_(float("nan"))  # what uninitialised memory may hold
    router.reset_parameters()
    assert torch.equal(router.expert_bias, torch.zeros(4))
