"""Translation between our ModelConfig and HF transformers' config.json for Llama (Llama 3's scaled RoPE included),
Mistral, Mixtral, Qwen2, Qwen3, Qwen2-MoE, OLMoE, Qwen3-MoE, OLMo 2 and OLMo 3.

Reads both transformers-v4 configs (top-level `rope_theta`, `rope_scaling`) and v5 configs (`rope_parameters`),
and writes both spellings so that either version loads the export. Defaults for absent keys are those of the
family's HF config class (transformers 5). What HF cannot represent is refused on export with a ValueError
naming the field. The capacity factor is dropped with a warning (HF's MoE models are dropless); the z-loss
coefficient and the expert-bias update rate are dropped silently (HF has neither a z-loss nor a selection bias) and
read back as our defaults.

An MoE model exports as Mixtral when Mixtral can express it (every layer MoE, no shared experts, renormalised
top-k, no q/k/v bias), else as Qwen2-MoE: its `decoder_sparse_step` is our `moe_every` and its `mlp_only_layers`
our `dense_layers` (plus the `first_k_dense` leading layers on export); its dense layers are SwiGLUs of width
`intermediate_size` (our ffn_dim), its experts of `moe_intermediate_size` (our expert_ffn_dim), and its one shared
expert of `shared_expert_intermediate_size` (our n_shared_experts x expert_ffn_dim) is always gated
(shared_expert_gate). Qwen2-MoE's `qkv_bias` (our attn_bias) needs transformers >= 4.51 to be False.

A model with QK-norm exports as Qwen3 when dense (qk_norm 'head'; Qwen2's windows), else as OLMoE (qk_norm 'full':
every layer MoE, `intermediate_size` the experts' width, top-k probabilities as norm_topk_prob says) or Qwen3-MoE
(qk_norm 'head': Qwen2-MoE's layer pattern without the shared expert). OLMoE's `clip_qkv` and the `attention_bias`
of these families (which biases o_proj too) are refused.

A model whose norms sit on the sublayers' outputs (norm_position 'output') exports as OLMo 2, or as OLMo 3 when some
layers have a window (its `layer_types`, one `sliding_window`); both are dense with QK-norm over all heads. OLMo 3's
RoPE may differ between its sliding and full layers (its long-context models scale only the full ones): refused
unless the two are the same.
"""

from __future__ import annotations

import warnings

import torch

from moe.config import ModelConfig

