"""moe.losses against HF transformers' Mixtral load-balancing loss, a uniform-routing construction, and the
z-loss written out directly.

Shapes: N tokens, E experts, k experts per token.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from moe.losses import (
    expert_assignment_counts,
    load_balancing_loss,
    load_balancing_loss_from_sums,
    router_z_loss,
)


def route(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A top-k router's decision from its logits: float32 probabilities, and the (k, E) counts of the k most probable
    experts of each token."""
    probs = logits.softmax(dim=-1, dtype=torch.float32)
    return probs, expert_assignment_counts(probs.topk(top_k, dim=-1).indices, logits.shape[-1])


EXPERTS_AND_K = [(2, 1), (4, 1), (4, 2), (8, 2), (8, 3), (16, 4)]


@pytest.mark.parametrize("n_experts,top_k", EXPERTS_AND_K)
def test_load_balancing_loss_matches_transformers(n_experts, top_k):
    logits = torch.randn(53, n_experts, generator=torch.Generator().manual_seed(n_experts + top_k)) * 2
    expected = load_balancing_loss_func((logits,), n_experts, top_k)
    torch.testing.assert_close(load_balancing_loss(*route(logits, top_k)), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("n_experts,top_k", EXPERTS_AND_K)
def test_load_balancing_loss_is_k_for_uniform_routing(n_experts, top_k):
    # Token n's logits are a fixed vector cyclically shifted by n, and there are E tokens: every expert is
    # every token rank's j-th choice exactly once (f = 1/E) and its mean probability is exactly 1/E.
    base = torch.randn(n_experts, generator=torch.Generator().manual_seed(0))
    logits = torch.stack([base.roll(n) for n in range(n_experts)])
    fraction = expert_assignment_counts(logits.topk(top_k).indices, n_experts) / n_experts
    torch.testing.assert_close(fraction, torch.full((top_k, n_experts), 1 / n_experts))
    torch.testing.assert_close(load_balancing_loss(*route(logits, top_k)), torch.tensor(float(top_k)))


@pytest.mark.parametrize("n_experts,top_k", [(4, 1), (8, 2)])
def test_load_balancing_loss_grows_when_routing_collapses(n_experts, top_k):
    # Every token confidently picks the same k experts: the loss approaches E (its maximum), well above k.
    logits = torch.zeros(32, n_experts)
    logits[:, :top_k] = 20.0
    assert load_balancing_loss(*route(logits, top_k)).item() == pytest.approx(n_experts, rel=1e-3)


@pytest.mark.parametrize("n_experts,top_k", EXPERTS_AND_K)
def test_load_balancing_loss_of_a_batch_from_the_sums_of_its_parts(n_experts, top_k):
    """What the training logs use: the summed counts and probabilities of unequal parts give the whole batch's loss;
    and what data parallelism differentiates: each part's loss with the whole batch's fractions, whose
    token-weighted mean over the parts is the whole batch's loss."""
    logits = torch.randn(53, n_experts, generator=torch.Generator().manual_seed(n_experts * top_k)) * 2
    parts = [route(chunk, top_k) for chunk in logits.split([20, 33])]
    counts = sum(c for _, c in parts)  # (k, E)
    probability_sum = sum(p.sum(dim=0) for p, _ in parts)  # (E,)
    whole = load_balancing_loss(*route(logits, top_k))
    torch.testing.assert_close(load_balancing_loss_from_sums(counts, probability_sum, 53), whole)
    whole_fraction = counts / 53
    with_global_fraction = [load_balancing_loss(p, c, whole_fraction) * len(p) / 53 for p, c in parts]
    torch.testing.assert_close(sum(with_global_fraction), whole)
    halves = [load_balancing_loss(*route(chunk, top_k)) for chunk in logits.split([20, 33])]
    assert not any(torch.allclose(h, whole) for h in halves)  # the loss is not a mean over tokens


def test_expert_assignment_counts_by_counting():
    experts = torch.tensor([[0, 2], [2, 1], [0, 1], [3, 0]])
    expected = torch.zeros(2, 4)
    for row in experts.tolist():
        for choice, e in enumerate(row):
            expected[choice, e] += 1
    torch.testing.assert_close(expert_assignment_counts(experts, 4), expected)


def test_load_balancing_gradient_flows_through_probabilities_only():
    torch.manual_seed(0)
    gate = torch.nn.Linear(16, 8, bias=False)
    x = torch.randn(40, 16)
    load_balancing_loss(*route(gate(x), 2)).backward()
    grad = gate.weight.grad.clone()
    assert grad.abs().sum() > 0

    # Same loss with the assignment fractions counted by hand as constants: identical gradient.
    gate.weight.grad = None
    logits = gate(x)
    counts = torch.zeros(8)
    for row in logits.detach().topk(2).indices.tolist():
        for e in row:
            counts[e] += 1
    fraction = counts / len(x)
    (8 * (fraction * logits.softmax(-1).mean(0)).sum()).backward()
    torch.testing.assert_close(gate.weight.grad, grad)


@pytest.mark.parametrize("scale", [0.1, 3.0, 30.0])
def test_router_z_loss_matches_direct_formula(scale):
    logits = torch.randn(23, 8, generator=torch.Generator().manual_seed(1)) * scale
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.double().tolist()) / 23
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-5)


def test_router_z_loss_gradient():
    # d/dlogits of mean_n lse_n^2 is 2 lse_n softmax_n / N.
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(2), requires_grad=True)
    router_z_loss(logits).backward()
    lse = torch.logsumexp(logits.detach(), -1, keepdim=True)
    torch.testing.assert_close(logits.grad, 2 * lse * F.softmax(logits.detach(), -1) / 6)


def test_losses_are_float32_for_bf16_logits():
    logits = torch.randn(10, 4).to(torch.bfloat16)
    assert load_balancing_loss(*route(logits, 2)).dtype == torch.float32
    assert router_z_loss(logits).dtype == torch.float32


def test_load_balancing_counts_the_experts_chosen_not_the_most_probable():
    # A router may choose by other scores than its probabilities (a selection bias, DeepSeek-V3): the loss counts
    # the assignments the layer made, which a top-k recomputed from the logits would not.
    logits = torch.randn(40, 8, generator=torch.Generator().manual_seed(3))
    probs = logits.softmax(-1)
    chosen = probs.topk(2, largest=False).indices  # the least probable two, say
    fraction = F.one_hot(chosen, 8).float().sum(dim=0) / 40  # (k, E)
    expected = 8 * (fraction * probs.mean(dim=0)).sum()
    torch.testing.assert_close(load_balancing_loss(probs, expert_assignment_counts(chosen, 8)), expected)
    assert not torch.allclose(load_balancing_loss(*route(logits, 2)), expected)
