"""moe.moe_layer.MoELayer against a per-token oracle built from the definitions: softmax over the router
logits, top-k, optional renormalisation, weighted sum of each chosen expert's SwiGLU from the stacked
weights, plus the shared experts (scaled by a sigmoid gate, Qwen2-MoE); capacity limits against a brute-force first-come queue per expert.

Shapes: B batch, T time, N = B*T tokens, D model dim, E experts, k experts per token.
"""

from __future__ import annotations

import math

import pytest
import torch

import moe.dispatch as dispatch_module
from moe.config import ModelConfig
from moe.dispatch import LocalDispatcher
from moe.moe_layer import MoELayer, capacity_keep_mask

D, FFN = 16, 24


def make_layer(seed: int = 0, **overrides) -> MoELayer:
    values = {"vocab_size": 32, "d_model": D, "n_layers": 1, "n_heads": 2, "ffn_dim": FFN, "n_experts": 4,
              "top_k": 2, "expert_backend": "loop"}
    values.update(overrides)
    layer = MoELayer(ModelConfig(**values))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return layer


def swiglu(x, gate_w, up_w, down_w):
    gate = gate_w @ x
    return down_w @ (gate * torch.sigmoid(gate) * (up_w @ x))


def brute_force_keep(experts: list[list[int]], capacity: int) -> list[list[bool]]:
    """Fill each expert's queue with all first choices in token order, then all second choices, ..."""
    keep = [[False] * len(experts[0]) for _ in experts]
    used: dict[int, int] = {}
    for choice in range(len(experts[0])):
        for n, row in enumerate(experts):
            e = row[choice]
            if used.get(e, 0) < capacity:
                used[e] = used.get(e, 0) + 1
                keep[n][choice] = True
    return keep


def oracle(layer: MoELayer, x: torch.Tensor, normalize: bool, capacity: int | None = None):
    """Per token: (output, chosen experts, keep flags)."""
    tokens = x.reshape(-1, x.shape[-1])
    W = layer.router.gate.weight
    ex = layer.experts
    choices = []
    for t in tokens:
        probs = torch.softmax(W @ t, dim=-1)
        order = sorted(range(len(probs)), key=lambda e: -probs[e].item())[: layer.top_k]
        weights = probs[order] / probs[order].sum() if normalize else probs[order]
        choices.append((order, weights))
    experts = [order for order, _ in choices]
    keep = brute_force_keep(experts, capacity) if capacity is not None else [[True] * layer.top_k] * len(tokens)
    outs = []
    for t, (order, weights), kept in zip(tokens, choices, keep):
        out = torch.zeros_like(t)
        for e, w, k in zip(order, weights, kept):
            if k:
                out = out + w * swiglu(t, ex.gate_proj[e], ex.up_proj[e], ex.down_proj[e])
        if layer.shared_experts is not None:
            s = layer.shared_experts
            shared = swiglu(t, s.gate_proj.weight, s.up_proj.weight, s.down_proj.weight)
            if layer.shared_expert_gate is not None:
                shared = torch.sigmoid(layer.shared_expert_gate.weight[0] @ t) * shared
            out = out + shared
        outs.append(out)
    return torch.stack(outs).view_as(x), experts, keep


def routed_inputs(logits: torch.Tensor, layer: MoELayer, seed: int = 0) -> torch.Tensor:
    """Inputs (1, N, D) and a gate that reads the router logits off the first E coordinates of each token."""
    n, n_experts = logits.shape
    x = torch.randn(1, n, D, generator=torch.Generator().manual_seed(seed)) * 0.1
    x[0, :, :n_experts] = logits
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[:, :n_experts] = torch.eye(n_experts)
    return x


