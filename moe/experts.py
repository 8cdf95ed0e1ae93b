"""Routed experts: E SwiGLU feed-forward networks with stacked weights, and the kernels that run them.

The experts know nothing about routing. They take the assignments already grouped by expert (rows of expert 0
first, then expert 1, ...) and the number of rows per expert, the layout grouped-GEMM kernels want.
Weights follow nn.Linear's (out, in) convention per expert, so HF's per-expert matrices stack without a
transpose: gate_proj (E, F, D) = Mixtral w1, up_proj (E, F, D) = w3, down_proj (E, D, F) = w2.

Backends (ModelConfig.expert_backend; 'auto', the default, is grouped on GPU and the loop on CPU):
- 'loop': one matmul per expert; the reference every other backend is tested against. Syncs with the host.
- 'grouped': torch's grouped matmul (F.grouped_mm / torch._grouped_mm) over the jagged groups, one kernel per
  projection and no host-device synchronisation; has a CPU path from torch 2.9.
- 'megablocks': MegaBlocks' grouped GEMM (GPU only, optional dependency; see moe/megablocks_experts.py).
Every expert's weights take part in the graph on every step, so each gets a gradient (zero when it received no
rows); sharded data-parallel strategies hang if some rank's parameter has no gradient.
Shapes: M grouped rows (N tokens x k choices), D model dim, F expert hidden dim, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def loop_experts(x, counts, gate_proj, up_proj, down_proj) -> torch.Tensor:
    """x (M, D) grouped by expert, counts (E,) -> (M, D). Experts with no rows still enter the graph."""
    # unbind, not gate_proj[e]: indexing expert e has a backward that fills a zero (E, F, D) gradient and adds it
    # into the accumulated one, E times per weight; unbind's backward stacks the E slices' gradients once.
    outputs = []
    weights = zip(gate_proj.unbind(0), up_proj.unbind(0), down_proj.unbind(0))
    for rows, (gate, up, down) in zip(x.split(counts.tolist()), weights):
        hidden = F.silu(rows @ gate.T) * (rows @ up.T)  # (M_e, F)
        outputs.append(hidden @ down.T)  # (M_e, D)
    return torch.cat(outputs)


@torch.compiler.disable
def _grouped_mm_eager(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return _grouped_mm(a, b, offs=offs)


def _gmm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    # torch's shape (meta) function for grouped matmul accepts only bf16 (torch 2.13), so torch.compile cannot
    # trace an fp32 one: it runs eagerly behind a graph break, and the rest of the block still compiles.
    if a.dtype != torch.bfloat16 and torch.compiler.is_compiling():
        return _grouped_mm_eager(a, b, offs)
    return _grouped_mm(a, b, offs=offs)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: grouped matmul's backward rejects a
    gradient with zero or unaligned strides, such as the expanded one that `out.sum().backward()` sends."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_experts(x, counts, gate_proj, up_proj, down_proj) -> torch.Tensor:
    """x (M, D) grouped by expert, counts (E,) -> (M, D) with three grouped matmuls."""
    if _grouped_mm is None:
        raise RuntimeError(f"expert_backend='grouped' needs torch >= 2.9 (found {torch.__version__})")
    offsets = counts.cumsum(0).to(torch.int32)  # end row of each group, stays on the device
    gate = _gmm(x, gate_proj.transpose(-2, -1), offsets)  # (M, F)
    up = _gmm(x, up_proj.transpose(-2, -1), offsets)  # (M, F)
    out = _gmm(F.silu(gate) * up, down_proj.transpose(-2, -1), offsets)  # (M, D)
    return _ContiguousGrad.apply(out)


def megablocks_experts(x, counts, gate_proj, up_proj, down_proj) -> torch.Tensor:
    from moe.megablocks_experts import megablocks_grouped_experts

    return megablocks_grouped_experts(x, counts, gate_proj, up_proj, down_proj)


def auto_experts(x, counts, gate_proj, up_proj, down_proj) -> torch.Tensor:
    """Grouped matmul on GPU (no host sync); the loop on CPU, where torch's grouped matmul is the slower of the two
    (forward 21-22K vs 28K tokens/s for tiny-moe at 4K tokens, 2 cores, torch 2.13) and a sync costs nothing.
    Widths that grouped matmul cannot align (not multiples of 8) also take the loop."""
    aligned = x.shape[-1] % 8 == 0 and gate_proj.shape[1] % 8 == 0
    kernel = grouped_experts if x.is_cuda and aligned and _grouped_mm is not None else loop_experts
    return kernel(x, counts, gate_proj, up_proj, down_proj)


EXPERT_KERNELS = {"auto": auto_experts, "loop": loop_experts, "grouped": grouped_experts,
                  "megablocks": megablocks_experts}


class Experts(nn.Module):
    def __init__(self, n_experts: int, d_model: int, ffn_dim: int, backend: str = "grouped"):
        super().__init__()
        if backend == "megablocks":
            from moe.megablocks_experts import require_megablocks

            require_megablocks()
        self.backend = backend
        self.gate_proj = nn.Parameter(torch.empty(n_experts, ffn_dim, d_model))  # (E, F, D)
        self.up_proj = nn.Parameter(torch.empty(n_experts, ffn_dim, d_model))  # (E, F, D)
        self.down_proj = nn.Parameter(torch.empty(n_experts, d_model, ffn_dim))  # (E, D, F)

    @property
    def n_experts(self) -> int:
        return self.gate_proj.shape[0]

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        kernel = EXPERT_KERNELS[self.backend]
        return kernel(x, counts, self.gate_proj, self.up_proj, self.down_proj)
