"""GPU checks and first timings of the model core, in one run sized for a short device lease.

Checks (each section is independent; a failure is recorded and the rest still runs):
1. attention: every kernel (sdpa, flex compiled, eager, auto) against a float64 reference, forward and
   backward, for windows shorter than, equal to and longer than the sequence, in bf16 and fp32;
2. experts: the grouped backend against the loop reference in bf16 (outputs and weight gradients), with an
   expert that receives no rows; fp32 grouped on CUDA;
3. no host-device synchronisation in the grouped MoE layer's forward and backward
   (torch.cuda.set_sync_debug_mode("error"));
4. a bf16 model with a sliding window: auto (FlexAttention) agrees with eager; 30 AdamW steps lower the loss;
   torch.compile of the model runs;
5. timings (median of triton's do_bench): MoE layer forward+backward at the moe-bench shape, eager and
   compiled, grouped and loop; attention at T=8192, W=1024.

Usage: PYTHONPATH=. python bench/gpu_check.py [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import traceback

import torch

from moe.attention import attend
from moe.config import ModelConfig
from moe.experts import grouped_experts, loop_experts
from moe.model import build_model
from moe.moe_layer import MoELayer

results: dict = {"device": None, "torch": torch.__version__, "python": platform.python_version(), "checks": {}}


def record(section: str, name: str, value) -> None:
    results["checks"].setdefault(section, {})[name] = value
    print(f"[{section}] {name}: {value}", flush=True)


def section(fn):
    def run():
        try:
            fn()
        except Exception:  # noqa: BLE001 (a failed section is a result, not the end of the lease)
            record(fn.__name__, "EXCEPTION", traceback.format_exc(limit=6))
    return run


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def reference_attention(q, k, v, window):
    """float64 causal (windowed) attention with an explicit mask and repeated kv heads."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    T = q.shape[-2]
    i = torch.arange(T, device=q.device)
    delta = i[:, None] - i[None, :]
    allowed = (delta >= 0) & ((delta < window) if window is not None else True)
    scores = (q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


@section
def attention():
    torch.manual_seed(0)
    B, H, K, C = 2, 8, 2, 64
    for dtype, lengths in ((torch.bfloat16, (1000, 2048)), (torch.float32, (1000,))):
        for T in lengths:
            for window in (None, 256, T, 4096):
                q = torch.randn(B, H, T, C, device="cuda", dtype=dtype, requires_grad=True)
                k = torch.randn(B, K, T, C, device="cuda", dtype=dtype, requires_grad=True)
                v = torch.randn(B, K, T, C, device="cuda", dtype=dtype, requires_grad=True)
                grad_out = torch.randn(B, H, T, C, device="cuda", dtype=dtype)
                ref = reference_attention(q, k, v, window)
                ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out.double())
                for backend in ("sdpa", "flex", "eager", "auto"):
                    out = attend(q, k, v, window, backend)
                    grads = torch.autograd.grad(out, (q, k, v), grad_out)
                    errs = [rel_err(out, ref)] + [rel_err(g, r) for g, r in zip(grads, ref_grads)]
                    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
                    ok = all(e < tol for e in errs) and torch.isfinite(out).all().item()
                    record("attention", f"{str(dtype)[6:]} T={T} W={window} {backend}",
                           f"{'ok' if ok else 'FAIL'} max rel err {max(errs):.1e}")


@section
def experts():
    torch.manual_seed(0)
    E, D, F, M = 8, 1024, 2816, 16384
    counts = torch.tensor([3000, 0, 5000, 1, 2000, 4000, 383, 2000], device="cuda")
    assert counts.sum().item() == M
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(M, D, device="cuda", dtype=dtype, requires_grad=True)
        weights = [(torch.randn(E, F, D, device="cuda") / D**0.5).to(dtype).requires_grad_(),
                   (torch.randn(E, F, D, device="cuda") / D**0.5).to(dtype).requires_grad_(),
                   (torch.randn(E, D, F, device="cuda") / F**0.5).to(dtype).requires_grad_()]
        grad_out = torch.randn(M, D, device="cuda", dtype=dtype)
        ref = loop_experts(x.double(), counts, *[w.double() for w in weights])
        ref_grads = torch.autograd.grad(ref, [x] + weights, grad_out.double())
        for name, fn in (("loop", loop_experts), ("grouped", grouped_experts)):
            try:
                out = fn(x, counts, *weights)
                grads = torch.autograd.grad(out, [x] + weights, grad_out)
            except Exception as err:  # noqa: BLE001 (fp32 grouped matmul may be unsupported on this torch)
                record("experts", f"{str(dtype)[6:]} {name}", f"unsupported: {str(err).splitlines()[0][:160]}")
                continue
            errs = [rel_err(out, ref)] + [rel_err(g, r) for g, r in zip(grads, ref_grads)]
            empty_grad_zero = all(g[1].abs().max().item() == 0 for g in grads[1:])
            tol = 2e-2 if dtype == torch.bfloat16 else 1e-3
            ok = all(e < tol for e in errs) and empty_grad_zero
            record("experts", f"{str(dtype)[6:]} {name}",
                   f"{'ok' if ok else 'FAIL'} max rel err {max(errs):.1e}, empty expert grad zero={empty_grad_zero}")