@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize("n_shared_experts, shared_expert_gate", [(0, False), (1, False), (2, False), (2, True)])
@pytest.mark.parametrize("backend", ["loop", "grouped"])
def test_layer_matches_per_token_oracle(backend, n_shared_experts, shared_expert_gate, norm_topk_prob):
    layer = make_layer(expert_backend=backend, n_shared_experts=n_shared_experts, norm_topk_prob=norm_topk_prob,
                       n_experts=6, top_k=2, shared_expert_gate=shared_expert_gate)
    x = torch.randn(2, 7, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, stats = layer(x)
        expected, experts, _ = oracle(layer, x, norm_topk_prob)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert (layer.shared_experts is None) == (n_shared_experts == 0)
    assert (layer.shared_expert_gate is None) == (not shared_expert_gate)
    torch.testing.assert_close(stats.router_logits, x.reshape(-1, D) @ layer.router.gate.weight.T)
    counts = torch.bincount(torch.tensor(experts).flatten(), minlength=6)
    assert torch.equal(stats.tokens_per_expert, counts)
    assert stats.tokens_per_expert.sum() == 14 * 2
    assert stats.dropped == 0


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.25])
@pytest.mark.parametrize("backend", ["loop", "grouped"])
def test_capacity_matches_brute_force_queue(backend, capacity_factor, top_k):
    layer = make_layer(expert_backend=backend, capacity_factor=capacity_factor, top_k=top_k)
    x = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(4))
    capacity = math.ceil(capacity_factor * 18 * top_k / 4)
    with torch.no_grad():
        out, stats = layer(x)
        expected, experts, keep = oracle(layer, x, normalize=True, capacity=capacity)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    kept_experts = [e for row, flags in zip(experts, keep) for e, k in zip(row, flags) if k]
    assert torch.equal(stats.tokens_per_expert, torch.bincount(torch.tensor(kept_experts), minlength=4))
    assert stats.dropped == 18 * top_k - len(kept_experts)
    assert stats.tokens_per_expert.max() <= capacity


def test_capacity_keep_mask_matches_brute_force():
    experts = torch.stack([torch.randperm(5, generator=torch.Generator().manual_seed(n))[:3] for n in range(20)])
    for capacity in range(1, 14):
        expected = torch.tensor(brute_force_keep(experts.tolist(), capacity))
        assert torch.equal(capacity_keep_mask(experts, 5, capacity), expected), capacity


