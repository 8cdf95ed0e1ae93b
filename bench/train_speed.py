"""Training speed: our model in a Lightning Trainer, our model in a bare PyTorch loop, and HF transformers'
MixtralForCausalLM / MistralForCausalLM built from the same config and weights, side by side in one process on the
same machine. Prints a table of tokens/s (median over the timed steps after warm-up), ours/HF ratios and, on GPU,
MFU, and writes bench/results/train_speed_<config>.json.

    PYTHONPATH=. python bench/train_speed.py --config cpu-tiny               # CPU, fp32
    PYTHONPATH=. python bench/train_speed.py --config moe-bench              # one GPU, bf16, + torch.compile rows
    PYTHONPATH=. python bench/train_speed.py --config dense-bench --dry-run  # the plan only

Every variant starts from the same seeded weights, sees the same batches and uses the same AdamW settings (lr 3e-4,
betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on matrices only; torch's fused AdamW on CPU and GPU alike, what
LanguageModel uses and what the issue's baselines use). The objective is next-token
cross-entropy plus each implementation's router losses (ours: load balancing + z-loss; HF Mixtral: its load
balancing loss, output_router_logits=True). The first step's cross-entropy must agree across variants before any
speed is reported: a fast wrong answer is no result.

Variants:
- ours-lightning: moe.train.module.LanguageModel in a Trainer (max_steps, no logger, checkpointing or progress bar);
  a callback takes the time at the end of every batch, so Lightning's whole loop (data fetch, hooks, logging, the
  module's step guard and meters) is inside the step time.
- ours-loop: the same Transformer, forward + loss + backward + AdamW step, nothing else (the loss as
  LanguageModel computes it: labels passed to the model, chunked output-layer cross-entropy).
- hf: transformers' model from our HF export (moe.hf.save_hf_checkpoint), SDPA attention, its default experts
  implementation (grouped_mm), logits then F.cross_entropy.
- hf-compile (torch.compile of the HF model) and ours-lightning-compile (LanguageModel(compile=True), what
  --model.compile sets: every block compiled); on CPU too, where inductor generates C++ (needs a C++ compiler).

GPU precision is bf16-true (bf16 weights, no autocast) by default: torch's grouped matmul, which both our grouped
experts and HF's default experts run, is not autocast-enabled, so under bf16-mixed both would multiply the experts
in fp32. --precision bf16-mixed measures that case anyway.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.results_file import write_results
from moe.config import ModelConfig, format_count

_SHAPE = dict(d_model=1024, n_heads=16, n_kv_heads=4, vocab_size=32000, max_seq_len=2048)
CONFIGS = {
    "cpu-tiny": dict(
        model=dict(name="cpu-tiny", vocab_size=8192, d_model=256, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=512,
                   max_seq_len=256, n_experts=8, top_k=2, expert_ffn_dim=512),
        batch_size=4, seq_len=256, device="cpu", precision="32-true", warmup=3, steps=10, repeats=3),
    "moe-bench": dict(
        model=dict(name="moe-bench", n_layers=12, ffn_dim=2816, n_experts=8, top_k=2, expert_ffn_dim=2816, **_SHAPE),
        batch_size=8, seq_len=2048, device="cuda", precision="bf16-true", warmup=5, steps=20, repeats=1),
    "dense-bench": dict(
        model=dict(name="dense-bench", n_layers=24, ffn_dim=2816, **_SHAPE),
        batch_size=8, seq_len=2048, device="cuda", precision="bf16-true", warmup=5, steps=20, repeats=1),
}
LR, BETAS, EPS, WEIGHT_DECAY = 3e-4, (0.9, 0.95), 1e-8, 0.1
VARIANTS = ["ours-lightning", "ours-loop", "hf", "ours-lightning-compile", "hf-compile"]


# ------------------------------------------------------------------------------------------------ set-up
def machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0] if names else platform.processor() or 'CPU'}, {os.cpu_count()} cores"


def make_batches(vocab_size: int, n: int, batch_size: int, seq_len: int) -> list[dict]:
    """n fixed-seed batches of (B, T) inputs and their next tokens, shared by every variant."""
    generator = torch.Generator().manual_seed(1234)
    batches = []
    for _ in range(n):
        tokens = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=generator)
        batches.append({"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()})
    return batches


def dtype_of(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16-true" else torch.float32


def autocast(device: str, precision: str):
    enabled = precision == "bf16-mixed"
    return torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=enabled)


def adamw(named_params, device: str) -> torch.optim.AdamW:
    """LanguageModel's optimizer (moe/train/optim.py's groups, by the same rule on HF's parameter names)."""
    decay, plain = [], []
    for name, param in named_params:
        (plain if param.ndim < 2 or "embed_tokens" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, fused=True)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------ variants
