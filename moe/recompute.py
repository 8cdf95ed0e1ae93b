"""Whether the forward pass running now is activation checkpointing's recomputation of a block.

A forward that issues a collective whose result is not an activation (the load-balancing loss's global expert
counts) must not issue it again when the block is recomputed in the backward pass: the recomputation reuses what
the first pass got. The training code's checkpoint wrapper (moe.train.parallel.recompute_blocks) enters
`recomputation()` around each recomputation, through torch.utils.checkpoint's `context_fn`.
"""

from __future__ import annotations

import contextlib
import threading

_state = threading.local()


def recomputing() -> bool:
    return getattr(_state, "depth", 0) > 0


@contextlib.contextmanager
def recomputation():
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1
