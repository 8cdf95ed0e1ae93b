"""moe.linear_cross_entropy against the unfused oracle F.cross_entropy(F.linear(h, W).float(), labels): the loss
and both gradients, for chunk sizes that do and do not divide the tokens, ignored labels, bf16 weights, autocast,
a scaled upstream gradient and frozen weights; and the model's labels= path against its logits.

Shapes: N tokens, D model dim, V vocabulary.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe.linear_cross_entropy import IGNORE_INDEX, default_chunk_rows, linear_cross_entropy
from moe.model import Transformer, build_model

from .tiny_models import V, randomize, tiny

N, D, VOCAB = 37, 16, 50


def inputs(dtype=torch.float32, seed: int = 0, ignored: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=gen).to(dtype).requires_grad_()
    weight = torch.randn(VOCAB, D, generator=gen).to(dtype).requires_grad_()
    labels = torch.randint(0, VOCAB, (N,), generator=gen)
    labels[torch.randperm(N, generator=gen)[:ignored]] = IGNORE_INDEX
    return hidden, weight, labels


def loss_and_grads(fn, hidden, weight, labels, scale: float = 1.0):
    hidden, weight = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = fn(hidden, weight, labels)
    (loss * scale).backward()
    return loss.detach(), hidden.grad, weight.grad


def oracle(hidden, weight, labels):
    return F.cross_entropy(F.linear(hidden, weight).float(), labels, ignore_index=IGNORE_INDEX)


@pytest.mark.parametrize("chunk_rows", [1, 5, 16, 37, 1000])
@pytest.mark.parametrize("ignored", [0, 11])
def test_matches_unfused_loss_and_gradients(chunk_rows, ignored):
    args = inputs(ignored=ignored)
    expected = loss_and_grads(oracle, *args)
    got = loss_and_grads(lambda h, w, y: linear_cross_entropy(h, w, y, chunk_rows=chunk_rows), *args)
    for name, g, e in zip(("loss", "hidden grad", "weight grad"), got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6, msg=name)
    assert got[0].dtype == torch.float32


def test_upstream_gradient_scales_both_gradients():
    args = inputs()
    expected = loss_and_grads(oracle, *args, scale=-2.5)
    got = loss_and_grads(lambda h, w, y: linear_cross_entropy(h, w, y, chunk_rows=8), *args, scale=-2.5)
    for g, e in zip(got[1:], expected[1:]):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_bf16_inputs_give_bf16_gradients_close_to_unfused():
    args = inputs(torch.bfloat16)
    expected = loss_and_grads(oracle, *args)
    got = loss_and_grads(lambda h, w, y: linear_cross_entropy(h, w, y, chunk_rows=8), *args)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], expected[0], rtol=1e-3, atol=1e-3)
    # The unfused backward rounds the N x V logit gradients to bf16 too; both sum the weight gradient in float32.
    for g, e in zip(got[1:], expected[1:]):
        torch.testing.assert_close(g.float(), e.float(), rtol=2e-2, atol=2e-3)


def test_autocast_matches_unfused_under_autocast():
    args = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = loss_and_grads(oracle, *args)
        got = loss_and_grads(lambda h, w, y: linear_cross_entropy(h, w, y, chunk_rows=8), *args)
    assert got[1].dtype == got[2].dtype == torch.float32  # gradients in the parameters' dtype
    # The output layer ran in bf16, as F.linear does under autocast (not in float32, which a matmul into a float32
    # buffer would do): exactly the loss of bf16 inputs without autocast, and not the float32 loss.
    hidden, weight, labels = args
    bf16 = linear_cross_entropy(hidden.detach().bfloat16(), weight.detach().bfloat16(), labels, chunk_rows=8)
    assert torch.equal(got[0], bf16) and not torch.equal(got[0], loss_and_grads(oracle, *args)[0])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=2e-2, atol=2e-3)


def test_frozen_weight_and_no_grad():
    hidden, weight, labels = inputs()
    weight = weight.detach()
    loss = linear_cross_entropy(hidden, weight, labels, chunk_rows=4)
    loss.backward()
    expected_hidden = hidden.detach().clone().requires_grad_()
    oracle(expected_hidden, weight, labels).backward()
    torch.testing.assert_close(hidden.grad, expected_hidden.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, labels), oracle(hidden, weight, labels))


def test_all_labels_ignored_is_nan_like_cross_entropy():
    hidden, weight, labels = inputs()
    labels[:] = IGNORE_INDEX
    assert torch.isnan(linear_cross_entropy(hidden, weight, labels)) and torch.isnan(oracle(hidden, weight, labels))


def test_batched_shapes_and_mismatch():
    hidden, weight, labels = inputs()
    flat = linear_cross_entropy(hidden[:36], weight, labels[:36])
    torch.testing.assert_close(linear_cross_entropy(hidden[:36].view(4, 9, D), weight, labels[:36].view(4, 9)), flat)
    with pytest.raises(ValueError, match="37 hidden states but 36 labels"):
        linear_cross_entropy(hidden, weight, labels[:36])


def test_default_chunks_bound_the_logits_held():
    assert default_chunk_rows(8192, torch.device("cpu")) == 256
    assert default_chunk_rows(32000, torch.device("cuda")) == 8388
    assert default_chunk_rows(10**9, torch.device("cpu")) == 1


@pytest.mark.parametrize("overrides", [
    {"n_experts": 4, "top_k": 2, "expert_ffn_dim": 32},
    {"tie_embeddings": True},
])
def test_model_labels_path_matches_logits_path(overrides):
    torch.manual_seed(0)
    model = randomize(build_model(tiny(**overrides))).train()
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V, (3, 13), generator=gen)
    labels = torch.randint(0, V, (3, 13), generator=gen)
    labels[0, :4] = IGNORE_INDEX

    def run(with_labels: bool):
        model.zero_grad(set_to_none=True)
        out = model(tokens, labels=labels) if with_labels else model(tokens)
        loss = out.loss if with_labels else F.cross_entropy(out.logits.flatten(0, 1).float(), labels.flatten())
        (loss + 0.01 * out.aux_loss if out.moe else loss).backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (fused, fused_grads), (plain, plain_grads) = run(True), run(False)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    assert fused_grads.keys() == plain_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_model_refuses_labels_with_logits_at():
    model = Transformer(tiny())
    tokens = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="labels and logits_at"):
        model(tokens, labels=tokens, logits_at=torch.ones(1, 4, dtype=torch.bool))


def test_no_gradients_are_computed_without_grad_mode():
    """Evaluation runs under no_grad with parameters that require grad: the chunks' gradient products are skipped."""
    hidden, weight, labels = inputs()
    with torch.no_grad(), torch.profiler.profile() as prof:
        loss = linear_cross_entropy(hidden, weight, labels, chunk_rows=8)
    names = {event.key for event in prof.key_averages()}
    assert "aten::mm" in names and not names & {"aten::addmm_", "aten::scatter_add_", "aten::matmul"}
    torch.testing.assert_close(loss, oracle(hidden, weight, labels).detach())