# model_type -> (architecture, defaults of the HF config class for the keys we read when config.json omits them)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaForCausalLM", dict(rope_theta=10000.0, num_key_value_heads=None, rms_norm_eps=1e-6,
                                       max_position_embeddings=2048)),
    "mistral": ("MistralForCausalLM", dict(rope_theta=10000.0, num_key_value_heads=8, rms_norm_eps=1e-6,
                                           max_position_embeddings=4096 * 32, sliding_window=4096)),
    "mixtral": ("MixtralForCausalLM", dict(rope_theta=1e6, num_key_value_heads=8, rms_norm_eps=1e-5,
                                           max_position_embeddings=4096 * 32, sliding_window=None,
                                           num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.001)),
    "qwen2": ("Qwen2ForCausalLM", dict(rope_theta=10000.0, num_key_value_heads=32, rms_norm_eps=1e-6,
                                       max_position_embeddings=32768, use_sliding_window=False, sliding_window=4096,
                                       max_window_layers=28)),
    "qwen2_moe": ("Qwen2MoeForCausalLM", dict(rope_theta=10000.0, num_key_value_heads=16, rms_norm_eps=1e-6,
                                              max_position_embeddings=32768, use_sliding_window=False, num_experts=60,
                                              num_experts_per_tok=4, moe_intermediate_size=1408,
                                              shared_expert_intermediate_size=5632, norm_topk_prob=False,
                                              router_aux_loss_coef=0.001, decoder_sparse_step=1, mlp_only_layers=[],
                                              qkv_bias=True)),
    "qwen3": ("Qwen3ForCausalLM", dict(rope_theta=10000.0, num_key_value_heads=32, rms_norm_eps=1e-6,
                                       max_position_embeddings=32768, use_sliding_window=False, sliding_window=4096,
                                       max_window_layers=28, attention_bias=False)),
    "olmoe": ("OlmoeForCausalLM", dict(rope_theta=10000.0, num_key_value_heads=None, rms_norm_eps=1e-5,
                                       max_position_embeddings=4096, num_experts=64, num_experts_per_tok=8,
                                       norm_topk_prob=False, router_aux_loss_coef=0.01, clip_qkv=None,
                                       attention_bias=False)),
    "qwen3_moe": ("Qwen3MoeForCausalLM", dict(rope_theta=10000.0, num_key_value_heads=4, rms_norm_eps=1e-6,
                                              max_position_embeddings=32768, use_sliding_window=False, num_experts=128,
                                              num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=False,
                                              router_aux_loss_coef=0.001, decoder_sparse_step=1, mlp_only_layers=[],
                                              attention_bias=False)),
    "olmo2": ("Olmo2ForCausalLM", dict(rope_theta=10000.0, num_key_value_heads=None, rms_norm_eps=1e-5,
                                       max_position_embeddings=2048, attention_bias=False)),
    "olmo3": ("Olmo3ForCausalLM", dict(rope_theta=500000.0, num_key_value_heads=None, rms_norm_eps=1e-5,
                                       max_position_embeddings=2048, attention_bias=False, sliding_window=4096)),
}
# Families whose attention normalises queries and keys (ModelConfig.qk_norm), and how.
QK_NORM = {"olmoe": "full", "qwen3_moe": "head", "qwen3": "head", "olmo2": "full", "olmo3": "full"}
# Families whose blocks normalise the sublayers' outputs (ModelConfig.norm_position 'output').
NORM_OUTPUT = ("olmo2", "olmo3")
ARCHITECTURES = {arch: model_type for model_type, (arch, _) in FAMILIES.items()}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def hf_model_type(hf: dict) -> str:
    """The supported family of an HF config dict, from `model_type` or else `architectures`."""
    supported = f"supported: model_type {sorted(FAMILIES)}, architectures {sorted(ARCHITECTURES)}"
    model_type = hf.get("model_type")
    architectures = hf.get("architectures") or []
    if model_type is None:
        known = [ARCHITECTURES[a] for a in architectures if a in ARCHITECTURES]
        if not known:
            raise ValueError(f"unsupported HF architecture {architectures} (no model_type); {supported}")
        model_type = known[0]
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported HF model_type {model_type!r} (architectures {architectures}); {supported}")
    if architectures and not any(a in ARCHITECTURES for a in architectures):
        raise ValueError(f"unsupported HF architecture {architectures} for model_type {model_type!r}; {supported}")
    return model_type


LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope(hf: dict, default: float) -> tuple[float, dict | None]:
    """RoPE base and scaling (ModelConfig.rope_theta, rope_scaling) from a v5 `rope_parameters` (one for every
    layer, or one per layer type that are all the same) or a v4 `rope_theta` and `rope_scaling`; scaling other than
    Llama 3's is refused."""
    params = hf.get("rope_parameters") or {}
    per_type = [v for v in params.values() if isinstance(v, dict)]
    if per_type:  # per layer type (OLMo 3, Gemma 3): transformers reads those alone, even beside flat keys
        if any(p != per_type[0] for p in per_type):
            raise NotImplementedError(f"RoPE that differs between layer types is not supported: rope_parameters "
                                      f"{params}")
        params = per_type[0]
    scaling = None
    for source in (params, hf.get("rope_scaling") or {}):  # v5, v4
        rope_type = source.get("rope_type", source.get("type", "default"))
        if rope_type == "llama3":
            # transformers fills in the original context from max_position_embeddings when it is absent
            source = {"original_max_position_embeddings": hf.get("max_position_embeddings"), **source}
            source = {k: v for k, v in source.items() if v is not None}
            missing = [k for k in LLAMA3_KEYS if k not in source]
            if missing:
                raise ValueError(f"llama3 RoPE scaling lacks {missing}: {source}")
            scaling = {"rope_type": "llama3", **{k: source[k] for k in LLAMA3_KEYS}}
        elif rope_type != "default":
            raise NotImplementedError(f"RoPE scaling type {rope_type!r} is not supported (only 'default' and "
                                      f"'llama3' are implemented): {source}")
    theta = params.get("rope_theta", hf.get("rope_theta"))
    return float(default if theta is None else theta), scaling


def _qwen2_layer_windows(hf: dict, n_layers: int, get) -> list[int | None] | None:
    """Qwen2Config: the window applies only when use_sliding_window, to the layers whose layer_type is
    'sliding_attention'; without layer_types (v4) those are the layers i >= max_window_layers."""
    window = get("sliding_window") if get("use_sliding_window") else None
    if window is None:
        return None
    layer_types = hf.get("layer_types")
    if layer_types is None:
        layer_types = ["sliding_attention" if i >= get("max_window_layers") else "full_attention"
                       for i in range(n_layers)]
    return [window if t == "sliding_attention" else None for t in layer_types]


