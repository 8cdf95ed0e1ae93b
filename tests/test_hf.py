"""moe.hf / moe.hf_config: HF checkpoints load into our Transformer with HF's logits, ours export to checkpoints
that transformers loads with our logits, and bad input fails with a message naming the problem.
Oracle: HF transformers on tiny seeded random models (fp32, CPU)."""

import json

import pytest
import torch
import transformers  # a dev dependency: its absence must fail the suite, not skip it
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Olmo2Config,
    Olmo3Config,
    OlmoeConfig,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from moe.config import ModelConfig
from moe.hf import config_from_hf, hf_key_map, hf_placeholders, load_hf_checkpoint, save_hf_checkpoint
from moe.model import Transformer

from .tiny_models import randomize

SEQ = 12  # longer than every window below, so the windows bind
HF_DIMS = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64)
HF_FAMILIES = {
    "llama": lambda: LlamaConfig(**HF_DIMS, head_dim=16, rms_norm_eps=1e-5,
                                 rope_parameters={"rope_type": "default", "rope_theta": 5000.0}),
    "mistral": lambda: MistralConfig(**HF_DIMS, sliding_window=5),
    "mixtral": lambda: MixtralConfig(**{**HF_DIMS, "intermediate_size": 48}, num_local_experts=4,
                                     num_experts_per_tok=2),
    "qwen2": lambda: Qwen2Config(**HF_DIMS, tie_word_embeddings=True, use_sliding_window=True, sliding_window=5,
                                 max_window_layers=1),
    # A dense first layer, then MoE layers with a gated shared expert of twice the expert width.
    "qwen2_moe": lambda: Qwen2MoeConfig(**HF_DIMS, moe_intermediate_size=16, shared_expert_intermediate_size=32,
                                        num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0]),
    # MoE on every 2nd layer (1 and 3), no shared expert (width 0), no q/k/v bias, renormalised top-k.
    "qwen2_moe-step": lambda: Qwen2MoeConfig(**{**HF_DIMS, "num_hidden_layers": 4}, moe_intermediate_size=16,
                                             shared_expert_intermediate_size=0, num_experts=4, num_experts_per_tok=2,
                                             decoder_sparse_step=2, qkv_bias=False, norm_topk_prob=True),
    # Llama 3.1's scaled RoPE: with head_dim 16 and an original context of 64 tokens, the 8 frequencies fall in all
    # three bands (kept, interpolated, divided by the factor).
    "llama3": lambda: LlamaConfig(**HF_DIMS, head_dim=16, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    # Qwen3 dense: per-head QK-norm, head_dim 12, a window on the layers from max_window_layers on, tied.
    "qwen3": lambda: Qwen3Config(**HF_DIMS, head_dim=12, use_sliding_window=True, sliding_window=5, max_window_layers=1,
                                 tie_word_embeddings=True),
    # OLMoE: QK-norm over all heads' channels, top-k probabilities not renormalised, every layer MoE.
    "olmoe": lambda: OlmoeConfig(**{**HF_DIMS, "intermediate_size": 24}, num_experts=4, num_experts_per_tok=2),
    "olmoe-renorm": lambda: OlmoeConfig(**{**HF_DIMS, "intermediate_size": 24, "num_key_value_heads": 4},
                                        num_experts=6, num_experts_per_tok=3, norm_topk_prob=True,
                                        tie_word_embeddings=True),
    # Qwen3-MoE: per-head QK-norm, head_dim 12 (not hidden_size / heads), a dense first layer.
    "qwen3_moe": lambda: Qwen3MoeConfig(**HF_DIMS, head_dim=12, moe_intermediate_size=16, num_experts=4,
                                        num_experts_per_tok=2, mlp_only_layers=[0], norm_topk_prob=True),
    "qwen3_moe-step": lambda: Qwen3MoeConfig(**{**HF_DIMS, "num_hidden_layers": 4}, moe_intermediate_size=16,
                                             num_experts=4, num_experts_per_tok=2, decoder_sparse_step=2,
                                             tie_word_embeddings=True),
    # OLMo 2: norms on the attention's and the MLP's outputs, QK-norm over all heads.
    "olmo2": lambda: Olmo2Config(**HF_DIMS, rope_parameters={"rope_type": "default", "rope_theta": 5000.0}),
    # OLMo 3: OLMo 2 with a window on the layers layer_types names, here head_dim 12 and tied.
    "olmo3": lambda: Olmo3Config(**{**HF_DIMS, "num_hidden_layers": 4}, sliding_window=5, head_dim=12,
                                 tie_word_embeddings=True,
                                 layer_types=["sliding_attention", "full_attention"] * 2),
}
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
OUR_DIMS = dict(vocab_size=96, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
OUR_CONFIGS = {  # name: (overrides, HF architecture expected, max_shard_size)
    "dense": (dict(head_dim=16, rope_theta=5000.0), "LlamaForCausalLM", "5GB"),
    "windowed": (dict(sliding_window=5), "MistralForCausalLM", "5GB"),
    "qwen2-windows": (dict(attn_bias=True, tie_embeddings=True, head_dim=16, layer_windows=[None, 4, 4]),
                      "Qwen2ForCausalLM", "5GB"),
    "moe": (dict(n_experts=4, top_k=2, expert_ffn_dim=48, sliding_window=6), "MixtralForCausalLM", "20KB"),
    # MoE on some layers only: Qwen2-MoE, whose shared expert a model without one exports with width 0.
    "moe-dense-first": (dict(n_experts=4, top_k=2, expert_ffn_dim=48, first_k_dense=1), "Qwen2MoeForCausalLM",
                        "20KB"),
    "moe-every-2nd-shared": (dict(n_experts=4, top_k=2, expert_ffn_dim=16, moe_every=2, n_shared_experts=2,
                                  shared_expert_gate=True, attn_bias=True, norm_topk_prob=False, tie_embeddings=True),
                             "Qwen2MoeForCausalLM", "5GB"),
    "moe-dense-list": (dict(n_experts=4, top_k=1, expert_ffn_dim=48, dense_layers=[1]), "Qwen2MoeForCausalLM", "5GB"),
    "llama3-rope": (dict(head_dim=16, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE), "LlamaForCausalLM", "5GB"),
    "qwen3": (dict(qk_norm="head", head_dim=12, layer_windows=[None, 4, 4]), "Qwen3ForCausalLM", "5GB"),
    "olmoe": (dict(n_experts=4, top_k=2, expert_ffn_dim=24, qk_norm="full", norm_topk_prob=False),
              "OlmoeForCausalLM", "20KB"),
    "qwen3-moe": (dict(n_experts=4, top_k=2, expert_ffn_dim=16, qk_norm="head", head_dim=12, dense_layers=[1],
                       tie_embeddings=True, rope_scaling=LLAMA3_ROPE), "Qwen3MoeForCausalLM", "20KB"),
    "olmo2": (dict(qk_norm="full", norm_position="output", head_dim=16, rope_theta=12345.0), "Olmo2ForCausalLM",
              "5GB"),
    "olmo3": (dict(qk_norm="full", norm_position="output", head_dim=12, layer_windows=[4, None, 4],
                   tie_embeddings=True), "Olmo3ForCausalLM", "20KB"),
}


def input_ids(vocab_size: int = 96) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """family -> directory of a saved random HF model of that family (built once per module)."""
    paths = {}

    def get(family: str):
        if family not in paths:
            paths[family] = tmp_path_factory.mktemp(family)
            model = transformers.AutoModelForCausalLM.from_config(HF_FAMILIES[family]())
            randomize(model).save_pretrained(paths[family])
        return paths[family]

    return get


def hf_load(path, attn="eager"):
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def our_checkpoint(tmp_path_factory):
    """A small Llama checkpoint written by save_hf_checkpoint, for the bad-input tests to corrupt."""
    path = tmp_path_factory.mktemp("ours")
    save_hf_checkpoint(randomize(Transformer(ModelConfig(**OUR_DIMS))), path)
    return path


# ---------------------------------------------------------------------------------------------------- import
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", HF_FAMILIES)
@torch.no_grad()
def test_import_matches_hf_logits(hf_checkpoint, family, attn):
    path = hf_checkpoint(family)
    ours = load_hf_checkpoint(path, attention_backend=attn)
    ids = input_ids()
    torch.testing.assert_close(ours(ids).logits, hf_load(path, attn)(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe", "olmoe-renorm", "qwen3_moe", "qwen3_moe-step"])
@torch.no_grad()
def test_import_matches_hf_logits_with_grouped_experts(hf_checkpoint, family):
    """The grouped-matmul experts (the GPU default) compute HF's function as the expert loop does."""
    path = hf_checkpoint(family)
    ours = load_hf_checkpoint(path, expert_backend="grouped")
    ids = input_ids()
    torch.testing.assert_close(ours(ids).logits, hf_load(path)(ids).logits, rtol=0, atol=1e-5)


def test_imported_config_follows_hf(hf_checkpoint):
    qwen2 = load_hf_checkpoint(hf_checkpoint("qwen2")).config
    assert qwen2.tie_embeddings and qwen2.attn_bias and qwen2.layer_windows == [None, 5, 5]
    assert load_hf_checkpoint(hf_checkpoint("llama")).config.head_dim == 16
    mixtral = load_hf_checkpoint(hf_checkpoint("mixtral")).config
    assert (mixtral.n_experts, mixtral.top_k, mixtral.expert_ffn_dim, mixtral.rope_theta) == (4, 2, 48, 1e6)
    qwen2_moe = load_hf_checkpoint(hf_checkpoint("qwen2_moe")).config
    assert (qwen2_moe.dense_layers, qwen2_moe.moe_every, qwen2_moe.moe_layer_indices()) == ([0], 1, (1, 2))
    assert (qwen2_moe.ffn_dim, qwen2_moe.expert_ffn_dim, qwen2_moe.n_shared_experts) == (64, 16, 2)
    assert qwen2_moe.shared_expert_gate and qwen2_moe.attn_bias and not qwen2_moe.norm_topk_prob
    step = load_hf_checkpoint(hf_checkpoint("qwen2_moe-step")).config
    assert (step.moe_every, step.dense_layers, step.moe_layer_indices()) == (2, [], (1, 3))
    assert step.n_shared_experts == 0 and not step.shared_expert_gate and not step.attn_bias and step.norm_topk_prob


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen2_moe-step", "olmoe", "qwen3_moe", "qwen3_moe-step"])
@torch.no_grad()
def test_router_logits_match_hf_per_moe_layer(hf_checkpoint, family):
    """ModelOutput.moe has one entry per MoE layer, in layer order, as HF's router_logits."""
    path = hf_checkpoint(family)
    ids = input_ids()
    ours = load_hf_checkpoint(path)
    out, theirs = ours(ids), hf_load(path)(ids, output_router_logits=True)
    assert len(out.moe) == len(theirs.router_logits) == len(ours.config.moe_layer_indices())
    for stats, hf_logits in zip(out.moe, theirs.router_logits):
        torch.testing.assert_close(stats.router_logits, hf_logits, rtol=0, atol=1e-5)


@torch.no_grad()
def test_mixtral_load_balancing_loss_matches_hf(hf_checkpoint):
    """Per layer, our load_balancing_loss is HF's load_balancing_loss_func of that layer's router logits alone.
    HF's model-level aux_loss pools all layers' logits before multiplying fractions by probabilities, while
    our ModelOutput.aux_loss averages per-layer losses; so HF's figure is reproduced by applying
    load_balancing_loss_func to the tuple of our router logits, not by our aux_loss."""
    path = hf_checkpoint("mixtral")
    hf_config = json.loads((path / "config.json").read_text())
    n_experts, top_k = hf_config["num_local_experts"], hf_config["num_experts_per_tok"]
    ids = input_ids()
    ours = load_hf_checkpoint(path)(ids)
    theirs = hf_load(path)(ids, output_router_logits=True)
    assert len(ours.moe) == len(theirs.router_logits) == hf_config["num_hidden_layers"]
    for stats, hf_logits in zip(ours.moe, theirs.router_logits):
        torch.testing.assert_close(stats.router_logits, hf_logits, rtol=0, atol=1e-5)
        expected = load_balancing_loss_func((hf_logits,), n_experts, top_k)
        torch.testing.assert_close(stats.load_balancing_loss, expected, rtol=0, atol=1e-6)
    pooled = load_balancing_loss_func(ours.router_logits, n_experts, top_k)
    torch.testing.assert_close(theirs.aux_loss, pooled, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["olmoe", "olmoe-renorm", "qwen3_moe", "qwen3_moe-step"])
@torch.no_grad()
def test_hf_aux_loss_is_its_load_balancing_loss_of_our_router_logits(hf_checkpoint, family):
    """As for Mixtral: HF's model-level aux_loss is its family's load_balancing_loss_func over the MoE layers'
    router logits pooled, which ours reproduce exactly (per layer, ours is the same function of one layer's)."""
    import importlib

    path = hf_checkpoint(family)
    hf_config = json.loads((path / "config.json").read_text())
    module = importlib.import_module(f"transformers.models.{hf_config['model_type']}.modeling_{hf_config['model_type']}")
    # transformers 5 saves Qwen3-MoE's num_experts under its alias num_local_experts
    n_experts = hf_config.get("num_experts", hf_config.get("num_local_experts"))
    top_k = hf_config["num_experts_per_tok"]
    ids = input_ids()
    ours = load_hf_checkpoint(path)(ids)
    theirs = hf_load(path)(ids, output_router_logits=True)
    torch.testing.assert_close(theirs.aux_loss, module.load_balancing_loss_func(ours.router_logits, n_experts, top_k),
                               rtol=0, atol=1e-6)
    for stats in ours.moe:
        torch.testing.assert_close(stats.load_balancing_loss,
                                   module.load_balancing_loss_func((stats.router_logits,), n_experts, top_k),
                                   rtol=0, atol=1e-6)


def test_llama3_rope_without_its_original_length_takes_max_position_embeddings_as_transformers_does():
    hf = {**HF_DIMS, "model_type": "llama", "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}}
    assert config_from_hf(hf).rope_scaling["original_max_position_embeddings"] == 64
    assert LlamaConfig(**{k: v for k, v in hf.items() if k != "model_type"}).rope_parameters[
        "original_max_position_embeddings"] == 64


def test_qk_norm_and_rope_scaling_are_read_from_hf(hf_checkpoint):
    olmoe = load_hf_checkpoint(hf_checkpoint("olmoe")).config
    assert (olmoe.qk_norm, olmoe.n_experts, olmoe.top_k, olmoe.expert_ffn_dim, olmoe.norm_topk_prob) == \
        ("full", 4, 2, 24, False)
    qwen3 = load_hf_checkpoint(hf_checkpoint("qwen3_moe")).config
    assert (qwen3.qk_norm, qwen3.head_dim, qwen3.dense_layers, qwen3.expert_ffn_dim, qwen3.n_shared_experts) == \
        ("head", 12, [0], 16, 0)
    step = load_hf_checkpoint(hf_checkpoint("qwen3_moe-step")).config
    assert step.moe_layer_indices() == (1, 3) and step.tie_embeddings and not step.norm_topk_prob
    qwen3_dense = load_hf_checkpoint(hf_checkpoint("qwen3")).config
    assert (qwen3_dense.qk_norm, qwen3_dense.head_dim, qwen3_dense.layer_windows, qwen3_dense.is_moe) == \
        ("head", 12, [None, 5, 5], False)
    olmo2 = load_hf_checkpoint(hf_checkpoint("olmo2")).config
    assert (olmo2.qk_norm, olmo2.norm_position, olmo2.layer_windows, olmo2.rope_theta) == ("full", "output", None, 5000)
    flat_beside_per_type = config_from_hf({**HF_DIMS, "model_type": "olmo3", "rope_parameters": {
        "rope_type": "default", "rope_theta": 1e4, "sliding_attention": {"rope_type": "default", "rope_theta": 5e5},
        "full_attention": {"rope_type": "default", "rope_theta": 5e5}}})
    assert flat_beside_per_type.rope_theta == 5e5
    # Without layer_types: Olmo3Config's three windowed layers, then a full one.
    assert config_from_hf({**HF_DIMS, "model_type": "olmo3", "num_hidden_layers": 8}).layer_windows == \
        [4096, 4096, 4096, None] * 2
    olmo3 = load_hf_checkpoint(hf_checkpoint("olmo3")).config
    assert (olmo3.qk_norm, olmo3.norm_position, olmo3.layer_windows, olmo3.head_dim, olmo3.rope_theta) == \
        ("full", "output", [5, None, 5, None], 12, 500000.0)
    llama3 = load_hf_checkpoint(hf_checkpoint("llama3")).config
    assert llama3.rope_scaling == LLAMA3_ROPE and llama3.rope_theta == 500000.0 and llama3.qk_norm is None


def test_sharded_hf_checkpoint_loads(hf_checkpoint, tmp_path):
    single = hf_checkpoint("llama")
    hf_load(single).save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 1
    expected, sharded = load_hf_checkpoint(single).state_dict(), load_hf_checkpoint(tmp_path).state_dict()
    assert expected.keys() == sharded.keys() and all(torch.equal(expected[k], sharded[k]) for k in expected)


def test_tied_checkpoint_may_contain_lm_head(hf_checkpoint, tmp_path):
    source = hf_checkpoint("qwen2")
    weights = load_file(source / "model.safetensors")
    assert "lm_head.weight" not in weights
    save_file({**weights, "lm_head.weight": weights["model.embed_tokens.weight"].clone()},
              tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((source / "config.json").read_text())
    expected, loaded = load_hf_checkpoint(source).state_dict(), load_hf_checkpoint(tmp_path).state_dict()
    assert all(torch.equal(expected[k], loaded[k]) for k in expected)


# ---------------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("name", OUR_CONFIGS)
@torch.no_grad()
def test_export_round_trip(name, tmp_path):
    overrides, architecture, max_shard_size = OUR_CONFIGS[name]
    ours = randomize(Transformer(ModelConfig(**OUR_DIMS, **overrides)))
    save_hf_checkpoint(ours, tmp_path, max_shard_size=max_shard_size)
    hf_config = json.loads((tmp_path / "config.json").read_text())
    assert hf_config["architectures"] == [architecture]
    if "max_window_layers" in hf_config:
        hf_config.pop("layer_types", None)  # transformers v4 reads Qwen2's max_window_layers instead
    v4_config = config_from_hf(hf_config)
    assert [v4_config.window_for_layer(i) for i in range(3)] == [ours.config.window_for_layer(i) for i in range(3)]
    assert v4_config.moe_layer_indices() == ours.config.moe_layer_indices()
    assert (tmp_path / "model.safetensors.index.json").is_file() == (max_shard_size != "5GB")

    theirs, info = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager",
                                                        output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights on HF's side
    hf_moe_layers = [i for i, layer in enumerate(theirs.model.layers) if hasattr(layer.mlp, "experts")]
    assert hf_moe_layers == list(ours.config.moe_layer_indices())
    ids = input_ids()
    torch.testing.assert_close(theirs.eval()(ids).logits, ours(ids).logits, rtol=0, atol=1e-5)

    expected, loaded = ours.state_dict(), load_hf_checkpoint(tmp_path).state_dict()
    assert expected.keys() == loaded.keys()
    assert all(torch.equal(expected[k], loaded[k]) for k in expected)


def test_export_dtype(tmp_path):
    save_hf_checkpoint(Transformer(ModelConfig(**OUR_DIMS)), tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_hf_checkpoint(tmp_path).embed_tokens.weight.dtype == torch.bfloat16
    assert load_hf_checkpoint(tmp_path, dtype=torch.float32).embed_tokens.weight.dtype == torch.float32


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(norm_type="layernorm"), "norm_type"),
        (dict(n_experts=4, n_shared_experts=1), "shared experts"),
        (dict(n_experts=4, n_shared_experts=1, shared_expert_gate=False), "ModelConfig.shared_expert_gate=True"),
        # Beyond Mixtral, and Qwen2-MoE's sliding windows are not supported.
        (dict(n_experts=4, norm_topk_prob=False, sliding_window=4), "norm_topk_prob=False .* windows"),
        (dict(n_experts=4, attn_bias=True, sliding_window=4), "attn_bias=True .* windows"),
        (dict(n_experts=4, first_k_dense=1, layer_windows=[None, 4, 4]),
         r"MoE on layers \[1, 2\] only \(ModelConfig.first_k_dense=1\) .* windows"),
        (dict(n_experts=4, layer_windows=[4, None, 4]), "per-layer windows"),
        (dict(layer_windows=[4, None, 4]), "per-layer windows"),
        (dict(attn_bias=True, layer_windows=[4, None, 4]), "not Qwen2-expressible"),
        (dict(attn_bias=True, layer_windows=[None, 4, 6]), "not Qwen2-expressible"),
        # QK-norm: OLMoE ('full') and Qwen3-MoE ('head') only, each with what it can hold.
        (dict(qk_norm="full"), r"qk_norm='full' without experts .*norm_position='output'"),
        # Norms on the sublayers' outputs: OLMo 2 and 3, dense with QK-norm over all heads, one window size.
        (dict(norm_position="output"), r"OLMo 2 or OLMo 3, which cannot represent ModelConfig.qk_norm=None"),
        (dict(norm_position="output", qk_norm="head"), r"ModelConfig.qk_norm='head'"),
        (dict(norm_position="output", qk_norm="full", n_experts=4), r"ModelConfig.n_experts=4 \(both are dense\)"),
        (dict(norm_position="output", qk_norm="full", attn_bias=True), "ModelConfig.attn_bias=True"),
        (dict(norm_position="output", qk_norm="full", layer_windows=[4, None, 6]), r"different sizes \[4, 6\]"),
        (dict(norm_position="output", qk_norm="full", rope_scaling=LLAMA3_ROPE), "ModelConfig.rope_scaling"),
        (dict(qk_norm="head", attn_bias=True), r"exports as Qwen3, which cannot represent ModelConfig.attn_bias"),
        (dict(qk_norm="head", layer_windows=[4, None, 4]), "not Qwen2-expressible"),
        (dict(n_experts=4, qk_norm="full", first_k_dense=1), r"exports as OLMoE, which cannot represent MoE on layers"),
        (dict(n_experts=4, qk_norm="head", attn_bias=True), r"Qwen3-MoE, which cannot represent ModelConfig.attn_bias"),
        (dict(n_experts=4, qk_norm="head", n_shared_experts=1, shared_expert_gate=True), "n_shared_experts=1"),
        (dict(n_experts=4, qk_norm="full", sliding_window=4), r"OLMoE, which cannot represent windows"),
        (dict(n_experts=4, qk_norm="full", head_dim=16), r"OLMoE, which cannot represent ModelConfig.head_dim=16"),
    ],
)
def test_export_refuses_what_hf_cannot_represent(overrides, message, tmp_path):
    model = Transformer(ModelConfig(**OUR_DIMS, **overrides))
    with pytest.raises(ValueError, match=message):
        save_hf_checkpoint(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_drops_capacity_factor_with_a_warning(tmp_path):
    model = Transformer(ModelConfig(**OUR_DIMS, n_experts=4, expert_ffn_dim=48, capacity_factor=1.25))
    with pytest.warns(UserWarning, match="capacity_factor"):
        save_hf_checkpoint(model, tmp_path)
    assert load_hf_checkpoint(tmp_path).config.capacity_factor is None


def test_key_map_covers_every_parameter_once():
    for overrides, _, _ in OUR_CONFIGS.values():
        config = ModelConfig(**OUR_DIMS, **overrides)
        entries = hf_key_map(config)
        hf_keys = [key for entry in entries for key in entry.hf] + list(hf_placeholders(config))
        assert sorted(e.ours for e in entries) == sorted(Transformer(config).state_dict())
        assert len(hf_keys) == len(set(hf_keys))


# ---------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "hf_config, named",
    [
        (dict(model_type="gpt2", architectures=["GPT2LMHeadModel"]), "gpt2"),
        (dict(model_type="llama", architectures=["LlamaForTokenClassification"]), "LlamaForTokenClassification"),
        (dict(architectures=["FalconForCausalLM"]), "FalconForCausalLM"),
    ],
)
def test_unsupported_architecture_is_named(hf_config, named, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**hf_config, "vocab_size": 96}))
    with pytest.raises(ValueError, match=named) as error:
        load_hf_checkpoint(tmp_path)
    assert "llama" in str(error.value) and "MixtralForCausalLM" in str(error.value)  # lists the supported ones


@pytest.mark.parametrize("hf_config, message", [
    (dict(model_type="olmoe", clip_qkv=8.0), "clip_qkv=8.0"),
    (dict(model_type="qwen3_moe", attention_bias=True), "qwen3_moe attention_bias"),
    (dict(model_type="llama", rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), "'yarn'"),
    (dict(model_type="llama", rope_scaling={"rope_type": "llama3", "factor": 8.0}), "llama3 RoPE scaling lacks"),
    (dict(model_type="olmo2", attention_bias=True), "olmo2 attention_bias"),
    # Olmo-3 long-context checkpoints: YaRN on the full-attention layers only (v4 and v5 spellings).
    (dict(model_type="olmo3", rope_scaling={"rope_type": "yarn", "factor": 8.0}), "full-attention layers only"),
    (dict(model_type="olmo3", rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 5e5},
                                               "full_attention": {"rope_type": "yarn", "rope_theta": 5e5,
                                                                  "factor": 8.0}}), "differs between layer types"),
    # transformers 5 saves a flat OLMo 3 rope_parameters with the per-type ones beside it, and reads only those.
    (dict(model_type="olmo3", rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                               "sliding_attention": {"rope_type": "default", "rope_theta": 5e5},
                                               "full_attention": {"rope_type": "yarn", "rope_theta": 5e5,
                                                                  "factor": 8.0}}), "differs between layer types"),
])
def test_what_we_cannot_compute_is_refused_on_import(hf_config, message):
    dims = {**HF_DIMS, "num_experts": 4}
    with pytest.raises((ValueError, NotImplementedError), match=message):
        config_from_hf({**dims, **hf_config})


def test_missing_config_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "config.json")):
        load_hf_checkpoint(tmp_path)


def test_missing_weights_file_names_the_path(our_checkpoint, tmp_path):
    (tmp_path / "config.json").write_text((our_checkpoint / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "model.safetensors")):
        load_hf_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda w: w.pop("model.layers.1.mlp.up_proj.weight"), r"1 missing weights: model\.layers\.1\.mlp\.up_proj"),
        (lambda w: w.update({"model.layers.9.extra.weight": torch.zeros(2)}), r"1 unexpected weights: model\.layers"),
        (lambda w: w.update({"model.norm.weight": torch.ones(8)}), r"model\.norm\.weight: shape \(8,\)"),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_mismatched_weights_are_listed_by_key(our_checkpoint, tmp_path, change, message):
    weights = load_file(our_checkpoint / "model.safetensors")
    change(weights)
    save_file(weights, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((our_checkpoint / "config.json").read_text())
    with pytest.raises(ValueError, match=message):
        load_hf_checkpoint(tmp_path)