def run_lightning(config: ModelConfig, state: dict, batches: list[dict], args, compile: bool) -> dict:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from moe.train.module import LanguageModel

    class StepTimer(pl.Callback):
        def __init__(self):
            self.times, self.first_ce = [], None

        def on_fit_start(self, trainer, module):
            # configure_model built (and with compile=True compiled) the model on the device, from the device's
            # RNG; copying in place gives it the shared starting weights and keeps the optimizer's parameters.
            module.model.load_state_dict(state)
            sync(args.device)
            self.times.append(time.perf_counter())

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            sync(args.device)
            self.times.append(time.perf_counter())
            if self.first_ce is None:
                self.first_ce = float(trainer.callback_metrics["train/loss"])

    timer = StepTimer()
    module = LanguageModel(config, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, schedule="constant",
                           warmup_steps=0, compile=compile)
    trainer = pl.Trainer(accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, precision=args.precision,
                         max_steps=len(batches), logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[timer])
    trainer.fit(module, DataLoader(batches, batch_size=None))
    step_times = [b - a for a, b in zip(timer.times, timer.times[1:])]
    del trainer, module
    return {"step_times": step_times, "first_ce": timer.first_ce}


def ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """HF's loss as its users write it: float32 cross-entropy over the full logits."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def timed_loop(model, step, batches: list[dict], device: str) -> dict:
    """Run step(batch) -> cross-entropy over the batches; time each step, synchronised."""
    step_times, first_ce = [], None
    sync(device)
    for batch in batches:
        start = time.perf_counter()
        ce = step({k: v.to(device, non_blocking=True) for k, v in batch.items()})
        sync(device)
        step_times.append(time.perf_counter() - start)
        if first_ce is None:
            first_ce = float(ce)
    return {"step_times": step_times, "first_ce": first_ce}


def run_ours_loop(config: ModelConfig, state: dict, batches: list[dict], args) -> dict:
    from moe.model import Transformer

    with torch.device(args.device):
        model = Transformer(config)
    model.load_state_dict(state)
    model.to(dtype_of(args.precision)).train()
    optimizer = adamw(model.named_parameters(), args.device)

    def step(batch):
        with autocast(args.device, args.precision):
            out = model(batch["input_ids"], labels=batch["labels"])
            ce = out.loss
            loss = ce if not out.moe else ce + config.aux_loss_coef * out.aux_loss + config.z_loss_coef * out.z_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return ce.detach()

    return timed_loop(model, step, batches, args.device)  # the model and optimizer are freed on return


def export_hf(config: ModelConfig, state: dict, path: Path, dtype: torch.dtype) -> None:
    """Our weights as an HF directory: Mixtral for MoE; for dense, Mistral without a window (our exporter names a
    windowless dense model Llama, whose modules and weights are Mistral's)."""
    from moe.hf import save_hf_checkpoint
    from moe.model import Transformer

    with torch.device("meta"):
        model = Transformer(config)
    # assign=True on clones: assigning the shared tensors themselves let a later variant's training write into
    # them (seen with torch 2.13), so every variant after it started from changed weights.
    model.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)
    save_hf_checkpoint(model, path, dtype=dtype)
    del model
    if not config.is_moe:
        hf = json.loads((path / "config.json").read_text())
        for key in ("attention_bias", "mlp_bias"):
            hf.pop(key, None)
        hf.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=None)
        (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")


def run_hf(config: ModelConfig, hf_dir: Path, batches: list[dict], args, compile: bool) -> dict:
    from transformers import AutoModelForCausalLM

    extra = dict(output_router_logits=True, router_aux_loss_coef=config.aux_loss_coef) if config.is_moe else {}
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype_of(args.precision), attn_implementation="sdpa",
                                                 **extra).to(args.device).train()
    experts = getattr(model.config, "_experts_implementation", None) if config.is_moe else None
    optimizer = adamw(model.named_parameters(), args.device)
    forward = torch.compile(model) if compile else model

    def step(batch):
        with autocast(args.device, args.precision):
            out = forward(input_ids=batch["input_ids"], use_cache=False)
            ce = ce_loss(out.logits, batch["labels"])
            loss = ce + config.aux_loss_coef * out.aux_loss if config.is_moe else ce
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return ce.detach()

    result = timed_loop(model, step, batches, args.device)
    result["hf_experts_implementation"] = experts
    return result  # the model and optimizer are freed on return