def _olmo3_layer_windows(hf: dict, n_layers: int, get) -> list[int | None]:
    """Olmo3Config: sliding_window on the layers whose layer_type is 'sliding_attention'; without layer_types,
    three windowed layers then a full one, repeated."""
    layer_types = hf.get("layer_types") or ["full_attention" if (i + 1) % 4 == 0 else "sliding_attention"
                                            for i in range(n_layers)]
    return [get("sliding_window") if t == "sliding_attention" else None for t in layer_types]


def _qwen2_moe_fields(hf: dict, n_layers: int, get) -> dict:
    """Qwen2MoeDecoderLayer: layer i is MoE when i is not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0;
    every MoE layer has one shared expert behind a sigmoid gate (width 0: none)."""
    if get("use_sliding_window"):
        raise NotImplementedError("Qwen2-MoE sliding windows (use_sliding_window=true) are not supported")
    expert_dim, shared_dim = get("moe_intermediate_size"), get("shared_expert_intermediate_size")
    if shared_dim % expert_dim:
        raise NotImplementedError(f"shared_expert_intermediate_size={shared_dim} is not a multiple of "
                                  f"moe_intermediate_size={expert_dim}: our shared experts have the routed width")
    return dict(n_experts=get("num_experts"), top_k=get("num_experts_per_tok"), expert_ffn_dim=expert_dim,
                n_shared_experts=shared_dim // expert_dim, shared_expert_gate=shared_dim > 0,
                norm_topk_prob=get("norm_topk_prob"), aux_loss_coef=get("router_aux_loss_coef"),
                moe_every=get("decoder_sparse_step"),
                dense_layers=sorted({i for i in get("mlp_only_layers") or [] if 0 <= i < n_layers}))


def config_from_hf(hf: dict) -> ModelConfig:
    """Our ModelConfig for an HF config.json dict of a Llama, Mistral, Mixtral, Qwen2, Qwen3, Qwen2-MoE, OLMoE,
    Qwen3-MoE, OLMo 2 or OLMo 3 causal LM."""
    model_type = hf_model_type(hf)
    defaults = FAMILIES[model_type][1]

    def get(key):
        return hf[key] if key in hf else defaults.get(key)

    missing = [k for k in _REQUIRED if k not in hf]
    if missing:
        raise ValueError(f"HF config lacks required keys {missing}")
    if get("hidden_act") not in (None, "silu"):
        raise NotImplementedError(f"hidden_act={hf['hidden_act']!r} is not supported (only 'silu')")
    if model_type in ("llama", "olmoe", "qwen3", "qwen3_moe", "olmo2", "olmo3") and (
            hf.get("attention_bias") or hf.get("mlp_bias")):
        # Their attention_bias also puts a bias on o_proj, which our Attention never has.
        raise NotImplementedError(f"{model_type} attention_bias / mlp_bias are not supported")
    if model_type == "olmoe" and get("clip_qkv") is not None:
        raise NotImplementedError(f"OLMoE clip_qkv={get('clip_qkv')} (clamping q, k and v) is not supported")
    if model_type == "qwen3_moe" and get("use_sliding_window"):
        raise NotImplementedError("Qwen3-MoE sliding windows (use_sliding_window=true) are not supported")
    if model_type == "olmo3" and hf.get("rope_scaling"):
        # transformers applies a v4 rope_scaling to OLMo 3's full-attention layers only
        raise NotImplementedError(f"OLMo 3 rope_scaling {hf['rope_scaling']} (scaling its full-attention layers "
                                  "only) is not supported")
    n_layers = hf["num_hidden_layers"]
    rope_theta, rope_scaling = _rope(hf, defaults["rope_theta"])
    config = dict(
        name=str(hf.get("_name_or_path") or model_type),
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=n_layers,
        n_heads=hf["num_attention_heads"],
        n_kv_heads=get("num_key_value_heads"),
        head_dim=hf.get("head_dim"),
        ffn_dim=hf["intermediate_size"],
        max_seq_len=get("max_position_embeddings"),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        qk_norm=QK_NORM.get(model_type),
        norm_eps=get("rms_norm_eps"),
        norm_position="output" if model_type in NORM_OUTPUT else "input",
        attn_bias=model_type == "qwen2" or (model_type == "qwen2_moe" and get("qkv_bias")),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        extra={"hf_config": dict(hf)},
    )
    if model_type in ("mistral", "mixtral"):
        config["sliding_window"] = get("sliding_window")
    if model_type in ("qwen2", "qwen3"):
        config["layer_windows"] = _qwen2_layer_windows(hf, n_layers, get)
    if model_type == "olmo3":
        config["layer_windows"] = _olmo3_layer_windows(hf, n_layers, get)
    if model_type == "mixtral":
        config.update(n_experts=get("num_local_experts"), top_k=get("num_experts_per_tok"),
                      expert_ffn_dim=hf["intermediate_size"], norm_topk_prob=True,
                      aux_loss_coef=get("router_aux_loss_coef"))
    if model_type == "qwen2_moe":
        config.update(_qwen2_moe_fields(hf, n_layers, get))
    if model_type == "olmoe":  # every layer MoE; intermediate_size is the experts' width
        config.update(n_experts=get("num_experts"), top_k=get("num_experts_per_tok"),
                      expert_ffn_dim=hf["intermediate_size"], norm_topk_prob=get("norm_topk_prob"),
                      aux_loss_coef=get("router_aux_loss_coef"))
    if model_type == "qwen3_moe":  # Qwen2-MoE's layer pattern, no shared expert
        # The hub's config.json says num_experts; transformers 5 saves it under its alias num_local_experts.
        config.update(n_experts=hf.get("num_experts", hf.get("num_local_experts", get("num_experts"))), top_k=get("num_experts_per_tok"),
                      expert_ffn_dim=get("moe_intermediate_size"), norm_topk_prob=get("norm_topk_prob"),
                      aux_loss_coef=get("router_aux_loss_coef"), moe_every=get("decoder_sparse_step"),
                      dense_layers=sorted({i for i in get("mlp_only_layers") or [] if 0 <= i < n_layers}))
    return ModelConfig(**config)


