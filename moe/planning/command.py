"""`moe plan` (python cli.py plan): the command line of moe.planning. Errors name the flag and are ValueErrors,
which cli.py prints as one line with exit status 2."""

from __future__ import annotations

import argparse

from moe.planning.hardware import GPUS, get_gpu
from moe.planning.memory import PRECISIONS
from moe.planning.plan import load_model_config, make_plan
from moe.planning.report import format_plan, plan_json

_SUFFIXES = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12, "P": 1e15}


def parse_amount(flag: str, text: str | None) -> float | None:
    """'1.4e12', '1.4T' or '3.8e25' as a float; a ValueError naming the flag otherwise."""
    if text is None:
        return None
    value = text.strip()
    scale = _SUFFIXES.get(value[-1:].upper(), 1.0) if value else 1.0
    try:
        number = float(value[:-1] if scale != 1.0 else value) * scale
    except ValueError:
        raise ValueError(f"{flag} {text!r} is not a number (e.g. 1.4e12 or 1.4T)") from None
    if number <= 0:
        raise ValueError(f"{flag} must be positive, got {text}")
    return number


def plan(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="moe plan", description="Plan a training run: parameters, FLOPs, "
                                     "compute-optimal size and tokens (Chinchilla, Kaplan), memory per GPU under "
                                     "each shipped strategy and the largest micro-batch that fits, wall-clock "
                                     "time and GPU-hours.")
    parser.add_argument("model", metavar="MODEL", help="a preset (python cli.py presets), a model YAML "
                        "(configs/model/llama-65b.yaml) or an HF model directory holding config.json")
    parser.add_argument("--tokens", help="token budget, e.g. 1.4e12 or 1.4T (give this or --flops)")
    parser.add_argument("--flops", help="compute budget in training FLOPs, e.g. 3.8e25 (give this or --tokens)")
    parser.add_argument("--gpu", default="h100-80gb", help=f"GPU type: {', '.join(GPUS)} (default h100-80gb)")
    parser.add_argument("--gpus", type=int, default=8, help="number of GPUs (default 8)")
    parser.add_argument("--mfu", type=float, default=None, help="model FLOPs utilisation, 0-1 (default: the "
                        "card's in docs/benchmarks.md, else 0.40)")
    parser.add_argument("--tokens-per-gpu-s", type=float, default=None, help="measured training throughput per "
                        "GPU; sets the MFU it implies")
    parser.add_argument("--seq-len", type=int, default=None, help="training sequence length (default: the "
                        "model's max_seq_len)")
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16-mixed", help="Lightning precision "
                        "(default bf16-mixed, as configs/trainer/gpu.yaml)")
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per step for the memory "
                        "table (default 1)")
    parser.add_argument("--headroom", type=float, default=0.1, help="fraction of GPU memory left for the CUDA "
                        "context, NCCL and fragmentation (default 0.1)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="for HYBRID_SHARD (default 8)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(argv)
    tokens, flops = parse_amount("--tokens", args.tokens), parse_amount("--flops", args.flops)
    if (tokens is None) == (flops is None):
        raise ValueError("give exactly one budget: --tokens (e.g. 1.4e12) or --flops (e.g. 3.8e25)"
                         + (", not both" if tokens is not None else ""))
    for flag, value in (("--gpus", args.gpus), ("--micro-batch", args.micro_batch)):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if args.mfu is not None and not 0 < args.mfu <= 1:
        raise ValueError(f"--mfu must be in (0, 1], got {args.mfu}")
    if not 0 <= args.headroom < 1:
        raise ValueError(f"--headroom must be in [0, 1), got {args.headroom}")
    try:
        get_gpu(args.gpu)
    except ValueError as error:
        raise ValueError(f"--gpu: {error}") from None
    try:
        config = load_model_config(args.model)
    except (ValueError, FileNotFoundError) as error:
        raise ValueError(f"MODEL: {error}") from None
    result = make_plan(config, tokens=tokens, flops=flops, gpu=args.gpu, n_gpus=args.gpus, mfu=args.mfu,
                       tokens_per_gpu_s=args.tokens_per_gpu_s, seq_len=args.seq_len, precision=args.precision,
                       micro_batch=args.micro_batch, headroom=args.headroom, gpus_per_node=args.gpus_per_node)
    print(plan_json(result) if args.json else format_plan(result))


def ladder(argv: list[str]) -> None:
    from moe.planning.ladder_command import run_ladder  # matplotlib and the CLI only for this command

    parser = argparse.ArgumentParser(prog="moe ladder", description="Train a ladder of model sizes (each rung an "
                                     "ordinary fit in its own run folder, resumable), fit L(N) = E + A/N^alpha and "
                                     "L(C) to their final validation losses, predict the held-out target rung with "
                                     "a 95% interval, and for a dense and an MoE family report the MoE's compute "
                                     "multiplier. Writes <out>/ladder.json and <out>/ladder.png.")
    parser.add_argument("ladder", metavar="LADDER", help="a ladder file, e.g. configs/ladder/cpu.yaml")
    parser.add_argument("--out", default=None, help="folder of the rungs' runs and the results (default: the "
                        "ladder file's out, else runs/ladder/<its name>)")
    parser.add_argument("--fit-only", action="store_true", help="train nothing: fit and report the finished rungs")
    parser.add_argument("--dry-run", action="store_true", help="print each rung's size, budget and fit command "
                        "(writing the settings file it names) and stop")
    parser.add_argument("--families", nargs="+", default=None, metavar="FAMILY", help="train only these families "
                        "(all are fitted)")
    args = parser.parse_args(argv)
    run_ladder(args.ladder, out=args.out, fit_only=args.fit_only, dry_run=args.dry_run, families=args.families)
