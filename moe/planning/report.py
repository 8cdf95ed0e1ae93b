"""The plan as one readable table (`moe plan`) or JSON (`moe plan --json`)."""

from __future__ import annotations

import json

from moe.planning.plan import Plan


def count(n: float) -> str:
    """1.4e12 -> '1.40T'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def _gib(x: float) -> str:
    return f"{x:.1f}"


def format_plan(plan: Plan) -> str:
    lines = [(f"moe plan: {plan.model}{' (MoE)' if plan.is_moe else ''}, {count(plan.tokens)} tokens of "
             f"{plan.seq_len}, on {plan.n_gpus} x {plan.gpu}, {plan.precision}"), ""]
    rows = [
        ("parameters", (f"{count(plan.params_total)} total, {count(plan.params_active)} active per token, "
                       f"{count(plan.params_non_embedding)} active non-embedding")),
        ("FLOPs per token", (f"{count(plan.flops_per_token)} (PaLM, as MFU counts them); "
                            f"{count(plan.flops_per_token_6n)} (6N, as the scaling laws do)")),
        ("tokens", f"{count(plan.tokens)} ({plan.tokens_per_param:.1f} per active parameter)"),
        ("training FLOPs", f"{plan.flops:.3g} (PaLM); {plan.flops_6n:.3g} (6ND)"),
        ("GPU peak, MFU", (f"{plan.peak_tflops:g} TFLOP/s ({plan.gpu} datasheet, dense); MFU {plan.mfu:.1%} "
                          f"({plan.mfu_source})")),
        ("wall clock", f"{plan.days:.1f} days ({plan.seconds / 3600:.1f} h) on {plan.n_gpus} GPUs"),
        ("GPU-hours", count(plan.gpu_hours)),
    ]
    width = max(len(name) for name, _ in rows)
    lines += [f"{name:<{width}}  {value}" for name, value in rows]

    lines += ["", f"Compute-optimal allocation of C = {plan.flops_6n:.3g} FLOPs (6ND)",
              f"{'law':<32}{'params':>10}{'tokens':>10}{'tokens/param':>14}{'loss':>8}"]
    for a in plan.allocations:
        lines.append(f"{a.law:<32}{count(a.params):>10}{count(a.tokens):>10}{a.tokens / a.params:>14.3g}"
                     f"{a.loss:>8.3f}")
    lines.append(f"{'this run (Chinchilla L(N, D))':<32}{count(plan.params_active):>10}{count(plan.tokens):>10}"
                 f"{plan.tokens_per_param:>14.3g}{plan.chinchilla_loss:>8.3f}")
    lines.append(f"Kaplan's N is non-embedding parameters; for this run L(N) = {plan.kaplan_loss_n:.3f}, "
                 f"L(D) = {plan.kaplan_loss_d:.3f} (WebText2 nats, not comparable with Chinchilla's).")
    lines.append("Compute-optimal tokens for this model's size: " + ", ".join(
        f"{law} {count(tokens)}" for law, tokens in plan.optimal_tokens_for_model.items()))

    usable = plan.gpu_memory_gib * (1 - plan.headroom)
    lines += ["", (f"Memory per GPU, GiB ({plan.gpu}: {plan.gpu_memory_gib:g}, {usable:.1f} usable with "
                  f"{plan.headroom:.0%} headroom); micro-batch {plan.micro_batch} x {plan.seq_len} tokens; "
                  "ckpt = activation checkpointing of every block (* = the shipped config's choice)")]
    header = (f"{'strategy':<28}{'weights':>8}{'grads':>8}{'optim':>8}{'buffers':>8}{'act':>8}{'act ckpt':>9}"
              f"{'total':>8}{'tot ckpt':>9}  {'fits':<11}{'max mb':>7}{'mb ckpt':>8}")
    lines += [header, "-" * len(header)]
    for m in plan.memory:
        fits = ("yes" if m.fits else "no") + "/" + ("yes" if m.fits_checkpointed else "no")
        star = ("", "*") if m.checkpointing_default else ("*", "")
        host = f"  host {m.host:.1f}" if m.host else ""
        lines.append(f"{m.label:<28}{_gib(m.weights):>8}{_gib(m.gradients):>8}{_gib(m.optimizer):>8}"
                     f"{_gib(m.buffers):>8}{_gib(m.activations) + star[0]:>8}"
                     f"{_gib(m.activations_checkpointed) + star[1]:>9}{_gib(m.total):>8}{_gib(m.total_checkpointed):>9}"
                     f"  {fits:<11}{m.max_micro_batch:>7}{m.max_micro_batch_checkpointed:>8}{host}")
    for name, reason in plan.not_applicable.items():
        lines.append(f"{name:<28}not applicable: {reason}")
    lines += ["", "fits: without / with checkpointing; max mb: the largest micro-batch (sequences per GPU) that fits.",
              "buffers: gathered weights, unsharded gradients before their reduce-scatter, DeepSpeed's buckets.",
              ("act: saved for backward, with (bf16-mixed, except FSDPStrategy which gathers bf16) autocast's bf16 "
              "copy of every block's matmul weights (one block with ckpt)."),
              *plan.notes]
    return "\n".join(lines)


def plan_json(plan: Plan) -> str:
    return json.dumps(plan.to_dict(), indent=2)
