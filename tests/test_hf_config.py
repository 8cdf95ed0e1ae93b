"""moe.hf_config: HF config.json dicts to our ModelConfig and back, without weights: RoPE in transformers v4 and
v5 spellings, Qwen2's per-layer windows and Qwen2-MoE's layer pattern against HF's own config classes. (Checkpoints
and logits: tests/test_hf.py.)"""

import pytest
from transformers import Qwen2Config, Qwen2MoeConfig

from moe.config import ModelConfig
from moe.hf_config import config_from_hf, config_to_hf

HF_DIMS = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64)
OUR_DIMS = dict(vocab_size=96, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)


@pytest.mark.parametrize(
    "hf_config, theta",
    [
        (dict(rope_theta=123.0), 123.0),  # transformers v4
        (dict(rope_theta=123.0, rope_scaling=None), 123.0),
        (dict(rope_parameters={"rope_theta": 321.0, "rope_type": "default"}), 321.0),  # v5
        (dict(), 10000.0),  # LlamaConfig's default
    ],
)
def test_rope_theta_from_v4_and_v5_configs(hf_config, theta):
    base = dict(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4)
    assert config_from_hf({**base, **hf_config}).rope_theta == theta


@pytest.mark.parametrize(
    "hf_config, name",
    [
        (dict(rope_parameters={"rope_theta": 1e4, "rope_type": "linear", "factor": 2.0}), "linear"),
        (dict(rope_theta=1e4, rope_scaling={"type": "dynamic", "factor": 2.0}), "dynamic"),
        (dict(rope_theta=1e4, rope_scaling={"rope_type": "yarn", "factor": 8.0}), "yarn"),  # llama3 is supported
    ],
)
def test_rope_scaling_is_refused_by_name(hf_config, name):
    base = dict(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4)
    with pytest.raises(NotImplementedError, match=name):
        config_from_hf({**base, **hf_config})


@pytest.mark.parametrize("v4", [False, True])
@pytest.mark.parametrize("use_sliding_window, max_window_layers", [(True, 0), (True, 2), (True, 4), (False, 1)])
def test_qwen2_layer_windows_match_hf_layer_types(use_sliding_window, max_window_layers, v4):
    hf = Qwen2Config(**{**HF_DIMS, "num_hidden_layers": 4}, use_sliding_window=use_sliding_window,
                     sliding_window=7, max_window_layers=max_window_layers)
    hf_dict = hf.to_dict()
    if v4:  # configs written before transformers had layer_types
        del hf_dict["layer_types"]
        hf_dict["sliding_window"] = 7
    windows = config_from_hf(hf_dict).layer_windows or [None] * 4
    assert windows == [7 if t == "sliding_attention" else None for t in hf.layer_types]


@pytest.mark.parametrize(
    "ours, hf",
    [
        (dict(), dict(decoder_sparse_step=1, mlp_only_layers=[0, 1], qkv_bias=False)),  # first_k_dense=2 below
        (dict(moe_every=2), dict(decoder_sparse_step=2, mlp_only_layers=[1])),  # the step keeps layer 0 dense
        (dict(moe_every=2, dense_layers=[3]), dict(decoder_sparse_step=2, mlp_only_layers=[1, 3])),
        (dict(dense_layers=[3], first_k_dense=0), dict(decoder_sparse_step=1, mlp_only_layers=[3])),
    ],
)
def test_qwen2_moe_layer_pattern_fields(ours, hf):
    """Export folds first_k_dense into mlp_only_layers, listing only layers the step would make MoE."""
    config = ModelConfig(**{**OUR_DIMS, "n_layers": 6}, n_experts=4, expert_ffn_dim=16,
                         **{"first_k_dense": 2, **ours})
    exported = config_to_hf(config)
    assert exported["model_type"] == "qwen2_moe"
    assert {k: exported[k] for k in hf} == hf
    assert config_from_hf(exported).moe_layer_indices() == config.moe_layer_indices()


@pytest.mark.parametrize(
    "changes, error",
    [
        (dict(use_sliding_window=True), "use_sliding_window"),
        (dict(shared_expert_intermediate_size=24), "shared_expert_intermediate_size=24 is not a multiple"),
    ],
)
def test_qwen2_moe_import_refuses_what_we_cannot_build(changes, error):
    hf = Qwen2MoeConfig(**HF_DIMS, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2).to_dict()
    with pytest.raises(NotImplementedError, match=error):
        config_from_hf({**hf, **changes})


def test_qwen2_moe_v4_config_has_qkv_bias():
    """transformers 4 configs written before Qwen2-MoE's qkv_bias existed always had the bias."""
    hf = Qwen2MoeConfig(**HF_DIMS, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2).to_dict()
    del hf["qkv_bias"]
    assert config_from_hf(hf).attn_bias
