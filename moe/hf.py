"""HF transformers interoperability: load Llama / Mistral / Mixtral / Qwen2 / Qwen3 / Qwen2-MoE / OLMoE / Qwen3-MoE /
OLMo 2 / OLMo 3 checkpoints into our Transformer and save ours as HF checkpoints (config.json plus safetensors,
sharded with an index above max_shard_size).

One key mapping, `hf_key_map`, serves import and export: our module names already follow HF's, so most
entries are renames; per-expert matrices (hub format `block_sparse_moe.experts.{j}.w1/w2/w3` for Mixtral,
`mlp.experts.{j}.gate_proj/up_proj/down_proj` for Qwen2-MoE, OLMoE and Qwen3-MoE, which transformers 5 fuses on load and splits again
on save) stack into our (E, F, D) / (E, D, F) expert weights. Qwen2-MoE always has a gated shared expert: a model
of ours without shared experts exports it with width 0 (`hf_placeholders`), which computes nothing.
Config translation lives in `moe/hf_config.py`.

Losses differ by design: HF Mixtral's model-level `aux_loss` applies `load_balancing_loss_func` to all layers'
router logits concatenated (fractions and mean probabilities pooled over layers, then multiplied), while our
`ModelOutput.aux_loss` averages the per-layer losses; the two agree per layer, not in general for the model.
HF Mixtral has no router z-loss; our z_loss_coef is not exported.

No exported family has an expert selection bias (auxiliary-loss-free balancing, ModelConfig.router_bias_update_rate;
DeepSeek-V3's e_score_correction_bias is one, but not a family of ours): export refuses a model whose bias is
nonzero, since HF would route its tokens to other experts, and drops an all-zero one; import starts a model given
a bias at zero.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import ExitStack
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moe.config import ModelConfig
from moe.errors import InputError
from moe.hf_config import config_from_hf, config_to_hf, hf_model_type, hf_model_type_for
from moe.model import Transformer
from moe.router import SELECTION_BIAS

__all__ = ["KeyMap", "config_from_hf", "config_to_hf", "hf_key_map", "hf_placeholders", "load_hf_checkpoint",
           "save_hf_checkpoint"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Keys some HF checkpoints carry that hold no parameters of ours (old Llama checkpoints saved RoPE buffers).
_IGNORED_HF_KEYS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
# Per HF MoE family: the MoE block's module name and the HF name of each of our stacked expert matrices.
_MOE_NAMES = {
    "mixtral": ("block_sparse_moe", {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}),
    "qwen2_moe": ("mlp", {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}),
    "olmoe": ("mlp", {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}),
    "qwen3_moe": ("mlp", {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}),
}


class KeyMap(NamedTuple):
    """One of our state-dict entries and the HF tensors it corresponds to."""

    ours: str
    hf: tuple[str, ...]
    how: str  # 'rename': hf[0] is the same tensor; 'stack': ours = torch.stack(hf tensors) along a new dim 0


def hf_key_map(config: ModelConfig, model_type: str | None = None) -> list[KeyMap]:
    """Every parameter of our model for `config` with its HF hub-format key(s), in checkpoint order, in HF family
    `model_type` (None: the family export chooses, moe.hf_config.hf_model_type_for)."""
    model_type = model_type or hf_model_type_for(config)
    entries = [KeyMap("embed_tokens.weight", ("model.embed_tokens.weight",), "rename")]
    for i in range(config.n_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        names = [f"self_attn.{p}_proj.weight" for p in "qkvo"]
        names += [f"self_attn.{p}_proj.bias" for p in "qkv"] if config.attn_bias else []
        names += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"] if config.qk_norm else []
        norms = ("post_attention", "post_feedforward") if config.norm_position == "output" else \
            ("input", "post_attention")
        names += [f"{norm}_layernorm.weight" for norm in norms]
        if config.is_moe_layer(i):
            block, expert_names = _MOE_NAMES[model_type]
            moe = f"{hf}{block}."
            entries.append(KeyMap(ours + "mlp.router.gate.weight", (moe + "gate.weight",), "rename"))
            for our_name, w in expert_names.items():
                experts = tuple(f"{moe}experts.{j}.{w}.weight" for j in range(config.n_experts))
                entries.append(KeyMap(f"{ours}mlp.experts.{our_name}", experts, "stack"))
            if config.n_shared_experts:
                entries += [KeyMap(f"{ours}mlp.shared_experts.{p}_proj.weight", (f"{moe}shared_expert.{p}_proj.weight",),
                                   "rename") for p in ("gate", "up", "down")]
            if config.shared_expert_gate:
                entries.append(KeyMap(ours + "mlp.shared_expert_gate.weight", (moe + "shared_expert_gate.weight",),
                                      "rename"))
        else:
            names += [f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
        entries += [KeyMap(ours + name, (hf + name,), "rename") for name in names]
    entries.append(KeyMap("norm.weight", ("model.norm.weight",), "rename"))
    if not config.tie_embeddings:
        entries.append(KeyMap("lm_head.weight", ("lm_head.weight",), "rename"))
    return entries


def hf_placeholders(config: ModelConfig, model_type: str | None = None) -> dict[str, tuple[int, ...]]:
    """HF tensors (key -> shape) with no parameter of ours behind them: the width-0 shared expert of each MoE layer
    of a Qwen2-MoE checkpoint without shared experts, and its gate, which scales the zeros that expert returns.
    Export writes them as zeros; import accepts and ignores them."""
    model_type = model_type or hf_model_type_for(config)
    if model_type != "qwen2_moe" or not config.is_moe or config.n_shared_experts:
        return {}
    D = config.d_model
    shapes = {"shared_expert.gate_proj.weight": (0, D), "shared_expert.up_proj.weight": (0, D),
              "shared_expert.down_proj.weight": (D, 0), "shared_expert_gate.weight": (1, D)}
    return {f"model.layers.{i}.mlp.{name}": shape for i in config.moe_layer_indices() for name, shape in shapes.items()}


def to_hf_tensors(entry: KeyMap, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    if entry.how == "rename":
        return {entry.hf[0]: tensor}
    return {key: tensor[j] for j, key in enumerate(entry.hf)}  # unstack the expert dimension


def from_hf_tensors(entry: KeyMap, tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if entry.how == "rename" else torch.stack(tensors)


def _list_keys(kind: str, keys) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:20]) + (f", ... ({len(keys) - 20} more)" if len(keys) > 20 else "")
    return f"{len(keys)} {kind} weights: {shown}"


# ---------------------------------------------------------------------------------------------------- import
def read_hf_config(path: str | Path) -> dict:
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no HF config found: {config_path} does not exist")
    return json.loads(config_path.read_text())


def _weight_files(path: Path) -> dict[str, Path]:
    """HF key -> the safetensors file holding it, from the index of a sharded checkpoint or the single file."""
    if (path / INDEX_FILE).is_file():
        weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        return {key: path / name for key, name in weight_map.items()}
    if (path / SINGLE_FILE).is_file():
        with safe_open(path / SINGLE_FILE, framework="pt") as f:
            return {key: path / SINGLE_FILE for key in f.keys()}  # noqa: SIM118 (a safetensors handle, not a dict)
    raise FileNotFoundError(f"no safetensors weights found: neither {path / SINGLE_FILE} nor {path / INDEX_FILE} "
                            "exists (only safetensors checkpoints are supported)")


def load_hf_checkpoint(
    path: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **config_overrides,
) -> Transformer:
    """Our Transformer from a local HF checkpoint directory (config.json + safetensors, single or sharded).

    dtype None keeps the checkpoint's stored dtype; config_overrides (e.g. attention_backend='eager',
    expert_backend='loop') are applied to the translated config. The model is built on the meta device and
    takes the loaded tensors as its parameters, so memory holds one copy of the weights.
    """
    path = Path(path)
    hf_config = read_hf_config(path)
    if "_name_or_path" not in hf_config:
        config_overrides = {"name": path.name, **config_overrides}
    config = config_from_hf(hf_config).replace(**config_overrides)
    files = _weight_files(path)
    device = torch.device(device or "cpu")

    model_type = hf_model_type(hf_config)
    entries = hf_key_map(config, model_type)
    expected = {key for entry in entries for key in entry.hf}
    optional = {"lm_head.weight"} if config.tie_embeddings else set()  # a tied checkpoint may repeat the head
    optional |= set(hf_placeholders(config, model_type))
    missing = expected - files.keys()
    unexpected = {k for k in files.keys() - expected - optional if not _IGNORED_HF_KEYS.fullmatch(k)}
    if missing or unexpected:
        problems = [_list_keys(kind, keys) for kind, keys in (("missing", missing), ("unexpected", unexpected))
                    if keys]
        raise ValueError(f"checkpoint {path} does not match its config.json ({model_type}): "
                         + "; ".join(problems))

    with torch.device("meta"):
        model = Transformer(config)
    shapes = {name: p.shape for name, p in model.named_parameters()}
    state = {}
    with ExitStack() as stack:
        handles = {file: stack.enter_context(safe_open(file, framework="pt")) for file in set(files.values())}
        if dtype is None:
            dtype = handles[files["model.embed_tokens.weight"]].get_slice("model.embed_tokens.weight").get_dtype()
            dtype = _SAFETENSORS_DTYPES.get(dtype, torch.get_default_dtype())
        for entry in entries:
            tensor = from_hf_tensors(entry, [handles[files[key]].get_tensor(key) for key in entry.hf])
            if tensor.shape != shapes[entry.ours]:
                label = entry.hf[0] if entry.how == "rename" else f"{entry.hf[0]} .. {entry.hf[-1]} stacked"
                raise ValueError(f"{label}: shape "
                                 f"{tuple(tensor.shape)} in the checkpoint, {tuple(shapes[entry.ours])} expected "
                                 f"from config.json for our {entry.ours}")
            state[entry.ours] = tensor.to(device=device, dtype=dtype)
    # A model given a selection bias (config_overrides) starts from none, which is how the checkpoint routes.
    for name, buffer in model.named_buffers():
        if name.endswith(SELECTION_BIAS):
            state[name] = torch.zeros(buffer.shape, dtype=torch.float32, device=device)
    model.load_state_dict(state, strict=True, assign=True)
    # The RoPE frequencies are a non-persistent buffer, not in any checkpoint: materialise and recompute.
    model.rotary.to_empty(device=device)
    model.rotary.reset_parameters()
    return model


# ---------------------------------------------------------------------------------------------------- export
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes from an int or an HF-style size string: '5GB' (powers of 10) or '4GiB' (powers of 2)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)\s*", size.upper())
    if not match:
        raise ValueError(f"max_shard_size={size!r} is not a size like '5GB', '500MB' or an int of bytes")
    return int(float(match[1]) * _UNITS[match[2]])


def _without_selection_bias(state: dict[str, torch.Tensor], model_type: str) -> dict[str, torch.Tensor]:
    """`state` without its expert selection biases, which must be zero: no HF family of ours has one."""
    biased = [name for name, t in state.items() if name.endswith(SELECTION_BIAS) and bool(t.any())]
    if biased:
        layers = ", ".join(name.split(".")[1] for name in biased)
        raise InputError(f"cannot export to HF {model_type}: it has no expert selection bias, and this model's "
                         f"(auxiliary-loss-free balancing, ModelConfig.router_bias_update_rate) is nonzero in layers "
                         f"{layers}, so the exported model would route tokens to other experts")
    return {name: t for name, t in state.items() if not name.endswith(SELECTION_BIAS)}


def save_hf_checkpoint(
    model: Transformer,
    path: str | Path,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write `model` as an HF checkpoint directory that AutoModelForCausalLM.from_pretrained loads.

    The architecture follows the config (see moe.hf_config.hf_model_type_for); what HF cannot represent raises
    a ValueError before anything is written. Weights go to model.safetensors, or to numbered shards of at
    most max_shard_size bytes (a larger single tensor gets a shard of its own) plus model.safetensors.index.json.
    dtype None keeps the model's parameter dtype.
    """
    config = model.config
    model_type = hf_model_type_for(config)  # refuse early
    state = _without_selection_bias(model.state_dict(), model_type)
    entries = hf_key_map(config, model_type)
    placeholders = hf_placeholders(config, model_type)
    if state.keys() != {entry.ours for entry in entries}:
        raise ValueError("model parameters do not match the HF key mapping: "
                         + _list_keys("unmapped", state.keys() - {e.ours for e in entries}))
    dtype = dtype or state["embed_tokens.weight"].dtype
    hf_config = config_to_hf(config, dtype)

    # Plan shards from shapes alone, then materialise one shard at a time. A part is a KeyMap or a placeholder key.
    parts = [(entry, state[entry.ours].numel()) for entry in entries]
    parts += [(key, math.prod(shape)) for key, shape in placeholders.items()]
    shards: list[list[KeyMap | str]] = [[]]
    shard_bytes, limit, total = 0, parse_size(max_shard_size), 0
    for part, numel in parts:
        size = numel * dtype.itemsize
        if shards[-1] and shard_bytes + size > limit:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(part)
        shard_bytes += size
        total += size

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for stale in [path / SINGLE_FILE, path / INDEX_FILE, *path.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    weight_map = {}
    for n, shard in enumerate(shards, start=1):
        name = SINGLE_FILE if len(shards) == 1 else f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for entry in shard:
            if isinstance(entry, str):
                tensors[entry] = torch.zeros(placeholders[entry], dtype=dtype)
                continue
            tensor = state[entry.ours].detach().to(device="cpu", dtype=dtype)
            for key, t in to_hf_tensors(entry, tensor).items():
                tensors[key] = t.contiguous() if entry.how == "rename" else t.clone()  # no shared storage
        save_file(tensors, path / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (path / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    return path
