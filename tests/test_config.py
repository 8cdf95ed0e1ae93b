"""ModelConfig: validation names the offending field; derived fields; field metadata; analytic counts vs built
models."""

import pytest
import torch

from moe.config import ModelConfig, format_count, resumable_fields, runtime_fields
from moe.errors import ConfigError, InputError
from moe.model import Transformer


def tiny(**overrides) -> ModelConfig:
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=16)
    return ModelConfig(**{**base, **overrides})


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
        (dict(n_experts=4, top_k=5), "top_k"),
        (dict(n_experts=4, top_k=0), "top_k"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(sliding_window=-3), "sliding_window"),
        (dict(layer_windows=[4]), "layer_windows"),
        (dict(layer_windows=[4, 0]), "layer_windows[1]"),
        (dict(norm_type="batchnorm"), "norm_type"),
        (dict(norm_position="post"), "norm_position"),
        (dict(attention_backend="xformers"), "attention_backend"),
        (dict(n_experts=4, expert_backend="triton"), "expert_backend"),
        (dict(n_experts=4, expert_ffn_dim=20, expert_backend="grouped"), "expert_ffn_dim"),  # grouped matmul alignment
        (dict(vocab_size=0), "vocab_size"),
        (dict(d_model=30), "d_model"),  # not divisible by n_heads
        (dict(n_experts=4, capacity_factor=0.0), "capacity_factor"),
        (dict(aux_loss_coef=-1.0), "aux_loss_coef"),
        (dict(n_experts=-1), "n_experts"),
    ],
)
def test_inconsistent_config_names_the_field(overrides, field):
    with pytest.raises(ConfigError, match="ModelConfig." + field.replace("[", r"\[").replace("]", r"\]")) as error:
        tiny(**overrides)
    assert error.value.field == ("n_heads" if field == "d_model" else field.partition("[")[0])


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(head_dim=7), "head_dim"),  # RoPE rotates pairs of channels
        (dict(d_model=28), "head_dim"),  # derived: 28 // 4 = 7
        (dict(rope_theta=0.0), "rope_theta"),
        (dict(rope_theta=float("nan")), "rope_theta"),
        (dict(rope_theta=float("inf")), "rope_theta"),  # every frequency 0: no position information at all
        (dict(norm_eps=-1.0), "norm_eps"),
        (dict(norm_eps=float("nan")), "norm_eps"),
        (dict(init_std=-0.02), "init_std"),
        (dict(init_std=float("nan")), "init_std"),
        (dict(n_experts=4, capacity_factor=float("nan")), "capacity_factor"),
        (dict(z_loss_coef=float("nan")), "z_loss_coef"),
        (dict(n_experts=4, router_bias_update_rate=-0.001), "router_bias_update_rate"),  # would unbalance
        (dict(n_experts=4, router_bias_update_rate=float("nan")), "router_bias_update_rate"),
        (dict(router_bias_update_rate=0.001), "router_bias_update_rate"),  # a dense model has no experts to balance
    ],
)
def test_values_the_model_cannot_run_with_are_refused_naming_the_field(overrides, field):
    """Each of these built a model that crashed in its first forward pass (or initialisation), or trained to NaN."""
    with pytest.raises(ConfigError, match=f"ModelConfig.{field}=") as error:
        tiny(**overrides)
    assert error.value.field == field and isinstance(error.value, InputError)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(head_dim=7), "ModelConfig.head_dim=7 must be even: rotary position embeddings rotate pairs of channels"),
        (dict(d_model=28), "ModelConfig.head_dim=7 (ModelConfig.d_model=28 // ModelConfig.n_heads=4) must be even"),
        (dict(d_model=30), "ModelConfig.d_model=30 is not divisible by ModelConfig.n_heads=4; set ModelConfig.head_dim"),
        (dict(n_kv_heads=3), "ModelConfig.n_heads=4 must be divisible by ModelConfig.n_kv_heads=3"),
        (dict(vocab_size=0), "ModelConfig.vocab_size=0 must be positive"),
        (dict(rope_theta=0.0), "ModelConfig.rope_theta=0.0 must be a positive finite number"),
        (dict(norm_eps=-1.0), "ModelConfig.norm_eps=-1.0 must be a finite number >= 0"),
    ],
)
def test_messages_name_fields_as_model_config_attributes(overrides, message):
    """`ModelConfig.<field>` reads right from Python; the command line turns it into --model.config.<field>."""
    with pytest.raises(ConfigError) as error:
        tiny(**overrides)
    assert str(error.value).startswith(message)