def _windows(config: ModelConfig) -> list[int | None]:
    return [config.window_for_layer(i) for i in range(config.n_layers)]


def _layer_pattern(config: ModelConfig) -> str:
    """The layer-pattern fields set away from 'every layer is MoE', as `ModelConfig.<field>=<value>`."""
    every_layer = {"moe_every": 1, "first_k_dense": 0, "dense_layers": []}
    return ", ".join(f"ModelConfig.{name}={getattr(config, name)}" for name, value in every_layer.items()
                     if getattr(config, name) != value)


def _qk_norm_model_type(config: ModelConfig) -> str:
    """OLMoE for qk_norm 'full', Qwen3-MoE for 'head'; a ValueError naming what neither can represent."""
    if not config.is_moe:
        if config.qk_norm == "full":
            raise ValueError("ModelConfig.qk_norm='full' without experts exports as OLMo 2 or 3, whose blocks "
                             "normalise the sublayers' outputs: set ModelConfig.norm_position='output' (dense "
                             "models with qk_norm 'head' export as Qwen3, MoE models as OLMoE or Qwen3-MoE)")
        if config.attn_bias:
            raise ValueError("ModelConfig.qk_norm='head' exports as Qwen3, which cannot represent "
                             "ModelConfig.attn_bias=True (its attention_bias would add an o_proj bias)")
        _check_qwen2_windows(config)
        return "qwen3"
    family = {"full": "olmoe", "head": "qwen3_moe"}[config.qk_norm]
    reasons = [reason for reason, present in (
        ("ModelConfig.attn_bias=True (its attention_bias would add an o_proj bias)", config.attn_bias),
        (f"ModelConfig.n_shared_experts={config.n_shared_experts}", config.n_shared_experts > 0),
        (f"windows {_windows(config)} (ModelConfig.sliding_window / layer_windows)",
         any(w is not None for w in _windows(config))),
        (f"MoE on layers {list(config.moe_layer_indices())} only ({_layer_pattern(config)})",
         family == "olmoe" and len(config.moe_layer_indices()) < config.n_layers),
        ((f"ModelConfig.head_dim={config.head_dim} other than d_model / n_heads = "
          f"{config.d_model // config.n_heads} (OLMoE sizes its heads and q/k norms from hidden_size)"),
         family == "olmoe" and config.head_dim * config.n_heads != config.d_model),
    ) if present]
    if reasons:
        name = {"olmoe": "OLMoE", "qwen3_moe": "Qwen3-MoE"}[family]
        raise ValueError(f"ModelConfig.qk_norm={config.qk_norm!r} exports as {name}, which cannot represent "
                         f"{'; '.join(reasons)}")
    return family


