"""Expert parallelism against plain FSDP2 on one multi-GPU machine: tokens/s (global and per GPU), MFU, peak GPU
memory per process and the all-to-all's row imbalance of the moe-bench model (bench/train_speed.py's GPU MoE config:
12 layers, width 1024, 8 experts top-2 of FFN 2816) trained under ModelParallelStrategy with expert_parallel_size 1
(FSDP2, configs/strategy/fsdp2.yaml) and with each P in {2, 4, 8} that divides the GPU count and n_experts
(configs/strategy/fsdp2-ep.yaml with P), on every visible GPU.

    PYTHONPATH=. python bench/ep_speed.py                     # prints a table, writes bench/results/ep_speed.json
    PYTHONPATH=. python bench/ep_speed.py --precision 32-true  # fp32 weights, TF32 matmuls
    PYTHONPATH=. python bench/ep_speed.py --dry-run --gpus 8   # the plan only (runs on a CPU)
    PYTHONPATH=. python bench/ep_speed.py --cpu-smoke          # 2 gloo CPU processes, a tiny MoE: the code path

With fewer than 2 GPUs it says so, writes a skip record and exits 0.

Every layout trains LanguageModel from the same seeded weights on the same global batches: process r of N takes
batches r, N + r, 2N + r, ... of train_speed.make_batches (moe-bench's 8 x 2048 tokens per process), the same
AdamW settings (constant learning rate) and clipping at 1.0, in bf16-mixed by default (configs/trainer/gpu.yaml).
Every layout runs the same arithmetic, so the first step's loss must agree across layouts (to 1e-4 relative in fp32,
2e-2 in bf16-mixed) or the run exits 1: a fast wrong answer is no result. Step times are taken at the end of every
batch after a device synchronisation, Lightning's whole loop included; a step's time is the slowest process's, and
the figure is the median over the timed steps after the warm-up. MFU is the PaLM count (ModelConfig.flops_per_token)
per GPU against moe.train.throughput's datasheet peak. The row imbalance is the rows the busiest process's experts
ran over the mean over processes, summed over the timed steps, the worst MoE layer (1.0 without EP by construction).

Each layout runs in its own subprocess (`--only P`), in which Lightning launches one process per device by re-running
the command: a process group cannot be torn down and rebuilt for another layout reliably.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from importlib.metadata import version
from pathlib import Path

import torch
from train_speed import BETAS, CONFIGS, EPS, LR, WEIGHT_DECAY, machine, make_batches, sync

from bench.results_file import write_results
from moe.config import ModelConfig, format_count

RESULTS = Path(__file__).parent / "results" / "ep_speed.json"
SMOKE_RESULTS = Path(__file__).parent / "results" / "ep_speed_cpu-smoke.json"
EP_SIZES = (2, 4, 8)
GRADIENT_CLIP = 1.0
BENCH = dict(config="moe-bench", model=CONFIGS["moe-bench"]["model"], batch_size=CONFIGS["moe-bench"]["batch_size"],
             seq_len=CONFIGS["moe-bench"]["seq_len"], warmup=5, steps=20, device="cuda", precision="bf16-mixed",
             layout_timeout=180)
SMOKE = dict(config="cpu-smoke", batch_size=2, seq_len=32, warmup=1, steps=2, device="cpu", precision="32-true",
             layout_timeout=120, processes=2, ep_sizes=[1, 2],
             model=dict(name="cpu-smoke", vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                        max_seq_len=32, n_experts=4, top_k=2, expert_ffn_dim=64))


def layout_name(ep: int) -> str:
    return "fsdp2" if ep == 1 else f"fsdp2-ep{ep}"


def skip_reason(ep: int, processes: int, n_experts: int) -> str | None:
    if processes < 2:
        return f"needs at least 2 GPUs, found {processes}"
    if processes % ep:
        return f"EP {ep} does not divide the {processes} GPUs"
    if n_experts % ep:
        return f"EP {ep} does not divide the model's {n_experts} experts"
    return None


def model_config(args) -> ModelConfig:
    fields = dict(args.model)
    fields["max_seq_len"] = max(fields["max_seq_len"], args.seq_len)
    return ModelConfig(**fields)


# ------------------------------------------------------------------------------------------------ one layout
def run_layout(args) -> None:
    """Fit warmup + steps optimizer steps with expert_parallel_size args.only on args.processes devices; rank 0
    writes each step's time (the slowest process's), loss, peak memory and expert rows per process to args.out."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from moe.train import LanguageModel
    from moe.train.strategies import ModelParallelStrategy

    config, world, total = model_config(args), args.processes, args.warmup + args.steps
    batches = make_batches(config.vocab_size, total * world, args.batch_size, args.seq_len)

    class RankBatches(pl.LightningDataModule):
        def train_dataloader(self):
            # Global batch s is batches[s*N : (s+1)*N] whatever the layout (N data-parallel processes: no TP here).
            return DataLoader(batches[self.trainer.global_rank::world], batch_size=None)

    class Measure(pl.Callback):
        def __init__(self):
            self.times, self.losses, self.rows = [], [], None

        def on_train_start(self, trainer, module):
            sync(args.device)
            self.times.append(time.perf_counter())

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            sync(args.device)
            self.times.append(time.perf_counter())
            self.losses.append(float(trainer.callback_metrics["train/loss"]))  # the global batch's cross-entropy
            if batch_idx >= args.warmup:
                rows = torch.stack([s.rows_received for s in outputs["moe"]]).double()  # (L,) rows run here
                self.rows = rows if self.rows is None else self.rows + rows

        def on_train_end(self, trainer, module):
            device, strategy = module.device, trainer.strategy
            steps = torch.tensor([b - a for a, b in zip(self.times, self.times[1:])], dtype=torch.float64)
            cuda = device.type == "cuda"
            memory = torch.tensor([torch.cuda.max_memory_allocated(device) if cuda else -1,
                                   torch.cuda.max_memory_reserved(device) if cuda else -1], dtype=torch.float64)
            steps, rows, memory = (strategy.all_gather(t.to(device)).cpu() for t in (steps, self.rows, memory))
            if trainer.is_global_zero:  # (N, steps), (N, L), (N, 2)
                args.out.write_text(json.dumps({
                    "processes": trainer.world_size, "step_times_s": steps.max(dim=0).values.tolist(),
                    "losses": self.losses, "rows_per_process": rows.tolist(),
                    "peak_memory_allocated_bytes": memory[:, 0].tolist() if cuda else None,
                    "peak_memory_reserved_bytes": memory[:, 1].tolist() if cuda else None}))

    if args.device == "cuda" and args.precision == "32-true":
        torch.set_float32_matmul_precision("high")  # TF32, the peak MFU is counted against
    pl.seed_everything(0)  # every process builds the same weights; FSDP2 shards each process's own copy
    module = LanguageModel(config, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, schedule="constant",
                           warmup_steps=0)
    strategy = ModelParallelStrategy(data_parallel_size="auto", tensor_parallel_size=1,
                                     expert_parallel_size=args.only)
    trainer = pl.Trainer(accelerator="gpu" if args.device == "cuda" else "cpu", devices=world, strategy=strategy,
                         precision=args.precision, max_steps=total, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, use_distributed_sampler=False, gradient_clip_val=GRADIENT_CLIP,
                         callbacks=[Measure()])
    trainer.fit(module, datamodule=RankBatches())


