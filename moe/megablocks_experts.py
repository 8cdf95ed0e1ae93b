"""Optional MegaBlocks backend for the routed experts (Gale et al. 2022, "MegaBlocks: Efficient Sparse
Training with Mixture-of-Experts"). GPU only; megablocks pins an old torch, so install it with
`pip install --no-deps megablocks` on a CUDA machine."""

from __future__ import annotations

import importlib.util


def megablocks_available() -> bool:
    return importlib.util.find_spec("megablocks") is not None


def require_megablocks() -> None:
    if not megablocks_available():
        raise ImportError(
            "expert_backend='megablocks' needs the megablocks package, which is not installed. "
            "On a CUDA machine run `pip install --no-deps megablocks` (it pins an older torch), "
            "or choose expert_backend='grouped'."
        )


def megablocks_grouped_experts(x, counts, gate_proj, up_proj, down_proj):
    raise NotImplementedError  # filled in below
