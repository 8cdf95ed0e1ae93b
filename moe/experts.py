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
from torch.distributed.tensor import DTensor

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _group_sizes(counts: torch.Tensor, rows: int, n_experts: int) -> list[int]:
    """counts as Python ints (the one host sync), checked: rows the groups do not cover would be left as
    uninitialised memory in the output, not caught as the shape error of a split."""
    sizes = counts.tolist()
    if len(sizes) != n_experts or sum(sizes) != rows:
        raise ValueError(f"{len(sizes)} group sizes summing to {sum(sizes)} for {n_experts} experts and {rows} rows")
    return sizes


@torch.library.custom_op("moe::segment_mm", mutates_args=())
def segment_mm(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x (M, K) grouped by expert, weight (E, N, K) in nn.Linear layout, counts (E,) -> (M, N): rows of group e
    times weight[e].T, one matmul per expert written in place into the output.

    An opaque operator to torch.compile, so that a compiled block keeps the experts in its graph instead of
    breaking around them and specialising on each step's group sizes (which are data, read here with one
    host sync); the same idea as transformers' grouped_mm fallback."""
    out = x.new_empty(x.shape[0], weight.shape[1])
    start = 0
    for e, n in enumerate(_group_sizes(counts, x.shape[0], weight.shape[0])):
        if n:
            torch.mm(x[start:start + n], weight[e].T, out=out[start:start + n])
        start += n
    return out


@segment_mm.register_fake
def _(x, weight, counts):
    return x.new_empty(x.shape[0], weight.shape[1])


@torch.library.custom_op("moe::segment_mm_weight_grad", mutates_args=())
def segment_mm_weight_grad(x: torch.Tensor, grad: torch.Tensor, counts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """The weight gradient of segment_mm: (E, N, K) with block e = grad[group e].T @ x[group e], zero for an expert
    with no rows (it still gets a gradient, which sharded data parallelism needs from every parameter)."""
    out = x.new_empty(n_experts, grad.shape[1], x.shape[1])
    start = 0
    for e, n in enumerate(_group_sizes(counts, x.shape[0], n_experts)):
        if n:
            torch.mm(grad[start:start + n].T, x[start:start + n], out=out[e])
        else:
            out[e].zero_()
        start += n
    return out


@segment_mm_weight_grad.register_fake
def _(x, grad, counts, n_experts):
    return x.new_empty(n_experts, grad.shape[1], x.shape[1])


def _segment_mm_setup(ctx, inputs, output):
    x, weight, counts = inputs
    ctx.save_for_backward(x, weight, counts)


def _segment_mm_backward(ctx, grad):
    x, weight, counts = ctx.saved_tensors
    grad = grad.contiguous()
    grad_x = segment_mm(grad, weight.transpose(1, 2), counts) if ctx.needs_input_grad[0] else None
    grad_w = segment_mm_weight_grad(x, grad, counts, weight.shape[0]) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None


segment_mm.register_autograd(_segment_mm_backward, setup_context=_segment_mm_setup)


def as_autocast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors in autocast's dtype when autocast is on: neither our custom operator nor torch's grouped matmul
    is on autocast's list, so without this the experts, most of an MoE model's FLOPs, would run in float32 under
    bf16-mixed. Cast as autocast casts a matmul's operands."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) for t in tensors)


def loop_experts(x, counts, gate_proj, up_proj, down_proj) -> torch.Tensor:
    """x (M, D) grouped by expert, counts (E,) -> (M, D): one matmul per expert and projection (segment_mm).
    Experts with no rows still enter the graph. Without autograd, eagerly, the same matmuls run expert by expert
    (inference_experts)."""
    x, gate_proj, up_proj, down_proj = as_autocast(x, gate_proj, up_proj, down_proj)
    if not _needs_graph(x, gate_proj, up_proj, down_proj):
        return inference_experts(x, counts, gate_proj, up_proj, down_proj)
    hidden = F.silu(segment_mm(x, gate_proj, counts)) * segment_mm(x, up_proj, counts)  # (M, F)
    return segment_mm(hidden, down_proj, counts)  # (M, D)


def _needs_graph(*tensors: torch.Tensor) -> bool:
    """Whether the experts must run as segment_mm: for autograd, or inside a compiled graph (whose group sizes
    must stay data, not Python ints)."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return grad or torch.compiler.is_compiling()


def inference_experts(x, counts, gate_proj, up_proj, down_proj) -> torch.Tensor:
    """loop_experts without autograd: each expert's whole SwiGLU on its rows before the next expert's, the
    activation applied in place. loop_experts' three passes over all M rows write and read back two (M, F)
    intermediates, several MB for evaluation batches, out of cache; one expert's stay in cache. The same matmuls
    and elementwise operations on the same rows, so the same numbers: bit for bit when F is a multiple of 32, as in
    the MoE presets (elementwise kernels compute a tensor's ragged end, here each expert's, by a scalar path that
    may round the last bit differently). On 2 CPU cores it cuts the expert time of an evaluation by a fifth;
    fusing the gate and up projections into one matmul gained nothing more (docs/benchmarks.md)."""
    out = x.new_empty(x.shape[0], down_proj.shape[1])  # (M, D)
    sizes = _group_sizes(counts, x.shape[0], gate_proj.shape[0])
    gate_buffer = x.new_empty(max(sizes, default=0), gate_proj.shape[1])  # (rows of the largest group, F)
    up_buffer = torch.empty_like(gate_buffer)
    start = 0
    for e, n in enumerate(sizes):
        if n:
            rows = x[start:start + n]
            gate = torch.mm(rows, gate_proj[e].T, out=gate_buffer[:n])  # (n, F)
            hidden = F.silu(gate, inplace=True).mul_(torch.mm(rows, up_proj[e].T, out=up_buffer[:n]))
            torch.mm(hidden, down_proj[e].T, out=out[start:start + n])
        start += n
    return out


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
    x, gate_proj, up_proj, down_proj = as_autocast(x, gate_proj, up_proj, down_proj)
    if x.dtype != torch.bfloat16 and torch.compiler.is_compiling():
        # torch's shape (meta) function for grouped matmul accepts only bf16 (torch 2.13), so torch.compile cannot
        # trace an fp32 one; the loop's operator computes the same products and stays in the compiled graph.
        return loop_experts(x, counts, gate_proj, up_proj, down_proj)
    offsets = counts.cumsum(0).to(torch.int32)  # end row of each group, stays on the device
    gate = _grouped_mm(x, gate_proj.transpose(-2, -1), offs=offsets)  # (M, F)
    up = _grouped_mm(x, up_proj.transpose(-2, -1), offs=offsets)  # (M, F)
    out = _grouped_mm(F.silu(gate) * up, down_proj.transpose(-2, -1), offs=offsets)  # (M, D)
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
        """x (M, D) grouped by expert and counts (E_local,) -> (M, D). Under expert parallelism the weights are
        DTensors sharded by expert over the expert-parallel processes, and this process runs its own slice."""
        kernel = EXPERT_KERNELS[self.backend]
        return kernel(x, counts, *(_local(w) for w in (self.gate_proj, self.up_proj, self.down_proj)))


def _local(weight: torch.Tensor) -> torch.Tensor:
    return weight.to_local() if isinstance(weight, DTensor) else weight
