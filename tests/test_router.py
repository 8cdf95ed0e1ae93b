"""moe.router.TopKRouter against a brute-force router: softmax, sort each token's experts, keep k, renormalise.

Shapes: N tokens, D model dim, E experts, k experts per token.
"""

from __future__ import annotations

import math

import pytest
import torch

from moe.router import TopKRouter


def brute_force_route(logits: torch.Tensor, top_k: int, normalize: bool):
    """Per token in plain Python: softmax in float64, sort experts by probability, keep the first k."""
    weights, experts = [], []
    for row in logits.tolist():
        exps = [math.exp(v - max(row)) for v in row]
        probs = [e / sum(exps) for e in exps]
        chosen = sorted(range(len(row)), key=lambda e: -probs[e])[:top_k]
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
