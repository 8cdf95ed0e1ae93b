"""Presets against published parameter counts and against HF transformers' own architectures.

Two independent oracles: the figure the paper or model card states, and the parameter count of HF's model
class built on the meta device from the released config.json values (written out here, not derived from our
presets).
"""

import pytest
import torch
import transformers

from moe.model import build_model
from moe.presets import PRESETS, PUBLISHED_PARAMS, get_preset, preset_names

# Values from each release's config.json (LLaMA-1: HF conversions of the original params.json).
_LLAMA1 = dict(vocab_size=32000, tie_word_embeddings=False)
HF_CONFIGS = {
    "llama-7b": ("LlamaConfig", dict(_LLAMA1, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                     num_attention_heads=32)),
    "llama-13b": ("LlamaConfig", dict(_LLAMA1, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                      num_attention_heads=40)),
    "llama-33b": ("LlamaConfig", dict(_LLAMA1, hidden_size=6656, intermediate_size=17920, num_hidden_layers=60,
                                      num_attention_heads=52)),
    "llama-65b": ("LlamaConfig", dict(_LLAMA1, hidden_size=8192, intermediate_size=22016, num_hidden_layers=80,
                                      num_attention_heads=64)),
    "llama-2-7b": ("LlamaConfig", dict(_LLAMA1, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                       num_attention_heads=32, num_key_value_heads=32)),
    "mistral-7b": ("MistralConfig", dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                         sliding_window=4096, tie_word_embeddings=False)),
    "mixtral-8x7b": ("MixtralConfig", dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                           num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                           num_local_experts=8, num_experts_per_tok=2,
                                           tie_word_embeddings=False)),
    "qwen2-0.5b": ("Qwen2Config", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                       num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                       tie_word_embeddings=True)),
    "olmo-1b": ("OlmoConfig", dict(vocab_size=50304, hidden_size=2048, intermediate_size=8192,
                                   num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
                                   tie_word_embeddings=True)),
    "smollm-135m": ("LlamaConfig", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                        tie_word_embeddings=True)),
    "smollm-360m": ("LlamaConfig", dict(vocab_size=49152, hidden_size=960, intermediate_size=2560,
                                        num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5,
                                        tie_word_embeddings=True)),
    "smollm-1.7b": ("LlamaConfig", dict(vocab_size=49152, hidden_size=2048, intermediate_size=8192,
                                        num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32,
                                        tie_word_embeddings=True)),
    "llama-3.1-8b": ("LlamaConfig", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                         tie_word_embeddings=False, rope_parameters={
                                             "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 8192})),
    "olmoe-1b-7b": ("OlmoeConfig", dict(vocab_size=50304, hidden_size=2048, intermediate_size=1024,
                                        num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
                                        num_experts=64, num_experts_per_tok=8, norm_topk_prob=False,
                                        tie_word_embeddings=False)),
    "qwen1.5-moe-a2.7b": ("Qwen2MoeConfig", dict(vocab_size=151936, hidden_size=2048, intermediate_size=5632,
                                                 moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
                                                 num_experts=60, num_experts_per_tok=4, num_hidden_layers=24,
                                                 num_attention_heads=16, num_key_value_heads=16,
                                                 tie_word_embeddings=False)),
    "qwen3-0.6b": ("Qwen3Config", dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                                       head_dim=128, tie_word_embeddings=True)),
    "qwen3-30b-a3b": ("Qwen3MoeConfig", dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                                             moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                                             num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                                             head_dim=128, norm_topk_prob=True, tie_word_embeddings=False)),
    # OLMo 2 1B/7B/13B/32B and OLMo 3 7B/32B (sliding_window 4096 on three layers of four in Olmo3Config's
    # default layer_types).
    **{name: (cls, dict(vocab_size=v, hidden_size=d, intermediate_size=f, num_hidden_layers=n,
                        num_attention_heads=h, num_key_value_heads=kv, tie_word_embeddings=False))
       for name, cls, v, d, f, n, h, kv in (
           ("olmo-2-1b", "Olmo2Config", 100352, 2048, 8192, 16, 16, 16),
           ("olmo-2-7b", "Olmo2Config", 100352, 4096, 11008, 32, 32, 32),
           ("olmo-2-13b", "Olmo2Config", 100352, 5120, 13824, 40, 40, 40),
           ("olmo-2-32b", "Olmo2Config", 100352, 5120, 27648, 64, 40, 8),
           ("olmo-3-7b", "Olmo3Config", 100278, 4096, 11008, 32, 32, 32),
           ("olmo-3-32b", "Olmo3Config", 100278, 5120, 27648, 64, 40, 8))},
}


