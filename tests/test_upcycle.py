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


@torch.no_grad()
def test_a_llama3_checkpoint_upcycles_into_mixtral_and_olmoe_style_models_transformers_loads(tmp_path):
    """From a Llama 3 dense HF checkpoint (scaled RoPE): a Mixtral-style MoE with a uniform router computes the
    dense function exactly; an OLMoE-style one (QK-norm over all heads, new norms starting at one, top-k not
    renormalised) exports as OLMoE, and transformers computes our logits from the export."""
    import transformers

    from moe.hf import load_hf_checkpoint, save_hf_checkpoint

    from .tiny_models import randomize

    hf_config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,  # head_dim 8: OLMoE's is hidden_size / heads
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    randomize(transformers.AutoModelForCausalLM.from_config(hf_config)).save_pretrained(tmp_path / "llama3")
    dense = load_hf_checkpoint(tmp_path / "llama3")
    tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))

    mixtral = upcycle(tmp_path / "llama3", n_experts=4, top_k=2, router_init="zeros")
    assert mixtral.config.rope_scaling == dense.config.rope_scaling
    torch.testing.assert_close(mixtral(tokens).logits, dense(tokens).logits, rtol=1e-5, atol=1e-5)

    olmoe = upcycle(dense, n_experts=4, top_k=2, qk_norm="full", norm_topk_prob=False)
    assert torch.equal(olmoe.layers[0].self_attn.q_norm.weight, torch.ones(32))
    save_hf_checkpoint(olmoe, tmp_path / "olmoe")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "olmoe", attn_implementation="eager")
    assert type(theirs).__name__ == "OlmoeForCausalLM"
    torch.testing.assert_close(theirs.eval()(tokens).logits, olmoe(tokens).logits, rtol=0, atol=1e-5)