def _norm_output_model_type(config: ModelConfig) -> str:
    """OLMo 2, or OLMo 3 when some layer has a window; a ValueError naming what neither can represent."""
    windows = [w for w in _windows(config) if w is not None]
    reasons = [reason for reason, present in (
        (f"ModelConfig.n_experts={config.n_experts} (both are dense)", config.is_moe),
        (f"ModelConfig.qk_norm={config.qk_norm!r} (both normalise queries and keys over all heads: 'full')",
         config.qk_norm != "full"),
        ("ModelConfig.attn_bias=True (their attention_bias would add an o_proj bias)", config.attn_bias),
        (f"windows of different sizes {sorted(set(windows))} (ModelConfig.layer_windows; OLMo 3 has one size)",
         len(set(windows)) > 1),
        (("ModelConfig.rope_scaling (neither family's config takes llama3 scaling in transformers 4: OLMo 3 scales "
          "its full-attention layers only, OLMo 2 accepts only {type, factor})"), config.rope_scaling is not None),
    ) if present]
    if reasons:
        raise ValueError(f"ModelConfig.norm_position='output' exports as OLMo 2 or OLMo 3, which cannot represent "
                         f"{'; '.join(reasons)}")
    return "olmo3" if windows else "olmo2"


def _moe_model_type(config: ModelConfig) -> str:
    """Mixtral when it can represent the MoE config, else Qwen2-MoE; a ValueError when neither can."""
    moe_layers = config.moe_layer_indices()
    beyond_mixtral = [reason for reason, present in (
        (f"MoE on layers {list(moe_layers)} only ({_layer_pattern(config)})", len(moe_layers) < config.n_layers),
        (f"ModelConfig.n_shared_experts={config.n_shared_experts}", config.n_shared_experts > 0),
        ("ModelConfig.norm_topk_prob=False", not config.norm_topk_prob),
        ("ModelConfig.attn_bias=True", config.attn_bias),
    ) if present]
    windows = _windows(config)
    if not beyond_mixtral:
        if len(set(windows)) > 1:
            raise ValueError(f"per-layer windows {windows} (ModelConfig.layer_windows) with experts: Mixtral applies "
                             "one sliding_window to every layer")
        return "mixtral"
    if config.n_shared_experts and not config.shared_expert_gate:
        raise ValueError(f"ModelConfig.n_shared_experts={config.n_shared_experts} with shared_expert_gate=False: "
                         "Mixtral has no shared experts and Qwen2-MoE gates its shared expert "
                         "(ModelConfig.shared_expert_gate=True)")
    if any(w is not None for w in windows):
        raise ValueError(f"{'; '.join(beyond_mixtral)} need Qwen2-MoE (Mixtral has none of these), whose sliding "
                         f"windows are not supported: windows {windows} (ModelConfig.sliding_window / layer_windows)")
    return "qwen2_moe"


def _check_qwen2_windows(config: ModelConfig) -> None:
    windows = _windows(config)
    windowed = [w is not None for w in windows]
    first = windowed.index(True) if any(windowed) else config.n_layers
    if len(set(windows) - {None}) > 1 or not all(windowed[first:]):
        raise ValueError(f"layer windows {windows} (ModelConfig.layer_windows) are not Qwen2-expressible: Qwen2 "
                         "(and Qwen3) window all layers from max_window_layers on, with one window size")


def hf_model_type_for(config: ModelConfig) -> str:
    """The HF family that represents a config: with norms on the sublayers' outputs OLMo 2 or 3; with QK-norm Qwen3,
    OLMoE or Qwen3-MoE; with experts Mixtral if it can, else Qwen2-MoE (see the module docstring); without, Qwen2 for
    q/k/v bias, Mistral for a uniform sliding window, Llama otherwise. Raises ValueError for what no supported family
    can represent."""
    if config.norm_type != "rmsnorm":
        raise ValueError(f"ModelConfig.norm_type={config.norm_type!r} has no HF Llama-family equivalent "
                         "(only 'rmsnorm')")
    if config.norm_position == "output":
        return _norm_output_model_type(config)
    if config.qk_norm is not None:
        return _qk_norm_model_type(config)
    if config.is_moe:
        return _moe_model_type(config)
    windows = _windows(config)
    if config.attn_bias:
        _check_qwen2_windows(config)
        return "qwen2"
    if len(set(windows)) > 1:
        raise ValueError(f"per-layer windows {windows} (ModelConfig.layer_windows) need Qwen2 "
                         "(ModelConfig.attn_bias=True); Llama and Mistral apply one sliding_window to every layer")
    return "mistral" if windows[0] is not None else "llama"


