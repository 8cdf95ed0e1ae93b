"""Do the sharded strategies train the same model? A few AdamW steps of a small MoE under one device, Lightning's
FSDPStrategy (FULL_SHARD, one unit per Block) and DeepSpeed ZeRO-2 / ZeRO-3, on every visible GPU, each strategy's
per-step losses compared with the single-device run's.

Every process sees the same batches (no distributed sampler), so averaging gradients over N identical batches is the
single-device update: the losses must agree up to reduction order (in fp32, the default, to ~1e-4; with
`--precision bf16-mixed`, the GPU default, to bf16's rounding, ~1e-2). Gradients are clipped at 1.0 as in the recipe.

    PYTHONPATH=. python bench/strategies_gpu.py            # prints a table, writes bench/results/strategies_gpu.json
    PYTHONPATH=. python bench/strategies_gpu.py --dry-run  # the plan only (runs on a CPU)

Each strategy runs in its own subprocess (`--only NAME`): Lightning launches one process per GPU by re-running the
command, and a process group cannot be torn down and rebuilt for another strategy reliably.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.results_file import write_results

RESULTS = Path(__file__).parent / "results" / "strategies_gpu.json"
STRATEGIES = {
    "single": "one GPU, no sharding (the reference)",
    "fsdp-full": "FSDPStrategy(sharding_strategy=FULL_SHARD, auto_wrap_policy={Block}), all GPUs",
    "deepspeed-zero2": "DeepSpeedStrategy(stage=2), all GPUs",
    "deepspeed-zero3": "DeepSpeedStrategy(stage=3), all GPUs",
}
SHAPE = dict(vocab_size=256, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64,
             n_experts=8, top_k=2)


def skip_reason(name: str, gpus: int) -> str | None:
    if gpus == 0:
        return "no CUDA GPU"
    if name.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed (pip install deepspeed)"
    return None


def make_strategy(name: str):
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    from moe.model import Block

    if name == "fsdp-full":
        return FSDPStrategy(sharding_strategy="FULL_SHARD", auto_wrap_policy={Block})
    if name.startswith("deepspeed"):
        return DeepSpeedStrategy(stage=int(name[-1]))
    return "auto"


def run_one(name: str, steps: int, out: Path, accelerator: str = "gpu", precision: str = "32-true") -> None:
    """Fit `steps` optimizer steps under strategy `name`; rank 0 writes the per-step losses to `out`."""
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader

    from moe import get_preset
    from moe.train import LanguageModel

    class Losses(pl.Callback):
        def __init__(self):
            self.values = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.values.append(float(loss.detach().float()))

    class Batches(pl.LightningDataModule):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            tokens = torch.randint(0, SHAPE["vocab_size"], (steps * 8, SHAPE["max_seq_len"] + 1), generator=g)
            self.items = [{"input_ids": r[:-1], "labels": r[1:]} for r in tokens]

        def train_dataloader(self):
            return DataLoader(self.items, batch_size=8)  # same batches in every process

    pl.seed_everything(0)
    model = LanguageModel(get_preset("tiny-moe", **SHAPE), lr=1e-3, warmup_steps=1, total_steps=steps)
    losses = Losses()
    single = name == "single"
    trainer = pl.Trainer(accelerator=accelerator, devices=1 if single else -1, strategy=make_strategy(name),
                         precision=precision, max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, use_distributed_sampler=False, callbacks=[losses],
                         gradient_clip_val=1.0, num_sanity_val_steps=0,
                         limit_val_batches=0)
    trainer.fit(model, datamodule=Batches())
    if trainer.is_global_zero:
        out.write_text(json.dumps({"losses": losses.values, "devices": trainer.world_size}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit (no GPU needed)")
    parser.add_argument("--only", choices=sorted(STRATEGIES), help=argparse.SUPPRESS)  # one subprocess's strategy
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--accelerator", default="gpu", help=argparse.SUPPRESS)  # "cpu": the test of run_one
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed", "bf16-true"])
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.only:
        run_one(args.only, args.steps, args.out, args.accelerator, args.precision)
        return

    import torch

    gpus = torch.cuda.device_count()
    print(f"plan: {args.steps} optimizer steps of a MoE ({SHAPE}) in {args.precision} on {gpus} visible GPU(s)")
    for name, what in STRATEGIES.items():
        reason = skip_reason(name, gpus)
        print(f"  {name:<16} {what}" + (f"  [skip: {reason}]" if reason else ""))
    if args.dry_run:
        return

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in STRATEGIES:
            reason = skip_reason(name, gpus)
            if reason:
                results[name] = {"skipped": reason}
                continue
            out = Path(tmp) / f"{name}.json"
            command = [sys.executable, __file__, "--only", name, "--steps", str(args.steps), "--out", str(out),
                       "--precision", args.precision]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0 or not out.is_file():
                results[name] = {"failed": (done.stderr or done.stdout)[-2000:]}
                print(f"{name} failed:\n{results[name]['failed']}", file=sys.stderr)
                continue
            results[name] = json.loads(out.read_text())

    reference = results.get("single", {}).get("losses")
    print(f"\n{'strategy':<16} {'devices':>7} {'max |loss - single|':>20}  losses")
    for name, result in results.items():
        if "losses" not in result:
            print(f"{name:<16} {'-':>7} {'-':>20}  {next(iter(result))}: {next(iter(result.values())).splitlines()[-1]}")
            continue
        if reference and len(reference) == len(result["losses"]):
            result["max_abs_diff_vs_single"] = max(abs(a - b) for a, b in zip(result["losses"], reference))
        diff = result.get("max_abs_diff_vs_single")
        print(f"{name:<16} {result['devices']:>7} {'-' if diff is None else f'{diff:.2e}':>20}  "
              + " ".join(f"{v:.4f}" for v in result["losses"]))
    write_results(args.results, {"gpus": gpus, "steps": args.steps, "precision": args.precision, "shape": SHAPE,
                                 "results": results})


if __name__ == "__main__":
    main()