def published_range(figure: str) -> tuple[float, float]:
    """The counts a published figure can stand for, rounded or truncated: '6.7B' -> [6.6e9, 6.8e9]."""
    scale = {"M": 1e6, "B": 1e9}[figure[-1]]
    number = figure[:-1]
    decimals = len(number.split(".")[1]) if "." in number else 0
    unit = scale * 10.0**-decimals
    return float(number) * scale - unit, float(number) * scale + unit


def test_published_range():
    assert published_range("6.7B") == pytest.approx((6.6e9, 6.8e9))
    assert published_range("13.0B") == pytest.approx((12.9e9, 13.1e9))
    assert published_range("135M") == pytest.approx((134e6, 136e6))


def test_every_published_architecture_is_checked():
    assert set(PUBLISHED_PARAMS) == set(HF_CONFIGS)
    assert set(PUBLISHED_PARAMS) <= set(PRESETS)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_parameter_count_matches_published_figure(name):
    model = build_model(name, device="meta")
    total = model.num_params()
    assert total == model.config.num_params()  # the analytic count agrees with the built model
    published_total, published_active = PUBLISHED_PARAMS[name]
    low, high = published_range(published_total)
    assert low < total < high, (total, published_total)
    if published_active is not None:
        low, high = published_range(published_active)
        assert low < model.config.num_active_params() < high


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_parameter_count_matches_hf_transformers(name):
    class_name, kwargs = HF_CONFIGS[name]
    hf_config = getattr(transformers, class_name)(**kwargs)
    with torch.device("meta"):
        hf_model = transformers.AutoModelForCausalLM.from_config(hf_config)
    hf_total = sum(p.numel() for p in hf_model.parameters())  # parameters() counts tied weights once
    assert get_preset(name).num_params() == hf_total


def test_qwen3_non_embedding_parameters_are_the_published_044b():
    config = get_preset("qwen3-0.6b")
    assert 0.435e9 < config.num_params() - config.embedding_params() < 0.445e9


def test_mixtral_active_parameters_exclude_unchosen_experts():
    config = get_preset("mixtral-8x7b")
    unchosen = (config.n_experts - config.top_k) * config.expert_params() * config.n_layers
    assert config.num_params() - config.num_active_params() == unchosen


def test_mistral_window():
    assert get_preset("mistral-7b").sliding_window == 4096


def test_olmo3_windows_three_layers_of_four_as_olmo3_config_does():
    for name in ("olmo-3-7b", "olmo-3-32b"):
        config = get_preset(name)
        hf = transformers.Olmo3Config(num_hidden_layers=config.n_layers)  # its default layer_types
        expected = [hf.sliding_window if t == "sliding_attention" else None for t in hf.layer_types]
        assert config.layer_windows == expected and expected.count(None) == config.n_layers // 4


@pytest.mark.parametrize("name", ["tiny-dense", "tiny-moe", "tiny-olmoe", "tiny-olmo3", "tiny-qwen2-moe",
                                  "tiny-qwen3-moe"])
def test_tiny_presets_run(name):
    model = build_model(name)
    out = model(torch.randint(0, model.config.vocab_size, (1, 8)))
    assert out.logits.shape == (1, 8, model.config.vocab_size)
    assert model.config.is_moe == (name not in ("tiny-dense", "tiny-olmo3"))


@pytest.mark.parametrize("tiny, family", [("tiny-olmoe", "olmoe-1b-7b"), ("tiny-qwen2-moe", "qwen1.5-moe-a2.7b"),
                                          ("tiny-qwen3-moe", "qwen3-30b-a3b"), ("tiny-olmo3", "olmo-3-7b")])
def test_tiny_variants_export_as_their_family(tiny, family):
    from moe.hf_config import hf_model_type_for

    assert hf_model_type_for(get_preset(tiny)) == hf_model_type_for(get_preset(family))
    for field in ("qk_norm", "norm_topk_prob", "shared_expert_gate", "attn_bias", "norm_position"):
        assert getattr(get_preset(tiny), field) == getattr(get_preset(family), field), field


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError) as err:
        get_preset("llama-8b")
    for name in preset_names():
        assert name in str(err.value)
