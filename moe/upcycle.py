"""Sparse upcycling (Komatsuzaki et al. 2023, "Sparse Upcycling: Training Mixture-of-Experts from Dense
Checkpoints"): build an MoE model from a dense one by copying its feed-forward block into every expert.

Everything else (embeddings, attention, norms, output layer, and the feed-forward block of each layer the
config's layer pattern keeps dense) is copied unchanged. The router is new: normal init as in the paper, or zeros,
which routes uniformly; with Mixtral's top-k renormalisation a uniform router weighs k identical experts by 1/k
each, so the upcycled model starts out computing exactly the dense function.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moe.model import Transformer


@torch.no_grad()
def upcycle(
    dense: Transformer | str | Path,
    n_experts: int = 8,
    top_k: int = 2,
    router_init: str = "normal",
    **config_overrides,
) -> Transformer:
    """An MoE copy of a dense model (or of a dense HF checkpoint directory) with n_experts copies of its MLP."""
    if isinstance(dense, (str, Path)):
        from moe.hf import load_hf_checkpoint

        dense = load_hf_checkpoint(dense)
    if dense.config.is_moe:
        raise ValueError(f"upcycle expects a dense model, got one with n_experts={dense.config.n_experts}")
    if router_init not in ("normal", "zeros"):
        raise ValueError(f"router_init must be 'normal' or 'zeros', got {router_init!r}")
    config = dense.config.replace(
        n_experts=n_experts, top_k=top_k, expert_ffn_dim=dense.config.ffn_dim, **config_overrides
    )
    device = dense.embed_tokens.weight.device
    with torch.device("meta"):
        moe = Transformer(config)
    moe.to_empty(device=device)
    moe.reset_parameters()
    moe.to(dense.embed_tokens.weight.dtype)

    dense_state = dense.state_dict()
    moe_state = moe.state_dict()
    for key, value in dense_state.items():
        if ".mlp." not in key:
            moe_state[key].copy_(value)
    for i, block in enumerate(dense.layers):
        if not config.is_moe_layer(i):  # a layer the pattern keeps dense (ModelConfig.first_k_dense, ...) is copied
            moe.layers[i].mlp.load_state_dict(block.mlp.state_dict())
            continue
        experts = moe.layers[i].mlp.experts
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(experts, name).copy_(getattr(block.mlp, name).weight.expand_as(getattr(experts, name)))
        if router_init == "zeros":
            moe.layers[i].mlp.router.gate.weight.zero_()
    return moe