def launch_layout(ep: int, args, out: Path) -> dict:
    """Run one layout in a subprocess (a session of its own, so a hung one is killed with the processes Lightning
    started); its record, or {"failed": why}."""
    command = [sys.executable, __file__, "--only", str(ep), "--out", str(out), *args.passed]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        log, _ = process.communicate(timeout=args.layout_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        log, _ = process.communicate()
        return {"failed": f"timed out after {args.layout_timeout} s\n{log[-2000:]}"}
    finally:  # also when this process is stopped (SIGTERM from run_gpu.sh's timeout): leave no GPU held
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    if process.returncode != 0 or not out.is_file():
        return {"failed": f"exit {process.returncode}\n{log[-2000:]}"}
    return {**json.loads(out.read_text()), "wall_s": time.perf_counter() - start}


# ------------------------------------------------------------------------------------------------ the figures
def summarise(result: dict, ep: int, args, config: ModelConfig, peak: float | None) -> dict:
    timed = result["step_times_s"][args.warmup:]
    median, processes = statistics.median(timed), result["processes"]
    rate = args.batch_size * args.seq_len * processes / median
    flops = config.flops_per_token(args.seq_len) * rate / processes
    rows = torch.tensor(result["rows_per_process"])  # (N, L)
    imbalance = rows.max(dim=0).values / rows.mean(dim=0)  # (L,)
    memory = result["peak_memory_allocated_bytes"]
    return {"expert_parallel_size": ep, **result, "median_step_s": median, "min_step_s": min(timed),
            "tokens_per_s": rate, "tokens_per_s_per_gpu": rate / processes, "tflops_per_gpu": flops / 1e12,
            "mfu": flops / (peak * 1e12) if peak else None,
            "peak_memory_allocated_gib_max": max(memory) / 2**30 if memory else None,
            "rows_max_over_mean": float(imbalance.max()), "rows_max_over_mean_per_layer": imbalance.tolist()}


def compare(layouts: dict, precision: str) -> list[str]:
    """Each layout against FSDP2: speed-up and loss differences; the problems that void the run."""
    reference = layouts.get("fsdp2", {})
    tolerance = 1e-4 if precision == "32-true" else 2e-2
    problems = [f"{name} failed: {result['failed'].splitlines()[0]}" for name, result in layouts.items()
                if "failed" in result]
    for name, result in layouts.items():
        if "losses" not in result:
            continue
        if not all(math.isfinite(loss) for loss in result["losses"]):
            problems.append(f"{name}: a loss is not finite: {result['losses']}")
        if "losses" in reference:
            first, ref = result["losses"][0], reference["losses"][0]
            result["speedup_vs_fsdp2"] = result["tokens_per_s"] / reference["tokens_per_s"]
            result["max_abs_loss_diff_vs_fsdp2"] = max(abs(a - b) for a, b in zip(result["losses"],
                                                                                    reference["losses"]))
            if not abs(first - ref) <= tolerance * abs(ref):
                problems.append(f"{name}: first-step loss {first:.6f} disagrees with fsdp2's {ref:.6f} "
                                f"(relative tolerance {tolerance}): the layouts do not train the same model")
    return problems


def print_table(layouts: dict, unit: str) -> None:
    print(f"\n{'layout':<12}{'EP':>4}{unit + 's':>6}{'step ms':>10}{'tokens/s':>12}{'per ' + unit:>10}{'vs fsdp2':>10}"
          f"{'TFLOP/s/' + unit:>13}{'MFU':>7}{'peak GiB':>10}{'rows max/mean':>15}{'loss 1':>9}")
    for name, r in layouts.items():
        if "tokens_per_s" not in r:
            why = r.get("skipped") or r["failed"].splitlines()[0]
            print(f"{name:<12}  {'skipped' if 'skipped' in r else 'FAILED'}: {why}")
            continue
        line = (f"{name:<12}{r['expert_parallel_size']:>4}{r['processes']:>6}{r['median_step_s'] * 1e3:>10.1f}"
                f"{r['tokens_per_s']:>12.0f}{r['tokens_per_s_per_gpu']:>10.0f}")
        line += f"{r['speedup_vs_fsdp2']:>9.2f}x" if "speedup_vs_fsdp2" in r else f"{'':>10}"
        line += f"{r['tflops_per_gpu']:>13.2f}" + (f"{r['mfu']:>7.1%}" if r["mfu"] is not None else f"{'':>7}")
        memory = r["peak_memory_allocated_gib_max"]
        line += f"{memory:>10.1f}" if memory is not None else f"{'-':>10}"
        print(line + f"{r['rows_max_over_mean']:>15.3f}{r['losses'][0]:>9.4f}")


# ------------------------------------------------------------------------------------------------ main
def plan(config: ModelConfig, args, ep_sizes: list[int]) -> str:
    tokens = args.batch_size * args.seq_len
    lines = [
        (f"{args.config}: {config.n_layers} layers, width {config.d_model}, {config.n_experts} experts top-"
         f"{config.top_k} of FFN {config.expert_ffn_dim}, vocabulary {config.vocab_size}; "
         f"{format_count(config.num_params())} parameters, {format_count(config.num_active_params())} active, "
         f"{config.flops_per_token(args.seq_len) / 1e9:.2f} GFLOP/token for training"),
        (f"  {args.processes} {'GPUs' if args.device == 'cuda' else 'gloo CPU processes'}, {args.precision}; "
         f"{args.batch_size} x {args.seq_len} = {tokens} tokens per process and step, {tokens * args.processes} "
         f"global; {args.warmup} warm-up + {args.steps} timed steps per layout; AdamW lr {LR}, clipping "
         f"{GRADIENT_CLIP}; ModelParallelStrategy(data_parallel_size='auto', tensor_parallel_size=1, "
         "expert_parallel_size=P)"),
    ]
    for ep in ep_sizes:
        reason = skip_reason(ep, args.processes, config.n_experts)
        lines.append(f"  {layout_name(ep):<12} expert_parallel_size={ep}" + (f"  [skip: {reason}]" if reason else ""))
    lines.append(f"  writes {args.results}")
    return "\n".join(lines)


def environment(args) -> dict:
    gpus = args.processes if args.device == "cuda" else 0
    nccl = torch.cuda.nccl.version() if gpus else None
    return {"date": str(date.today()), "config": args.config, "device": args.device,
            "gpu": machine("cuda") if gpus else None, "gpus": gpus, "visible_gpus": torch.cuda.device_count(),
            "cpu_processes": args.processes if args.device == "cpu" else 0, "cpu": machine("cpu"),
            "torch": torch.__version__, "cuda": torch.version.cuda, "lightning": version("lightning"),
            "nccl": ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precision", choices=["bf16-mixed", "32-true"], default=None,
                        help="default bf16-mixed (configs/trainer/gpu.yaml); 32-true in --cpu-smoke")
    parser.add_argument("--gpus", type=int, default=None, help="default: every visible GPU (with --dry-run: plan for "
                                                               "this many)")
    parser.add_argument("--ep-sizes", type=int, nargs="+", default=None,
                        help="expert_parallel_size values to run, 1 = plain FSDP2 (default 1 2 4 8, those that fit)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per layout (default 5)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per layout (default 20)")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per process and step (default 8)")
    parser.add_argument("--seq-len", type=int, default=None, help="default 2048")
    parser.add_argument("--layout-timeout", type=int, default=None, help="seconds per layout (default 180)")
    parser.add_argument("--results", type=Path, default=None,
                        help="default bench/results/ep_speed.json (ep_speed_cpu-smoke.json with --cpu-smoke)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit (no GPU needed)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="2 gloo CPU processes, a tiny MoE, EP 1 and 2, a few steps: the whole code path")
    parser.add_argument("--only", type=int, help=argparse.SUPPRESS)  # one subprocess's expert_parallel_size
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--processes", type=int, help=argparse.SUPPRESS)  # what the driver resolved --gpus to
    args = parser.parse_args(argv)
    setup = SMOKE if args.cpu_smoke else BENCH
    for name in ("batch_size", "seq_len", "warmup", "steps", "precision", "layout_timeout"):
        if getattr(args, name) is None:
            setattr(args, name, setup[name])
    args.config, args.model, args.device = setup["config"], setup["model"], setup["device"]
    if args.only is not None:
        run_layout(args)
        return 0

    visible = torch.cuda.device_count()
    if args.cpu_smoke:
        args.processes = SMOKE["processes"]
    elif args.gpus is not None and args.gpus > visible and not args.dry_run:
        parser.error(f"--gpus {args.gpus}: only {visible} visible")
    else:
        args.processes = visible if args.gpus is None else args.gpus
    if min(args.ep_sizes or [1]) < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--ep-sizes at least 1, --steps at least 1, --warmup at least 0")
    args.results = args.results or (SMOKE_RESULTS if args.cpu_smoke else RESULTS)
    config = model_config(args)
    ep_sizes = sorted(set(args.ep_sizes or (SMOKE["ep_sizes"] if args.cpu_smoke else [1, *EP_SIZES])))
    print(plan(config, args, ep_sizes))
    if args.dry_run:
        return 0

    record = {**environment(args), "model": dataclasses.asdict(config), "precision": args.precision,
              "batch_size_per_process": args.batch_size, "seq_len": args.seq_len, "warmup_steps": args.warmup,
              "timed_steps": args.steps, "gradient_clip_val": GRADIENT_CLIP,
              "optimizer": {"lr": LR, "betas": BETAS, "eps": EPS, "weight_decay": WEIGHT_DECAY}}
    if args.processes < 2:
        record["skipped"] = skip_reason(1, args.processes, config.n_experts)
        write_results(args.results, record, note=f"skipped: {record['skipped']}; ")
        return 0

    from moe.train.throughput import device_peak_tflops

    peak = device_peak_tflops(torch.device("cuda", 0), args.precision) if args.device == "cuda" else None
    # What every subprocess (and the processes Lightning starts from it) must see alike.
    args.passed = ["--processes", str(args.processes), "--precision", args.precision, "--batch-size",
                   str(args.batch_size), "--seq-len", str(args.seq_len), "--warmup", str(args.warmup), "--steps",
                   str(args.steps)] + (["--cpu-smoke"] if args.cpu_smoke else [])
    layouts = {}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # runs launch_layout's finally
    with tempfile.TemporaryDirectory() as tmp:
        for ep in ep_sizes:
            name = layout_name(ep)
            reason = skip_reason(ep, args.processes, config.n_experts)
            if reason:
                layouts[name] = {"expert_parallel_size": ep, "skipped": reason}
                continue
            print(f"running {name} ...", flush=True)
            result = launch_layout(ep, args, Path(tmp) / f"{name}.json")
            layouts[name] = result if "failed" in result else summarise(result, ep, args, config, peak)
            if "failed" in result:
                print(f"{name} failed: {result['failed']}", file=sys.stderr)
    problems = compare(layouts, args.precision)
    record.update(flops_per_token=config.flops_per_token(args.seq_len), peak_tflops=peak, layouts=layouts,
                  problems=problems)
    print(f"\n{record['gpu'] or record['cpu']}; torch {record['torch']}, lightning {record['lightning']}")
    print_table(layouts, "GPU" if args.device == "cuda" else "proc")
    write_results(args.results, record)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
