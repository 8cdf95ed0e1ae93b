"""The model summary printed when a fit starts: what the model is, in one line.

Lightning's table lists the LightningModule's one child (`model`) and a FLOPs column that reads 0 unless the module
sets an example input; the figures a pre-training run is planned by are the total and active parameters and the
training FLOPs per token, which the config computes exactly (the counts `moe presets` prints).
"""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelSummary

from moe.config import format_count


def describe(config) -> str:
    """'tiny-moe: 4 layers, width 128, 8 experts top-2; 853K parameters, 590K active per token; 3.3M training
    FLOPs per token (PaLM formula, 256-token sequences)'."""
    experts = f", {config.n_experts} experts top-{config.top_k}" if config.is_moe else ""
    active = f", {format_count(config.num_active_params())} active per token" if config.is_moe else ""
    return (f"{config.name}: {config.n_layers} layers, width {config.d_model}{experts}; "
            f"{format_count(config.num_params())} parameters{active}; "
            f"{format_count(int(config.flops_per_token()))} training FLOPs per token "
            f"(PaLM formula, {config.max_seq_len}-token sequences)")


class ModelOverview(ModelSummary):
    """Prints `describe(model_config)` on global rank zero when a fit starts, in place of Lightning's table."""

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and getattr(pl_module, "model_config", None) is not None:
            print(f"model {describe(pl_module.model_config)}", flush=True)