def config_to_hf(config: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The HF config.json dict for a config (see hf_model_type_for for the family chosen)."""
    model_type = hf_model_type_for(config)
    if config.capacity_factor is not None:
        warnings.warn(f"ModelConfig.capacity_factor={config.capacity_factor} dropped: HF's MoE models are dropless",
                      stacklevel=3)
    dtype_name = str(dtype).removeprefix("torch.")
    hf = dict(
        architectures=[FAMILIES[model_type][0]], model_type=model_type,
        vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.ffn_dim,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads, head_dim=config.head_dim, hidden_act="silu",
        max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps,
        initializer_range=config.init_std, tie_word_embeddings=config.tie_embeddings,
        rope_theta=config.rope_theta,  # v4
        rope_parameters={"rope_theta": config.rope_theta, "rope_type": "default"},  # v5
        attention_dropout=0.0, use_cache=True, dtype=dtype_name, torch_dtype=dtype_name,
    )
    source = config.extra.get("hf_config", {})
    hf.update({k: source[k] for k in _TOKEN_IDS if k in source})
    windows = _windows(config)
    window = next((w for w in windows if w is not None), None)
    if model_type == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    elif model_type in ("mistral", "mixtral"):
        hf["sliding_window"] = window
    if model_type in ("qwen3", "olmo2", "olmo3"):
        hf["attention_bias"] = False
    if model_type in ("qwen2", "qwen3"):
        first = next((i for i, w in enumerate(windows) if w is not None), config.n_layers)
        hf.update(use_sliding_window=window is not None, sliding_window=window, max_window_layers=first,
                  layer_types=["full_attention" if w is None else "sliding_attention" for w in windows])
    if model_type == "mixtral":
        hf.update(intermediate_size=config.expert_ffn_dim, num_local_experts=config.n_experts,
                  num_experts_per_tok=config.top_k, router_aux_loss_coef=config.aux_loss_coef,
                  output_router_logits=False, router_jitter_noise=0.0)
    if config.rope_scaling is not None:
        hf["rope_scaling"] = dict(config.rope_scaling)  # v4
        hf["rope_parameters"] = {"rope_theta": config.rope_theta, **config.rope_scaling}  # v5
    if model_type == "olmo3":
        rope = hf["rope_parameters"]
        hf.update(sliding_window=window,
                  layer_types=["full_attention" if w is None else "sliding_attention" for w in windows],
                  rope_parameters={"sliding_attention": dict(rope), "full_attention": dict(rope)})
    if model_type == "olmoe":
        hf.update(intermediate_size=config.expert_ffn_dim, num_experts=config.n_experts,
                  num_experts_per_tok=config.top_k, norm_topk_prob=config.norm_topk_prob,
                  router_aux_loss_coef=config.aux_loss_coef, clip_qkv=None, attention_bias=False,
                  output_router_logits=False)
    if model_type == "qwen3_moe":
        step, moe_layers = config.moe_every, set(config.moe_layer_indices())
        hf.update(num_experts=config.n_experts, num_experts_per_tok=config.top_k,
                  moe_intermediate_size=config.expert_ffn_dim, norm_topk_prob=config.norm_topk_prob,
                  router_aux_loss_coef=config.aux_loss_coef, decoder_sparse_step=step,
                  mlp_only_layers=[i for i in range(config.n_layers) if (i + 1) % step == 0 and i not in moe_layers],
                  attention_bias=False, use_sliding_window=False, sliding_window=None, output_router_logits=False)
    if model_type == "qwen2_moe":
        step, moe_layers = config.moe_every, set(config.moe_layer_indices())
        hf.update(num_experts=config.n_experts, num_experts_per_tok=config.top_k,
                  moe_intermediate_size=config.expert_ffn_dim,
                  shared_expert_intermediate_size=config.n_shared_experts * config.expert_ffn_dim,
                  norm_topk_prob=config.norm_topk_prob, router_aux_loss_coef=config.aux_loss_coef,
                  decoder_sparse_step=step,
                  mlp_only_layers=[i for i in range(config.n_layers) if (i + 1) % step == 0 and i not in moe_layers],
                  qkv_bias=config.attn_bias, use_sliding_window=False, sliding_window=None,
                  max_window_layers=config.n_layers, output_router_logits=False)
    return hf
