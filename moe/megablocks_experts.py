"""Optional MegaBlocks backend for the routed experts (Gale et al. 2022, "MegaBlocks: Efficient Sparse
Training with Mixture-of-Experts"). GPU only.

It runs the grouped GEMM that MegaBlocks' dMoE uses for `mlp_impl='grouped'` (layers/glu.py, GroupedGLU):
`megablocks.grouped_gemm_util.ops.gmm`, which is the `grouped_gemm` package's autograd-aware `gmm(a, b,
batch_sizes, trans_b=False)`. Written against megablocks 0.10.0, whose `gg` extra pins grouped_gemm 0.3.0;
the same module and call have been there since megablocks 0.5. Both packages build CUDA extensions and
megablocks pins an old torch (0.10.0: torch 2.7), so install them by hand on a CUDA machine, without deps.

Conventions of `gmm` (grouped_gemm 0.3.0, csrc/grouped_gemm.cu `GroupedGemm` and grouped_gemm/ops.py):
- a (M, K) is the rows grouped by expert, batch_sizes (E,) the rows of each group: a 1-D int64 tensor that
  must live on the CPU (the cuBLAS build reads the sizes on the host; GroupedGLU passes
  `tokens_per_expert.cpu().to(torch.long)`);
- b (E, K, N), or (E, N, K) with trans_b=True, so trans_b=True takes nn.Linear's per-expert (out, in) weights;
- a, b contiguous CUDA bfloat16 tensors: bf16 is the only dtype the kernels take.
MegaBlocks keeps w1 (gate), v1 (up) and w2 (down) as (E*F, D) matrices and views them as (E, F, D): our gate_proj
and up_proj are exactly those views (GroupedGLU calls gmm(x, w1, trans_b=True)); its w2 is our down_proj
transposed per expert, so where GroupedGLU calls gmm(h, w2) we call gmm(h, down_proj, trans_b=True).
"""

from __future__ import annotations

import importlib
import importlib.util

import torch
import torch.nn.functional as F

MEGABLOCKS_VERSION = "0.10.0"  # the release this backend follows
GROUPED_GEMM_VERSION = "0.3.0"  # what megablocks 0.10.0's `gg` extra pins

_INSTALL = (
    f"On a CUDA machine run `pip install --no-deps megablocks=={MEGABLOCKS_VERSION} stanford-stk==0.7.1` and "
    f"`pip install --no-deps --no-build-isolation grouped_gemm=={GROUPED_GEMM_VERSION}` (megablocks pins an "
    "older torch and both build CUDA extensions), or choose expert_backend='grouped'."
)


def megablocks_available() -> bool:
    return importlib.util.find_spec("megablocks") is not None


def grouped_gemm_available() -> bool:
    return importlib.util.find_spec("grouped_gemm") is not None


def require_megablocks() -> None:
    """Raise a clear ImportError, without importing anything heavy, unless both packages are installed."""
    if not megablocks_available():
        raise ImportError(
            "expert_backend='megablocks' needs the megablocks package, which is not installed. " + _INSTALL
        )
    if not grouped_gemm_available():
        raise ImportError(
            "expert_backend='megablocks' runs MegaBlocks' grouped GEMM, which needs the grouped_gemm package "
            "(megablocks' `gg` extra), and it is not installed. " + _INSTALL
        )


def _gmm():
    """MegaBlocks' grouped GEMM, imported on first use."""
    require_megablocks()
    try:
        grouped_gemm_util = importlib.import_module("megablocks.grouped_gemm_util")
    except ImportError as error:
        if error.name == "megablocks.grouped_gemm_util":
            raise ImportError(
                "this megablocks has no megablocks.grouped_gemm_util; expert_backend='megablocks' follows "
                f"megablocks {MEGABLOCKS_VERSION} (the module exists from 0.5 on). " + _INSTALL
            ) from error
        raise ImportError(f"megablocks is installed but failed to import ({error}). " + _INSTALL) from error
    ops = getattr(grouped_gemm_util, "ops", None)  # None when megablocks could not import grouped_gemm
    if ops is None:
        raise ImportError("megablocks could not import the grouped_gemm package. " + _INSTALL)
    return ops.gmm


def _check_device(x: torch.Tensor) -> None:
    if not x.is_cuda:
        raise ValueError(f"expert_backend='megablocks' runs on CUDA tensors only, got x on {x.device}")


def megablocks_grouped_experts(x, counts, gate_proj, up_proj, down_proj) -> torch.Tensor:
    """x (M, D) grouped by expert, counts (E,) -> (M, D) = down(silu(gate(x)) * up(x)) per expert, with
    three of MegaBlocks' grouped GEMMs. Computes in bf16 (the kernels' only dtype) and returns x's dtype.

    Unlike the 'grouped' backend this synchronises with the host: the group sizes must be on the CPU, so
    counts is copied there every call (GroupedGLU does the same), which waits for the GPU to produce it.
    Experts with no rows still get a (zero) gradient: the weight-gradient GEMM writes every expert's block.
    """
    gmm = _gmm()
    _check_device(x)
    batch_sizes = counts.cpu().to(torch.long)  # host copy: a device sync when counts is on the GPU
    dtype = torch.bfloat16

    def bf16(t: torch.Tensor) -> torch.Tensor:  # no-op for contiguous bf16 tensors, else a differentiable cast
        return t.to(dtype).contiguous()

    rows = bf16(x)
    gate = gmm(rows, bf16(gate_proj), batch_sizes, trans_b=True)  # (M, F)
    up = gmm(rows, bf16(up_proj), batch_sizes, trans_b=True)  # (M, F)
    hidden = (F.silu(gate) * up).contiguous()  # (M, F)
    out = gmm(hidden, bf16(down_proj), batch_sizes, trans_b=True)  # (M, D)
    return out.to(x.dtype)
