"""MoE on some layers only (ModelConfig.moe_every / first_k_dense / dense_layers): which layers are MoE, against
HF transformers' own decoder layers (Qwen2-MoE's decoder_sparse_step and mlp_only_layers, DeepSeek-V3's
first_k_dense_replace); the modules built, the statistics returned, and parameter and FLOP counts against the
built model and HF's Qwen2-MoE; validation; upcycling. (HF import and export: tests/test_hf.py.)

Shapes: L MoE layers, E experts.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DeepseekV3Config, Qwen2MoeConfig

from moe.errors import ConfigError
from moe.mlp import SwiGLU
from moe.model import Transformer, build_model
from moe.moe_layer import MoELayer
from moe.upcycle import upcycle

from .tiny_models import V, tiny

MOE = dict(n_experts=4, top_k=2, expert_ffn_dim=16, n_layers=6)
PATTERNS = {  # name: (our fields, MoE layers of a 6-layer model)
    "every layer": ({}, [0, 1, 2, 3, 4, 5]),
    "every 2nd": (dict(moe_every=2), [1, 3, 5]),
    "every 3rd": (dict(moe_every=3), [2, 5]),
    "first 2 dense": (dict(first_k_dense=2), [2, 3, 4, 5]),
    "dense list": (dict(dense_layers=[0, 4]), [1, 2, 3, 5]),
    "all three": (dict(moe_every=2, first_k_dense=2, dense_layers=[5]), [3]),
}


def hf_moe_layers(model) -> list[int]:
    """The layers of an HF model whose feed-forward block has experts."""
    return [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]


@pytest.mark.parametrize("name", PATTERNS)
def test_moe_layers(name):
    fields, expected = PATTERNS[name]
    config = tiny(**MOE, **fields)
    assert list(config.moe_layer_indices()) == expected
    assert [config.is_moe_layer(i) for i in range(6)] == [i in expected for i in range(6)]


@pytest.mark.parametrize("step, mlp_only_layers", [(1, []), (2, []), (3, []), (1, [0, 4]), (2, [1]), (2, [0, 5])])
def test_qwen2_moe_layers_are_hf_qwen2_moe_layers(step, mlp_only_layers):
    hf_config = Qwen2MoeConfig(vocab_size=V, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                               shared_expert_intermediate_size=16, num_hidden_layers=6, num_attention_heads=4,
                               num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                               decoder_sparse_step=step, mlp_only_layers=mlp_only_layers)
    with torch.device("meta"):
        hf_model = AutoModelForCausalLM.from_config(hf_config)
    ours = tiny(**MOE, moe_every=step, dense_layers=mlp_only_layers, n_shared_experts=1, shared_expert_gate=True,
                attn_bias=True)
    assert list(ours.moe_layer_indices()) == hf_moe_layers(hf_model)
    assert ours.num_params() == sum(p.numel() for p in hf_model.parameters())  # dense layers of ffn_dim included


@pytest.mark.parametrize("k", [0, 1, 3])
def test_first_k_dense_layers_are_deepseek_v3s(k):
    hf_config = DeepseekV3Config(vocab_size=V, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                 num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=4,
                                 n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                                 kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                 v_head_dim=8, first_k_dense_replace=k)
    with torch.device("meta"):
        hf_model = AutoModelForCausalLM.from_config(hf_config)
    assert list(tiny(**MOE, first_k_dense=k).moe_layer_indices()) == hf_moe_layers(hf_model)


@pytest.mark.parametrize("name", PATTERNS)
def test_dense_layers_are_swiglus_of_ffn_dim_and_moe_layers_experts(name):
    config = tiny(**MOE, **PATTERNS[name][0])
    with torch.device("meta"):
        model = Transformer(config)
    for i, block in enumerate(model.layers):
        if config.is_moe_layer(i):
            assert isinstance(block.mlp, MoELayer) and block.mlp.experts.gate_proj.shape == (4, 16, 32)
        else:
            assert isinstance(block.mlp, SwiGLU) and block.mlp.gate_proj.weight.shape == (config.ffn_dim, 32)


@pytest.mark.parametrize("name", ["every 2nd", "first 2 dense", "all three"])
def test_output_has_one_stats_entry_per_moe_layer_in_layer_order(name):
    torch.manual_seed(0)
    model = build_model(tiny(**MOE, **PATTERNS[name][0]))
    seen = {}
    for i, block in enumerate(model.layers):
        if isinstance(block.mlp, MoELayer):
            block.mlp.register_forward_hook(lambda module, args, output, i=i: seen.__setitem__(i, output[1]))
    out = model(torch.randint(0, V, (2, 8)))
    indices = model.config.moe_layer_indices()
    assert len(out.moe) == len(indices) == len(seen) < model.config.n_layers
    assert all(out.moe[j].router_logits is seen[layer].router_logits for j, layer in enumerate(indices))
    assert out.tokens_per_expert.shape == (len(indices), 4)
    torch.testing.assert_close(out.aux_loss, torch.stack([seen[i].load_balancing_loss for i in indices]).mean())


@pytest.mark.parametrize("name", ["every 2nd", "first 2 dense", "all three"])
@pytest.mark.parametrize("extra", [{}, dict(n_shared_experts=1, shared_expert_gate=True, tie_embeddings=True)])
def test_counts_equal_the_built_model(name, extra):
    config = tiny(**MOE, **PATTERNS[name][0], **extra)
    with torch.device("meta"):
        model = Transformer(config)
    total = sum(p.numel() for p in model.parameters())
    assert config.num_params() == total
    # A token passes through top_k of each MoE layer's routed experts, and everything else.
    inactive = sum(p[config.top_k:].numel() for n, p in model.named_parameters() if ".experts." in n)
    assert config.num_active_params() == total - inactive
    embedding = config.vocab_size * config.d_model
    output_layer = embedding  # a tied output layer is still a matmul
    weights = total - inactive - embedding * (1 if config.tie_embeddings else 2) + output_layer
    attention = 12 * config.n_layers * config.n_heads * config.head_dim * 16
    assert config.flops_per_token(16) == 6 * weights + attention
    assert config.num_params() < tiny(**MOE, **extra).num_params()  # dense layers here are smaller than MoE ones


@pytest.mark.parametrize(
    "fields, field",
    [
        (dict(moe_every=0), "moe_every"),
        (dict(moe_every=7), "moe_every"),  # no layer left
        (dict(first_k_dense=-1), "first_k_dense"),
        (dict(first_k_dense=6), "first_k_dense"),  # no layer left
        (dict(dense_layers=[6]), "dense_layers"),
        (dict(dense_layers=[-1]), "dense_layers"),
        (dict(dense_layers=[1, 1]), "dense_layers"),
        (dict(dense_layers=[0, 1, 2, 3, 4, 5]), "dense_layers"),  # no layer left
        (dict(shared_expert_gate=True), "shared_expert_gate"),  # nothing to gate
    ],
)
def test_bad_layer_patterns_name_the_field(fields, field):
    with pytest.raises(ConfigError, match=f"ModelConfig.{field}=") as error:
        tiny(**MOE, **fields)
    assert error.value.field == field


def test_dense_models_ignore_the_pattern():
    config = tiny(n_layers=4, first_k_dense=1, moe_every=2)
    assert config.moe_layer_indices() == () and not config.is_moe_layer(3)


def test_dense_first_upcycling_copies_the_dense_layers_and_computes_the_dense_function():
    torch.manual_seed(0)
    dense = build_model("tiny-dense", n_layers=3)
    moe = upcycle(dense, n_experts=4, top_k=2, router_init="zeros", first_k_dense=1)
    assert moe.config.moe_layer_indices() == (1, 2)
    assert all(torch.equal(p, q) for p, q in zip(moe.layers[0].mlp.parameters(), dense.layers[0].mlp.parameters()))
    tokens = torch.randint(0, dense.config.vocab_size, (2, 12))
    out = moe(tokens)
    torch.testing.assert_close(out.logits, dense(tokens).logits, rtol=1e-5, atol=1e-5)
    assert len(out.moe) == 2
