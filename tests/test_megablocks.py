"""The optional MegaBlocks expert backend: clear errors without it, its call conventions on the CPU (against a
stand-in that enforces grouped_gemm's checks), and, where megablocks and a GPU are present, the real kernels
against the loop reference."""

from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest
import torch

import moe.megablocks_experts as mb
from moe.experts import Experts, loop_experts
from moe.model import build_model

E, D, FF = 4, 64, 96
COUNTS = [5, 0, 9, 3]  # expert 1 gets no rows


def make_inputs(dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    M = sum(COUNTS)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_()

    x = rand(M, D)
    gate, up = rand(E, FF, D, scale=D**-0.5), rand(E, FF, D, scale=D**-0.5)
    down = rand(E, D, FF, scale=FF**-0.5)
    counts = torch.tensor(COUNTS, device=device)
    return x, counts, gate, up, down


def outputs_and_grads(kernel, x, counts, gate, up, down, seed=1):
    out = kernel(x, counts, gate, up, down)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    grads = torch.autograd.grad(out, (x, gate, up, down), grad_out)
    return out, grads


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


# ---------------------------------------------------------------------------------------- missing packages
@pytest.mark.parametrize("missing", ["megablocks", "grouped_gemm"])
def test_missing_package_raises_import_error_with_install_hint(monkeypatch, missing):
    monkeypatch.setattr(mb, "megablocks_available", lambda: missing != "megablocks")
    monkeypatch.setattr(mb, "grouped_gemm_available", lambda: missing != "grouped_gemm")
    for build in (
        lambda: Experts(E, D, FF, backend="megablocks"),
        lambda: build_model("tiny-moe", expert_backend="megablocks"),
    ):
        with pytest.raises(ImportError) as info:
            build()
        message = str(info.value)
        assert missing in message and "pip install" in message and "megablocks==" in message


@pytest.mark.skipif(mb.megablocks_available(), reason="megablocks is installed here")
def test_megablocks_absent_here_raises_import_error():
    with pytest.raises(ImportError, match="pip install --no-deps megablocks"):
        Experts(E, D, FF, backend="megablocks")
    with pytest.raises(ImportError, match="pip install --no-deps megablocks"):
        build_model("tiny-moe", expert_backend="megablocks")


# ---------------------------------------------------- call conventions, against a stand-in for the kernels
def fake_gmm(a, b, batch_sizes, trans_b=False):
    """grouped_gemm 0.3.0's ops.gmm, as its C++ checks (csrc/grouped_gemm.cu, GroupedGemm) and its maths read,
    with the CUDA checks left out so that it runs on the CPU."""
    assert batch_sizes.device.type == "cpu" and batch_sizes.dtype == torch.int64 and batch_sizes.ndim == 1
    assert a.dtype == torch.bfloat16 and b.dtype == torch.bfloat16
    assert a.ndim == 2 and b.ndim == 3 and a.is_contiguous() and b.is_contiguous()
    assert batch_sizes.shape[0] == b.shape[0] and int(batch_sizes.sum()) == a.shape[0]
    assert (b.shape[2] if trans_b else b.shape[1]) == a.shape[1]
    groups = a.split(batch_sizes.tolist())
    out = [rows.float() @ (w.T if trans_b else w).float() for rows, w in zip(groups, b)]
    return torch.cat(out).to(torch.bfloat16)


@pytest.fixture
def fake_megablocks(monkeypatch):
    """Stand-in megablocks package whose grouped_gemm_util.ops.gmm is fake_gmm; the real one is never imported."""
    package = types.ModuleType("megablocks")
    package.__spec__ = importlib.machinery.ModuleSpec("megablocks", None, is_package=True)
    package.__path__ = []
    util = types.ModuleType("megablocks.grouped_gemm_util")
    util.ops = types.SimpleNamespace(gmm=fake_gmm)
    package.grouped_gemm_util = util
    monkeypatch.setitem(sys.modules, "megablocks", package)
    monkeypatch.setitem(sys.modules, "megablocks.grouped_gemm_util", util)
    monkeypatch.setattr(mb, "megablocks_available", lambda: True)
    monkeypatch.setattr(mb, "grouped_gemm_available", lambda: True)
    return util


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_call_conventions_match_loop_reference(fake_megablocks, monkeypatch, dtype):
    monkeypatch.setattr(mb, "_check_device", lambda x: None)
    inputs = make_inputs(dtype)
    out, grads = outputs_and_grads(mb.megablocks_grouped_experts, *inputs)
    ref_out, ref_grads = outputs_and_grads(loop_experts, *make_inputs(torch.float32))
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert rel_err(out, ref_out) < 2e-2
    for name, grad, ref in zip(("x", "gate_proj", "up_proj", "down_proj"), grads, ref_grads):
        assert grad.dtype == dtype, name
        assert rel_err(grad, ref) < 2e-2, name
    for grad in grads[1:]:  # the expert with no rows gets an exact zero gradient
        assert torch.count_nonzero(grad[1]) == 0


def test_cpu_input_is_refused(fake_megablocks):
    with pytest.raises(ValueError, match="CUDA"):
        mb.megablocks_grouped_experts(*make_inputs())


def test_megablocks_without_grouped_gemm_util(monkeypatch, fake_megablocks):
    monkeypatch.delitem(sys.modules, "megablocks.grouped_gemm_util")
    with pytest.raises(ImportError, match=f"megablocks {mb.MEGABLOCKS_VERSION}"):
        mb.megablocks_grouped_experts(*make_inputs())


def test_megablocks_that_could_not_import_grouped_gemm(fake_megablocks):
    fake_megablocks.ops = None  # what megablocks.grouped_gemm_util holds when `import grouped_gemm` failed
    with pytest.raises(ImportError, match="grouped_gemm"):
        mb.megablocks_grouped_experts(*make_inputs())


# ------------------------------------------------------------------------------------ the real kernels
@pytest.mark.skipif(
    not (mb.megablocks_available() and mb.grouped_gemm_available() and torch.cuda.is_available()),
    reason="needs megablocks, grouped_gemm and a CUDA device",
)
def test_megablocks_matches_loop_in_bf16_on_cuda():
    inputs = make_inputs(torch.bfloat16, "cuda")
    out, grads = outputs_and_grads(mb.megablocks_grouped_experts, *inputs)
    ref_out, ref_grads = outputs_and_grads(loop_experts, *make_inputs(torch.bfloat16, "cuda"))
    assert out.dtype == torch.bfloat16 and out.shape == ref_out.shape
    assert rel_err(out, ref_out) < 2e-2  # bf16 keeps 8 bits of mantissa: ~4e-3 per rounding
    for name, grad, ref in zip(("x", "gate_proj", "up_proj", "down_proj"), grads, ref_grads):
        assert rel_err(grad, ref) < 2e-2, name
    for grad in grads[1:]:  # the expert with no rows gets an exact zero gradient, not stale memory
        assert torch.count_nonzero(grad[1]) == 0

    # Through the module, with float32 parameters (cast to bf16 for the kernels) and all rows on one expert.
    experts = Experts(E, D, FF, backend="megablocks").cuda()
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(12, D, device="cuda")
    counts = torch.tensor([0, 12, 0, 0], device="cuda")
    out = experts(x, counts)
    ref = loop_experts(x, counts, experts.gate_proj, experts.up_proj, experts.down_proj)
    assert out.dtype == torch.float32 and rel_err(out, ref) < 2e-2
    out.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in experts.parameters())