def moe_bench_layer(backend: str) -> MoELayer:
    config = ModelConfig(vocab_size=32000, d_model=1024, n_layers=12, n_heads=16, n_kv_heads=4, ffn_dim=2816,
                         n_experts=8, top_k=2, expert_backend=backend)
    layer = MoELayer(config).cuda().to(torch.bfloat16)
    for p in layer.parameters():
        torch.nn.init.normal_(p, 0, 0.02)
    return layer


@section
def no_host_sync():
    layer = moe_bench_layer("grouped")
    x = torch.randn(8, 2048, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for _ in range(2):  # the first call may initialise handles
        out, stats = layer(x)
        loss = out.float().square().mean() + 0.01 * stats.load_balancing_loss + 0.001 * stats.z_loss
        loss.backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, stats = layer(x)
        loss = out.float().square().mean() + 0.01 * stats.load_balancing_loss + 0.001 * stats.z_loss
        loss.backward()
        record("no_host_sync", "grouped MoE layer fwd+bwd", "ok: no synchronising call")
    except RuntimeError as err:
        record("no_host_sync", "grouped MoE layer fwd+bwd", f"FAIL: {str(err).splitlines()[0][:200]}")
    finally:
        torch.cuda.set_sync_debug_mode(0)


@section
def model():
    torch.manual_seed(0)
    model = build_model("tiny-moe", d_model=256, n_layers=4, sliding_window=128, max_seq_len=512,
                        device="cuda").to(torch.bfloat16)
    tokens = torch.randint(0, model.config.vocab_size, (4, 512), device="cuda")
    auto = model(tokens).logits
    for block in model.layers:
        block.self_attn.backend = "eager"
    eager = model(tokens).logits
    for block in model.layers:
        block.self_attn.backend = "auto"
    record("model", "auto (flex) vs eager logits rel err", f"{rel_err(auto, eager):.1e}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        out = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        (loss + 0.01 * out.aux_loss + 0.001 * out.z_loss).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    record("model", "loss first -> last of 30 steps", f"{losses[0]:.3f} -> {losses[-1]:.3f}")
    compiled = torch.compile(model)
    out = compiled(tokens[:, :-1])
    out.logits.float().mean().backward()
    record("model", "torch.compile fwd+bwd", f"ok, logits finite={torch.isfinite(out.logits).all().item()}")


@section
def timings():
    import triton.testing

    def bench(fn) -> float:
        return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")

    # MoE layer at the moe-bench shape: 16k tokens, D 1024, F 2816, 8 experts top-2.
    N, D, F, k = 16384, 1024, 2816, 2
    flops = 3 * 2 * N * k * 3 * D * F  # forward + backward (2x) of three matmuls per assignment
    x = torch.randn(8, 2048, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)
    for backend, compile_it in (("loop", False), ("grouped", False), ("grouped", True)):
        layer = moe_bench_layer(backend)
        fn = torch.compile(layer) if compile_it else layer

        def step(fn=fn):
            out, _ = fn(x)
            out.backward(grad)

        ms = bench(step)
        record("timings", f"MoE layer fwd+bwd {backend}{' compiled' if compile_it else ''}",
               f"{ms:.2f} ms, {flops / ms / 1e9:.0f} TFLOP/s")

    # Attention at T=8192, W=1024, 16 heads of 64, batch 2.
    B, H, T, C, W = 2, 16, 8192, 64, 1024
    q, k_, v = (torch.randn(B, H, T, C, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn(B, H, T, C, device="cuda", dtype=torch.bfloat16)
    for label, backend, window in (("sdpa full causal", "sdpa", None), ("sdpa window mask", "sdpa", W),
                                   ("flex window", "flex", W)):
        def step(window=window, backend=backend):
            attend(q, k_, v, window, backend).backward(g)

        record("timings", f"attention fwd+bwd {label}", f"{bench(step):.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="gpu_check.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_check.py needs a CUDA GPU")
    results["device"] = torch.cuda.get_device_name()
    torch._dynamo.config.cache_size_limit = 64  # one compiled FlexAttention per shape and dtype checked
    for check in (attention, experts, no_host_sync, model, timings):
        check()
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    failures = [f"{s}: {n}" for s, checks in results["checks"].items() for n, v in checks.items()
                if "FAIL" in str(v) or n == "EXCEPTION"]
    print(f"\n{results['device']}, torch {torch.__version__}: {len(failures)} failures")
    for failure in failures:
        print("  " + failure)


if __name__ == "__main__":
    main()
