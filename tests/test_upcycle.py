"""Sparse upcycling: with a uniform router the upcycled MoE computes the dense model's function."""

import pytest
import torch

from moe.model import build_model
from moe.upcycle import upcycle


@pytest.mark.parametrize("n_experts, top_k", [(4, 2), (8, 2), (4, 1), (4, 4)])
def test_upcycled_model_equals_dense_at_init_with_uniform_router(n_experts, top_k):
    torch.manual_seed(0)
    dense = build_model("tiny-dense", n_layers=2, sliding_window=5)
    moe = upcycle(dense, n_experts=n_experts, top_k=top_k, router_init="zeros")
    assert moe.config.is_moe and moe.config.sliding_window == 5
    tokens = torch.randint(0, dense.config.vocab_size, (2, 12))
    expected = dense(tokens).logits
    out = moe(tokens)
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)
    assert out.aux_loss is not None


def test_upcycled_experts_are_copies_and_the_router_is_learned():
    torch.manual_seed(0)
    dense = build_model("tiny-dense", n_layers=2)
    moe = upcycle(dense, n_experts=4)
    for dense_block, moe_block in zip(dense.layers, moe.layers):
        for e in range(4):
            assert torch.equal(moe_block.mlp.experts.gate_proj[e], dense_block.mlp.gate_proj.weight)
            assert torch.equal(moe_block.mlp.experts.down_proj[e], dense_block.mlp.down_proj.weight)
        assert moe_block.mlp.router.gate.weight.abs().sum() > 0  # the paper's fresh router, not uniform
        assert torch.equal(moe_block.self_attn.q_proj.weight, dense_block.self_attn.q_proj.weight)
    # the copies are independent parameters, not views of one tensor
    moe.layers[0].mlp.experts.gate_proj.data[0].zero_()
    assert moe.layers[0].mlp.experts.gate_proj[1].abs().sum() > 0


def test_upcycling_a_moe_model_is_refused():
    with pytest.raises(ValueError, match="n_experts"):
        upcycle(build_model("tiny-moe"))
