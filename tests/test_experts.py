"""moe.experts: the 'grouped' backend against the 'loop' reference, and both against a per-row oracle that finds
each row's expert by walking the group boundaries and applies that expert's SwiGLU directly.

Shapes: M grouped rows, D model dim, F expert hidden dim, E experts.
"""

from __future__ import annotations

import pytest
import torch

import moe.experts as experts_module
from moe.experts import Experts, inference_experts

E, D, FFN = 4, 16, 24
COUNTS = {
    "balanced": [3, 3, 3, 3],
    "empty_experts": [0, 7, 0, 5],
    "all_on_first": [12, 0, 0, 0],
    "all_on_last": [0, 0, 0, 12],
    "random": None,  # drawn below from a seeded generator
}


def counts_for(name: str) -> torch.Tensor:
    if COUNTS[name] is not None:
        return torch.tensor(COUNTS[name])
    gen = torch.Generator().manual_seed(3)
    return torch.bincount(torch.randint(0, E, (29,), generator=gen), minlength=E)


def make_experts(backend: str, seed: int = 0) -> Experts:
    experts = Experts(E, D, FFN, backend)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return experts


def oracle(x, counts, gate_proj, up_proj, down_proj) -> torch.Tensor:
    """Row by row: the expert is the first e with row < counts[0] + ... + counts[e]; SwiGLU written out."""
    ends = torch.cumsum(counts, 0).tolist()
    rows = []
    for r in range(x.shape[0]):
        e = next(e for e, end in enumerate(ends) if r < end)
        gate = gate_proj[e] @ x[r]  # (F,)
        hidden = gate * torch.sigmoid(gate) * (up_proj[e] @ x[r])
        rows.append(down_proj[e] @ hidden)
    return torch.stack(rows)