def test_runtime_and_resumable_fields():
    """The field metadata replaces the lists moe/train kept by hand (module.RUNTIME_FIELDS, resume.RESUMABLE_CHANGES)."""
    assert set(runtime_fields()) == {"attention_backend", "expert_backend", "aux_loss_coef", "z_loss_coef",
                                     "capacity_factor", "router_bias_update_rate"}
    assert set(resumable_fields()) == {"attention_backend", "expert_backend"}
    assert set(resumable_fields()) <= set(runtime_fields())  # what may change on resume may differ from init_from

def test_derived_fields():
    config = tiny()
    assert config.head_dim == 8 and config.n_kv_heads == 2
    assert tiny(n_kv_heads=None).n_kv_heads == 4
    moe = tiny(n_experts=4)
    assert moe.expert_ffn_dim == moe.ffn_dim
    wider = config.replace(d_model=64)
    assert wider.head_dim == 16  # recomputed, not carried over
    assert config.replace(n_layers=3).head_dim == 8


def test_replace_keeps_explicitly_set_derived_fields():
    gqa = tiny(n_heads=4, n_kv_heads=2)
    assert gqa.replace(n_heads=8, d_model=64).n_kv_heads == 2
    assert tiny(n_kv_heads=4).replace(n_heads=8, d_model=64).n_kv_heads == 8  # MHA stays MHA
    explicit_head = tiny(head_dim=16)
    assert explicit_head.replace(d_model=64).head_dim == 16
    moe = tiny(n_experts=4, expert_ffn_dim=16)
    assert moe.replace(n_experts=8).expert_ffn_dim == 16
    assert moe.replace(ffn_dim=96).expert_ffn_dim == 16
    assert tiny(n_experts=4).replace(ffn_dim=96).expert_ffn_dim == 96
    assert tiny().replace(n_experts=4).expert_ffn_dim == 48


def test_layer_windows_override_the_global_window():
    config = tiny(sliding_window=8, layer_windows=[None, 4])
    assert [config.window_for_layer(i) for i in range(2)] == [None, 4]
    assert tiny(sliding_window=8).window_for_layer(1) == 8


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(tie_embeddings=True),
        dict(attn_bias=True),
        dict(norm_type="layernorm"),
        dict(norm_type="layernorm_nonparam"),
        dict(norm_position="output", qk_norm="full"),
        dict(norm_position="output", norm_type="layernorm", n_experts=4, top_k=2, expert_ffn_dim=16),
        dict(n_kv_heads=1, head_dim=16),
        dict(n_experts=4, top_k=2, expert_ffn_dim=16),
        dict(n_experts=4, top_k=1, n_shared_experts=2, expert_ffn_dim=16),
        dict(n_experts=4, top_k=1, n_shared_experts=2, shared_expert_gate=True, expert_ffn_dim=16),
    ],
)
def test_analytic_count_equals_built_model(overrides):
    config = tiny(**overrides)
    with torch.device("meta"):
        model = Transformer(config)
    assert config.num_params() == sum(p.numel() for p in model.parameters())


def test_active_count_of_a_moe_model_by_brute_force():
    config = tiny(n_experts=4, top_k=2, expert_ffn_dim=16)
    with torch.device("meta"):
        model = Transformer(config)
    inactive = sum(
        p[config.top_k :].numel() for name, p in model.named_parameters() if ".experts." in name
    )
    assert config.num_active_params() == config.num_params() - inactive


def test_flops_per_token_follows_palm_appendix_b():
    config = tiny(tie_embeddings=True)
    non_embedding = config.num_params() - config.vocab_size * config.d_model
    output_layer = config.vocab_size * config.d_model
    attention = 12 * config.n_layers * config.n_heads * config.head_dim * 16
    assert config.flops_per_token(16) == 6 * (non_embedding + output_layer) + attention


def test_format_count():
    assert format_count(6_738_415_616) == "6.74B"
    assert format_count(134_515_008) == "135M"
    assert format_count(46_702_792_704) == "46.7B"