# ------------------------------------------------------------------------------------------------ main
def resolve(args) -> tuple[ModelConfig, dict]:
    spec = CONFIGS[args.config]
    for name in ("batch_size", "seq_len", "device", "precision", "warmup", "steps", "repeats"):
        if getattr(args, name) is None:
            setattr(args, name, spec[name])
    model = dict(spec["model"])
    if args.layers is not None:
        model["n_layers"] = args.layers
    model["max_seq_len"] = max(model["max_seq_len"], args.seq_len)
    config = ModelConfig(**model)
    if args.variants is None:
        args.variants = list(VARIANTS)
    return config, spec


def plan(config: ModelConfig, args) -> str:
    tokens = args.batch_size * args.seq_len
    kind = "MoE (HF MixtralForCausalLM)" if config.is_moe else "dense (HF MistralForCausalLM)"
    ffn = f"{config.n_experts} experts top-{config.top_k}, expert FFN {config.expert_ffn_dim}" if config.is_moe \
        else f"dense FFN {config.ffn_dim}"
    return "\n".join([
        (f"config {args.config}: {kind}, {config.n_layers} layers, width {config.d_model}, {config.n_heads} heads, "
        f"{config.n_kv_heads} kv heads, {ffn}, vocabulary {config.vocab_size}"),
        (f"  parameters {format_count(config.num_params())} total, {format_count(config.num_active_params())} active; "
        f"{config.flops_per_token(args.seq_len) / 1e9:.2f} GFLOP/token for training"),
        (f"  batch {args.batch_size} x {args.seq_len} = {tokens} tokens/step; {args.device}, {args.precision}; "
        f"{args.warmup} warm-up + {args.steps} timed steps per variant, {args.repeats} repeat(s) in rotated order"),
        f"  variants: {', '.join(args.variants)}",
        (f"  fused AdamW lr {LR}, betas {BETAS}, eps {EPS}, weight decay {WEIGHT_DECAY} on matrices; "
        "the same seeded weights and batches for every variant"),
        f"  writes {args.out}",
    ])


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu-tiny")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=None, help="default: all")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per variant")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (the median is reported)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="run every variant this many times, each time in a rotated order, and pool the timed "
                             "steps (default 3 on CPU, where other processes' load drifts, 1 on GPU)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None, help="override the config's layer count (tests)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--precision", choices=["32-true", "bf16-true", "bf16-mixed"], default=None)
    parser.add_argument("--ce-tolerance", type=float, default=None,
                        help="relative first-step cross-entropy disagreement allowed (default 1e-4 fp32, 2e-2 bf16)")
    parser.add_argument("--out", default=None, help="default bench/results/train_speed_<config>.json")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = parser.parse_args(argv)
    config, _ = resolve(args)
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: at least one run of every variant is needed")
    if len(set(args.variants)) != len(args.variants):
        parser.error(f"--variants {' '.join(args.variants)}: each variant once (repeat with --repeats)")
    args.out = args.out or str(Path(__file__).parent / "results" / f"train_speed_{args.config}.json")
    print(plan(config, args))
    if args.dry_run:
        return None
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--config {args.config} needs a CUDA GPU (use --config cpu-tiny, or --device cpu)")

    import lightning
    import transformers

    from moe.model import Transformer
    from moe.train.throughput import device_peak_tflops

    load_before = os.getloadavg()
    torch.manual_seed(0)
    state = Transformer(config).state_dict()  # fp32 on the CPU; every variant copies it
    batches = make_batches(config.vocab_size, args.warmup + args.steps, args.batch_size, args.seq_len)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "hf"
        if any(v.startswith("hf") for v in args.variants):
            export_hf(config, state, hf_dir, dtype_of(args.precision))
        n = len(args.variants)
        for repeat in range(args.repeats):
            # Each repeat starts one variant later, so that a slow stretch of a shared machine does not always
            # land on the same variant.
            for variant in args.variants[repeat % n:] + args.variants[:repeat % n]:
                print(f"running {variant} (repeat {repeat + 1} of {args.repeats}) ...", flush=True)
                compile = variant.endswith("-compile")
                if variant.startswith("ours-lightning"):
                    run = run_lightning(config, state, batches, args, compile)
                elif variant == "ours-loop":
                    run = run_ours_loop(config, state, batches, args)
                else:
                    run = run_hf(config, hf_dir, batches, args, compile)
                results.setdefault(variant, []).append(run)
                free(args.device)
    results = {variant: results[variant] for variant in args.variants}
    load_after = os.getloadavg()

    # The same weights and tokens give the same first-step cross-entropy, or the comparison is void.
    tolerance = args.ce_tolerance or (1e-4 if args.precision == "32-true" else 2e-2)
    reference = next(iter(results.values()))[0]["first_ce"]
    for variant, runs in results.items():
        for r in runs:
            if abs(r["first_ce"] - reference) > tolerance * abs(reference):
                raise SystemExit(f"{variant}'s first-step cross-entropy {r['first_ce']:.6f} disagrees with "
                                 f"{next(iter(results))}'s {reference:.6f}: the variants do not train the same model")

    tokens = args.batch_size * args.seq_len
    flops = config.flops_per_token(args.seq_len)
    peak = device_peak_tflops(torch.device(args.device), args.precision)
    hf_rate = {}
    rows = []
    for variant, runs in results.items():
        timed = [t for r in runs for t in r["step_times"][args.warmup:]]  # every repeat's timed steps, pooled
        median = statistics.median(timed)
        rate = tokens / median
        if variant.startswith("hf"):
            hf_rate[variant] = rate
        rows.append({"variant": variant, "median_step_s": median, "tokens_per_s": rate,
                     "min_step_s": min(timed), "tokens_per_s_best": tokens / min(timed),
                     "tflops": flops * rate / 1e12, "mfu": flops * rate / (peak * 1e12) if peak else None,
                     "first_ce": runs[0]["first_ce"], "step_times_s": [r["step_times"] for r in runs],
                     "repeat_tokens_per_s": [tokens / statistics.median(r["step_times"][args.warmup:]) for r in runs],
                     **({"hf_experts_implementation": runs[0]["hf_experts_implementation"]}
                        if "hf_experts_implementation" in runs[0] else {})})
    rows_by_name = {row["variant"]: row for row in rows}
    baseline = hf_rate.get("hf")
    for row in rows:
        row["vs_hf"] = row["tokens_per_s"] / baseline if baseline else None
        # Each repeat's ratio on its own: their spread is the run-to-run noise of the comparison.
        row["repeat_vs_hf"] = ([ours / hf for ours, hf in zip(row["repeat_tokens_per_s"],
                                                             rows_by_name["hf"]["repeat_tokens_per_s"])]
                               if "hf" in rows_by_name else None)
        row["vs_hf_compile"] = row["tokens_per_s"] / hf_rate["hf-compile"] if "hf-compile" in hf_rate else None

    device = machine(args.device)
    threads = torch.get_num_threads()
    print(f"\n{args.config}, {tokens} tokens/step, {args.precision}; {device}, {threads} torch threads; "
          f"torch {torch.__version__}, transformers {transformers.__version__}, lightning {lightning.__version__}; "
          f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    # The median is the figure; the best step is printed beside it because on a shared CPU other processes'
    # bursts land on some steps and not others, and the fastest step is the one they spared.
    header = f"{'variant':<24}{'step ms':>10}{'tokens/s':>12}{'vs hf':>8}{'repeats vs hf':>15}"
    header += f"{'best tokens/s':>15}{'vs hf':>8}"
    header += f"{'vs hf-compile':>15}{'TFLOP/s':>9}{'MFU':>7}"
    print(header)
    for row in rows:
        line = f"{row['variant']:<24}{row['median_step_s'] * 1e3:>10.1f}{row['tokens_per_s']:>12.0f}"
        line += f"{row['vs_hf']:>7.2f}x" if row["vs_hf"] else f"{'':>8}"
        spread = row["repeat_vs_hf"]
        line += f"{min(spread):>9.2f}-{max(spread):.2f}" if spread else f"{'':>15}"
        best_hf = rows_by_name["hf"]["tokens_per_s_best"] if "hf" in rows_by_name else None
        line += f"{row['tokens_per_s_best']:>15.0f}" + (f"{row['tokens_per_s_best'] / best_hf:>7.2f}x" if best_hf
                                                         else f"{'':>8}")
        line += f"{row['vs_hf_compile']:>14.2f}x" if row["vs_hf_compile"] else f"{'':>15}"
        line += f"{row['tflops']:>9.3f}" + (f"{row['mfu']:>7.1%}" if row["mfu"] is not None else f"{'':>7}")
        print(line)

    record = {
        "date": str(date.today()), "config": args.config, "machine": device, "device": args.device,
        "torch_threads": threads, "load_average_before_after": [load_before[0], load_after[0]],
        "torch": torch.__version__, "transformers": transformers.__version__, "lightning": lightning.__version__,
        "model": dataclasses.asdict(config), "batch_size": args.batch_size, "seq_len": args.seq_len,
        "cpu_load_note": "median tokens/s is the figure; load_average_before_after shows how busy the machine was",
        "precision": args.precision, "warmup_steps": args.warmup, "timed_steps": args.steps, "repeats": args.repeats,
        "flops_per_token": flops, "peak_tflops": peak, "optimizer": {"lr": LR, "betas": BETAS, "eps": EPS,
                                                                     "weight_decay": WEIGHT_DECAY},
        "rows": rows,
    }
    write_results(args.out, record)
    return record


if __name__ == "__main__":
    main()