def run(backend: str, counts: torch.Tensor, upstream: str):
    """Output and gradients (x, gate, up, down) of one backend on fixed inputs."""
    experts = make_experts(backend)
    x = torch.randn(int(counts.sum()), D, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out = experts(x, counts)
    if upstream == "sum":  # an expanded, zero-stride gradient
        out.sum().backward()
    else:
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
    return out, [x.grad, experts.gate_proj.grad, experts.up_proj.grad, experts.down_proj.grad]


@pytest.mark.parametrize("counts_name", list(COUNTS))
@pytest.mark.parametrize("backend", ["loop", "grouped"])
def test_experts_match_per_row_oracle(backend, counts_name):
    counts = counts_for(counts_name)
    experts = make_experts(backend)
    x = torch.randn(int(counts.sum()), D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = oracle(x, counts, experts.gate_proj, experts.up_proj, experts.down_proj)
        torch.testing.assert_close(experts(x, counts), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("upstream", ["random", "sum"])
@pytest.mark.parametrize("counts_name", list(COUNTS))
def test_grouped_matches_loop_outputs_and_gradients(counts_name, upstream):
    counts = counts_for(counts_name)
    out_loop, grads_loop = run("loop", counts, upstream)
    out_grouped, grads_grouped = run("grouped", counts, upstream)
    torch.testing.assert_close(out_grouped, out_loop, atol=1e-5, rtol=1e-5)
    for name, g, want in zip(["x", "gate_proj", "up_proj", "down_proj"], grads_grouped, grads_loop):
        torch.testing.assert_close(g, want, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.parametrize("counts_name", list(COUNTS))
@pytest.mark.parametrize("backend", ["loop", "grouped"])
def test_every_expert_gets_a_gradient_zero_iff_it_had_no_rows(backend, counts_name):
    counts = counts_for(counts_name)
    _, grads = run(backend, counts, "random")
    for name, grad in zip(["gate_proj", "up_proj", "down_proj"], grads[1:]):
        assert grad is not None, name
        for e in range(E):
            if counts[e] == 0:
                assert torch.count_nonzero(grad[e]) == 0, f"{name}[{e}] got a gradient without rows"
            else:
                assert grad[e].abs().sum() > 0, f"{name}[{e}] got no gradient from its {counts[e]} rows"


@pytest.mark.parametrize("backend", ["loop", "grouped"])
def test_gradients_match_oracle(backend):
    counts = counts_for("empty_experts")
    _, grads = run(backend, counts, "random")
    experts = make_experts("loop")
    x = torch.randn(int(counts.sum()), D, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out = oracle(x, counts, experts.gate_proj, experts.up_proj, experts.down_proj)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
    expected = [x.grad, experts.gate_proj.grad, experts.up_proj.grad, experts.down_proj.grad]
    for g, want in zip(grads, expected):
        torch.testing.assert_close(g, want, atol=1e-5, rtol=1e-5)


def test_experts_store_weights_in_linear_layout():
    experts = Experts(E, D, FFN, "loop")
    assert experts.n_experts == E
    assert experts.gate_proj.shape == experts.up_proj.shape == (E, FFN, D)
    assert experts.down_proj.shape == (E, D, FFN)


def test_auto_backend_takes_the_loop_on_cpu(monkeypatch):
    import moe.experts as experts_module

    calls = []
    for name in ("loop_experts", "grouped_experts"):
        original = getattr(experts_module, name)
        monkeypatch.setattr(experts_module, name,
                            lambda *args, _name=name, _f=original: calls.append(_name) or _f(*args))
    x = torch.randn(6, 16)
    counts = torch.tensor([2, 0, 4])
    weights = [torch.randn(3, 8, 16), torch.randn(3, 8, 16), torch.randn(3, 16, 8)]
    torch.testing.assert_close(experts_module.auto_experts(x, counts, *weights),
                               experts_module.loop_experts(x, counts, *weights))
    assert calls[0] == "loop_experts"


@pytest.mark.parametrize("backend", ["loop", "grouped"])
def test_fp32_experts_compile_without_graph_breaks_and_match_eager(backend):
    """segment_mm is an opaque operator to torch.compile: fullgraph=True raises on any graph break, and the group
    sizes, which are data, must not be baked into the compiled graph (two different routings, one compile). The
    grouped backend, whose fp32 grouped matmul torch.compile cannot trace, compiles through the same operator."""
    torch._dynamo.reset()
    experts = make_experts(backend)
    compiled = torch.compile(experts, fullgraph=True, dynamic=False)
    for counts_name in ("empty_experts", "all_on_last"):
        counts = counts_for(counts_name)
        x = torch.randn(int(counts.sum()), D, generator=torch.Generator().manual_seed(1), requires_grad=True)
        eager_out = experts(x, counts)
        eager_grads = torch.autograd.grad(eager_out.square().sum(), [x, *experts.parameters()])
        out = compiled(x, counts)
        grads = torch.autograd.grad(out.square().sum(), [x, *experts.parameters()])
        torch.testing.assert_close(out, eager_out, atol=1e-5, rtol=1e-5)
        for g, want in zip(grads, eager_grads):
            torch.testing.assert_close(g, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["loop", "grouped"])
def test_backend_follows_autocast(backend):
    """Neither custom operators nor torch's grouped matmul are autocast; the experts cast as a matmul under autocast
    would, or bf16-mixed would run them in float32."""
    counts = counts_for("random")
    experts = make_experts(backend)
    x = torch.randn(int(counts.sum()), D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = experts(x, counts)
    assert out.dtype == torch.bfloat16
    with torch.no_grad():
        expected = oracle(x, counts, experts.gate_proj, experts.up_proj, experts.down_proj)
    torch.testing.assert_close(out.float(), expected, atol=5e-2, rtol=5e-2)


def test_loop_backend_refuses_group_sizes_that_do_not_cover_the_rows():
    experts = make_experts("loop")
    x = torch.randn(10, D)
    with pytest.raises(ValueError, match="4 group sizes summing to 9 for 4 experts and 10 rows"):
        experts(x, torch.tensor([3, 3, 3, 0]))
    with pytest.raises(ValueError, match="3 group sizes summing to 10 for 4 experts"):
        experts(x, torch.tensor([4, 3, 3]))


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("counts_name", list(COUNTS))
def test_inference_kernel_equals_the_autograd_loop_bit_for_bit(counts_name, autocast):
    """Without autograd the loop backend runs expert by expert (inference_experts): the same matmuls and
    elementwise operations as segment_mm's three passes, so evaluation scores do not move by a bit. F is a
    multiple of 32, as in the MoE presets: elementwise kernels round a ragged tail by a scalar path (with FFN = 24
    the two differ in the last bit, which the oracle test above allows)."""
    counts = counts_for(counts_name)
    experts = Experts(E, D, 64, "loop")
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.3)
    x = torch.randn(int(counts.sum()), D, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        with_graph = experts(x.clone().requires_grad_(), counts)  # parameters and x need gradients: segment_mm
        with torch.inference_mode():
            without = experts(x, counts)
    assert without.dtype == with_graph.dtype == (torch.bfloat16 if autocast else torch.float32)
    assert torch.equal(without, with_graph.detach())


@pytest.mark.parametrize("context", ["grad", "no_grad", "inference_mode", "frozen"])
def test_loop_backend_takes_the_inference_kernel_only_without_autograd(context, monkeypatch):
    calls = []
    monkeypatch.setattr(experts_module, "inference_experts",
                        lambda *args: calls.append("inference") or inference_experts(*args))
    experts = make_experts("loop")
    counts = counts_for("random")
    x = torch.randn(int(counts.sum()), D)
    if context == "frozen":
        experts.requires_grad_(False)
    manager = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(context)
    with manager() if manager else torch.enable_grad():
        out = experts(x, counts)
    assert calls == ([] if context == "grad" else ["inference"])
    assert out.requires_grad == (context == "grad")


def test_inference_kernel_checks_group_sizes():
    experts = make_experts("loop")
    with torch.no_grad(), pytest.raises(ValueError, match="4 group sizes summing to 9 for 4 experts and 10 rows"):
        experts(torch.randn(10, D), torch.tensor([3, 3, 3, 0]))
    with torch.no_grad():
        assert experts(torch.randn(0, D), torch.zeros(E, dtype=torch.long)).shape == (0, D)