def test_float16_keeps_the_gradient_a_loss_scale_protects():
    """The logits' gradient is about p / N: formed in float16 before the loss scale it would underflow to zero, so
    float16 takes the unchunked route and a scaled backward gives the float32 gradients, scaled."""
    gen = torch.Generator().manual_seed(0)
    n, vocab = 4096, 512
    hidden = torch.randn(n, D, generator=gen).half().requires_grad_()
    weight = (torch.randn(vocab, D, generator=gen) * 0.1).half().requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=gen)
    (linear_cross_entropy(hidden, weight, labels, chunk_rows=64) * 65536.0).backward()
    expected_weight = weight.detach().float().requires_grad_()
    oracle(hidden.detach().float(), expected_weight, labels).backward()
    assert torch.isfinite(weight.grad).all() and torch.isfinite(hidden.grad).all()
    torch.testing.assert_close(weight.grad.float() / 65536.0, expected_weight.grad, rtol=2e-2, atol=1e-6)


def test_scaled_upstream_gradient_is_not_rounded_to_bf16():
    args = inputs(torch.bfloat16)
    a = loss_and_grads(lambda h, w, y: linear_cross_entropy(h, w, y, chunk_rows=8), *args, scale=1.0)
    b = loss_and_grads(lambda h, w, y: linear_cross_entropy(h, w, y, chunk_rows=8), *args, scale=1 / 3)
    torch.testing.assert_close(b[1].float(), (a[1].float() / 3).bfloat16().float(), rtol=0, atol=0)


def test_second_order_gradients_are_refused():
    hidden, weight, labels = inputs()
    (grad,) = torch.autograd.grad(linear_cross_entropy(hidden, weight, labels), hidden, create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()