@pytest.mark.parametrize("backend", ["loop", "grouped"])
def test_fully_dropped_token_gets_exactly_zero(backend):
    # Every token ranks expert 0 first and expert 1 second; capacity ceil(0.5 * 8 * 2 / 4) = 2, so only
    # tokens 0 and 1 are served and tokens 2..7 lose both choices.
    layer = make_layer(expert_backend=backend, capacity_factor=0.5)
    x = routed_inputs(torch.tensor([[3.0, 2.0, -1.0, -1.0]]).repeat(8, 1), layer)
    with torch.no_grad():
        out, stats = layer(x)
    assert stats.dropped == 12
    assert stats.tokens_per_expert.tolist() == [2, 2, 0, 0]
    assert torch.count_nonzero(out[0, 2:]) == 0
    assert (out[0, :2].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("backend", ["loop", "grouped"])
def test_first_choices_have_priority_over_second_choices(backend):
    # Token n's first choice is expert n and its second choice expert n + 1 (mod 4). With capacity 1 the first
    # choices fill every expert, so token 0's second choice loses expert 1 to token 1's later first choice.
    layer = make_layer(expert_backend=backend, capacity_factor=0.5)
    logits = torch.full((4, 4), -2.0)
    for n in range(4):
        logits[n, n], logits[n, (n + 1) % 4] = 2.0, 1.0
    x = routed_inputs(logits, layer)
    with torch.no_grad():
        out, stats = layer(x)
        ex = layer.experts
        probs = torch.softmax(logits, -1)
        for n in range(4):
            weight = probs[n, n] / (probs[n, n] + probs[n, (n + 1) % 4])
            expected = weight * swiglu(x[0, n], ex.gate_proj[n], ex.up_proj[n], ex.down_proj[n])
            torch.testing.assert_close(out[0, n], expected, atol=1e-6, rtol=1e-5)
    assert stats.tokens_per_expert.tolist() == [1, 1, 1, 1]
    assert stats.dropped == 4


@pytest.mark.parametrize("backend", ["loop", "grouped"])
def test_large_capacity_equals_dropless(backend):
    x = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out_dropless, stats_dropless = make_layer(expert_backend=backend)(x)
        out_capped, stats_capped = make_layer(expert_backend=backend, capacity_factor=4.0)(x)  # capacity N*k
    torch.testing.assert_close(out_capped, out_dropless, atol=0, rtol=0)
    assert stats_capped.dropped == 0
    assert torch.equal(stats_capped.tokens_per_expert, stats_dropless.tokens_per_expert)
    assert stats_dropless.tokens_per_expert.sum() == 18 * 2


@pytest.mark.parametrize("n_shared_experts, shared_expert_gate", [(0, False), (1, False), (1, True)])
@pytest.mark.parametrize("backend", ["loop", "grouped"])
def test_backward_reaches_every_parameter(backend, n_shared_experts, shared_expert_gate):
    layer = make_layer(expert_backend=backend, n_shared_experts=n_shared_experts, shared_expert_gate=shared_expert_gate)
    x = torch.randn(2, 16, D, generator=torch.Generator().manual_seed(6), requires_grad=True)
    out, stats = layer(x)
    assert (stats.tokens_per_expert > 0).all()  # so that every expert should receive a gradient
    (out.square().mean() + stats.load_balancing_loss + stats.z_loss).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        if p.shape[0] == 4 and "experts" in name and "shared" not in name:
            for e in range(4):
                assert p.grad[e].abs().sum() > 0, f"{name}[{e}]"
        else:
            assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_grouped_backward_matches_loop(capacity_factor):
    x = torch.randn(2, 8, D, generator=torch.Generator().manual_seed(7))
    grads = {}
    for b in ("loop", "grouped"):
        layer = make_layer(expert_backend=b, n_shared_experts=1, capacity_factor=capacity_factor)
        xb = x.clone().requires_grad_()
        out, stats = layer(xb)
        (out.square().sum() + stats.load_balancing_loss).backward()
        grads[b] = [xb.grad] + [p.grad for p in layer.parameters()]
    for g, want in zip(grads["grouped"], grads["loop"]):
        torch.testing.assert_close(g, want, atol=1e-5, rtol=1e-5)


def test_unused_expert_gets_zero_gradient_not_none():
    layer = make_layer(expert_backend="grouped")
    logits = torch.tensor([[3.0, 2.0, 1.0, -5.0]]).repeat(6, 1)  # expert 3 is never chosen
    x = routed_inputs(logits, layer)
    out, stats = layer(x)
    out.sum().backward()
    assert stats.tokens_per_expert[3] == 0
    for p in (layer.experts.gate_proj, layer.experts.up_proj, layer.experts.down_proj):
        assert p.grad is not None
        assert torch.count_nonzero(p.grad[3]) == 0
        assert p.grad[:3].abs().sum() > 0


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_combine_without_autograd_matches_the_autograd_combine(top_k, monkeypatch):
    """Without autograd the local dispatcher adds each weighted row straight into its token (index_add_): the k
    outputs of a token are summed in expert order, not choice order, the same sum bit for bit when k <= 2."""
    calls = []
    original = dispatch_module._add_weighted_rows
    monkeypatch.setattr(dispatch_module, "_add_weighted_rows", lambda *args: calls.append(1) or original(*args))
    gen = torch.Generator().manual_seed(5)
    n_tokens, n_experts = 13, 5
    experts = torch.stack([torch.randperm(n_experts, generator=gen)[:top_k] for _ in range(n_tokens)])  # (N, k)
    weights = torch.rand(n_tokens, top_k, generator=gen)
    dispatcher = LocalDispatcher(n_experts)
    dispatched = dispatcher.dispatch(torch.randn(n_tokens, D, generator=gen), experts)
    expert_out = torch.randn(n_tokens * top_k, D, generator=gen)
    with_graph = dispatcher.combine(expert_out.clone().requires_grad_(), dispatched.state, weights)
    assert not calls
    with torch.inference_mode():
        without = dispatcher.combine(expert_out, dispatched.state, weights)
    assert calls == [1]
    if top_k <= 2:
        assert torch.equal(without, with_graph.detach())
    else:
        torch.testing.assert_close(without, with_graph.detach(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
@pytest.mark.parametrize("top_k", [1, 2])
def test_inference_forward_equals_the_training_forward_bit_for_bit(top_k, capacity_factor):
    """Evaluation (inference mode: the experts' and the combine's inference paths) scores exactly what the same
    weights compute in a training forward, for F a multiple of 32 as in the MoE presets (see moe.experts)."""
    layer = make_layer(ffn_dim=64, n_experts=6, top_k=top_k, capacity_factor=capacity_factor)
    x = torch.randn(3, 11, D, generator=torch.Generator().manual_seed(6))
    training, _ = layer(x)
    assert training.requires_grad
    with torch.inference_mode():
        inference, _ = layer(x)
    assert torch.equal(inference, training.detach())
