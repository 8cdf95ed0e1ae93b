"""What the Lightning checkpoints `LanguageModel` writes hold beyond Lightning's state, written by
`add_run_metadata` and read here: the resolved architecture as plain values ("model_config"), the model's weights
(state_dict keys prefixed "model.") and the tokenizer's JSON ("tokenizer").

One reader for `--model.init_from`, `moe export` and tests, so the checkpoint layout is known in one place.

A sharded checkpoint is a directory in torch.distributed.checkpoint (DCP) format, as Lightning's
FSDPStrategy(state_dict_type="sharded") and ModelParallelStrategy write it: the weights under "model" (FSDP) or
"state_dict" (ModelParallel), optimizer states under "optimizer_0", "optimizer_1", ... keyed by parameter name, and
everything else in meta.pt. `read_checkpoint` reads one into the single-file layout, and `consolidate_checkpoint`
writes that as one .ckpt (what lightning.pytorch.utilities.consolidate_checkpoint does, plus the optimizer states
keyed by position so a single-device Trainer resumes from it).
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from moe.config import ModelConfig, runtime_fields
from moe.errors import ConfigError, InputError
from moe.model import Transformer
from moe.router import SELECTION_BIAS
from moe.train.checkpoint_io import atomic_save
from moe.train.checkpoint_verify import verify_checkpoint

_DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index of a checkpoint directory
_LIGHTNING_METADATA = "meta.pt"  # Lightning's file beside it: the checkpoint minus weights and optimizer states


def add_run_metadata(checkpoint: dict, config: ModelConfig, tokenizer: Tokenizer | None) -> None:
    """What LanguageModel adds to a checkpoint beyond Lightning's state: the resolved architecture as plain values
    (so `init_from` and export need neither the CLI's config files nor unpickling of our classes), the tokenizer's
    JSON, and the seed that resume checks compare."""
    checkpoint["model_config"] = dataclasses.asdict(config)
    if tokenizer is not None:
        checkpoint["tokenizer"] = tokenizer.to_str()
    checkpoint["seed"] = os.environ.get("PL_GLOBAL_SEED")


def read_checkpoint(path: str | Path, map_location: torch.device | str = "cpu", verify: bool = True) -> dict:
    """The checkpoint's contents (memory-mapped, so the weights are read only when used), after checking that the
    file is whole (`verify_checkpoint`; `verify=False` for a file this process has just verified): torch.load
    would map a damaged file's tensors without a word."""
    path = Path(path)
    if path.is_dir():
        checkpoint = read_sharded_checkpoint(path)
    elif not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    else:
        if verify:
            verify_checkpoint(path)
        checkpoint = torch.load(path, map_location=map_location, mmap=True, weights_only=False)
    if "model_config" not in checkpoint or "state_dict" not in checkpoint:
        raise InputError(f"{path} is not a checkpoint written by moe's LanguageModel (no model_config/state_dict)")
    return checkpoint


def checkpoint_config(checkpoint: dict) -> ModelConfig:
    return ModelConfig(**checkpoint["model_config"])


def checkpoint_weights(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The Transformer's state dict (the LightningModule's "model." prefix removed)."""
    return {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}


def load_lightning_checkpoint(path: str | Path) -> tuple[Transformer, Tokenizer | None]:
    """The model (fp32, CPU) and tokenizer stored in a checkpoint written by `LanguageModel`."""
    checkpoint = read_checkpoint(path)
    with torch.device("meta"):
        model = Transformer(checkpoint_config(checkpoint))
    model.load_state_dict(checkpoint_weights(checkpoint), strict=True, assign=True)
    model.rotary.to_empty(device="cpu")  # non-persistent RoPE buffer: not in the checkpoint
    model.rotary.reset_parameters()
    tokenizer = Tokenizer.from_str(checkpoint["tokenizer"]) if checkpoint.get("tokenizer") else None
    return model.float(), tokenizer


def is_sharded_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / _DCP_METADATA).is_file()


def read_sharded_checkpoint(path: str | Path) -> dict[str, Any]:
    """A sharded checkpoint directory as the dict a single-device Trainer saves (all of it in CPU memory):
    weights under "state_dict", optimizer states as the "optimizer_states" list, keyed by parameter position."""
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise InputError(f"{path} is a directory but not a sharded checkpoint (no {_DCP_METADATA} file of "
                         "torch.distributed.checkpoint in it)")
    checkpoint = _load_distributed_checkpoint(path)  # DCP shards + meta.pt, read without a process group
    if "model" in checkpoint:  # FSDPStrategy's name for the weights; ModelParallelStrategy uses "state_dict"
        checkpoint["state_dict"] = checkpoint.pop("model")
    optimizer_keys = sorted((k for k in checkpoint if re.fullmatch(r"optimizer_\d+", k)), key=lambda k: int(k[10:]))
    if optimizer_keys:
        checkpoint["optimizer_states"] = [_keyed_by_position(checkpoint.pop(k)) for k in optimizer_keys]
    return checkpoint


def _keyed_by_position(optimizer_state: dict) -> dict:
    """An optimizer state dict keyed by parameter name (as torch.distributed.checkpoint stores it) keyed by the
    parameter's position in the param groups instead, as `torch.optim.Optimizer.state_dict` keys it."""
    groups = optimizer_state.get("param_groups", [])
    names = [name for group in groups for name in group["params"]]
    if not names or not all(isinstance(name, str) for name in names):
        return optimizer_state
    position = {name: i for i, name in enumerate(names)}
    return {
        "state": {position[name]: value for name, value in optimizer_state.get("state", {}).items()},
        "param_groups": [{**group, "params": [position[name] for name in group["params"]]} for group in groups],
    }


def consolidate_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Write the sharded checkpoint directory `src` as one checkpoint file `dst` (written atomically) that
    `read_checkpoint`, `moe export`, `--model.init_from` and `Trainer.fit(ckpt_path=...)` accept."""
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise FileNotFoundError(f"no sharded checkpoint directory at {src}")
    if dst.resolve() == src.resolve() or dst.is_dir():
        raise InputError(f"{dst} is a directory: give the path of the .ckpt file to write")
    atomic_save(read_checkpoint(src), dst)
    return dst


def init_config(config: ModelConfig, init_from: str | None) -> ModelConfig:
    """The architecture of a run started from `init_from` (an HF model directory or a checkpoint of ours), with the
    runtime fields of `config` (how the model runs or trains, not its weights); `config` itself without one."""
    if init_from is None:
        return config
    path = Path(init_from).expanduser()
    if path.is_dir():
        from moe.hf import read_hf_config
        from moe.hf_config import config_from_hf

        base = config_from_hf(read_hf_config(path))
    elif path.is_file():
        base = checkpoint_config(read_checkpoint(path))
    else:
        raise FileNotFoundError(f"LanguageModel.init_from={init_from}: no such HF model directory or checkpoint file")
    return base.replace(**{name: getattr(config, name) for name in runtime_fields()})


def init_model(config: ModelConfig, init_from: str | None) -> Transformer:
    """A model of `config` (from `init_config`) on the default device: freshly initialised, or holding the weights
    of `init_from`."""
    device = torch.get_default_device()
    if init_from is None:
        return Transformer(config)
    path = Path(init_from).expanduser()
    if path.is_dir():
        from moe.hf import load_hf_checkpoint

        runtime = {name: getattr(config, name) for name in runtime_fields()}
        return load_hf_checkpoint(path, device=device, dtype=torch.float32, **runtime)
    model = Transformer(config)
    # Verified when init_config read its config: one read of a large file, not two.
    weights = checkpoint_weights(read_checkpoint(path, map_location=device, verify=False))
    model.load_state_dict(_fit_selection_bias(weights, model, init_from))
    return model


def _fit_selection_bias(weights: dict[str, torch.Tensor], model: Transformer, init_from: str) -> dict:
    """The checkpoint's weights for a model whose selection bias (ModelConfig.router_bias_update_rate, a runtime
    field) may be on where the checkpoint's was off, or off where it was on: a bias the checkpoint lacks starts at
    zero, and one the model lacks is dropped when zero and refused otherwise, since the weights route with it."""
    ours = {name for name, _ in model.named_buffers() if name.endswith(SELECTION_BIAS)}
    theirs = {name for name in weights if name.endswith(SELECTION_BIAS)}
    if any(bool(weights[name].any()) for name in theirs - ours):
        raise ConfigError(f"ModelConfig.router_bias_update_rate={model.config.router_bias_update_rate} turns off the "
                          f"expert selection bias that the weights of LanguageModel.init_from={init_from} route with "
                          "(it is nonzero): keep router_bias_update_rate on to start from them",
                          "router_bias_update_rate")
    kept = {name: tensor for name, tensor in weights.items() if name not in theirs - ours}
    return {**kept, **{name: model.get_buffer(name) for name in ours - theirs}}
