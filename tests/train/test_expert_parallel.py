"""Expert parallelism (moe/dispatch.py, moe/train/parallel.py, strategies.ModelParallelStrategy) on CPU processes
(gloo), against one process.

- 4 processes (expert_parallel_worker.py): the all-to-all dispatcher with experts that get no row; the loss, every
  gradient, the gradient norm and the weights after 3 clipped AdamW steps of EP 4, EP 2 x FSDP2 2 and EP 2 x TP 2
  (with activation checkpointing) equal one process on the same global batch; capacity drops as without EP;
  2 processes: EP 2 with torch.compile.
- 2 processes through the real command line (configs/strategy/fsdp2-ep.yaml): a fit with gradient accumulation
  logs the all-to-all's imbalance and writes sharded checkpoints; its step-3 checkpoint resumes exactly under EP 2,
  and under plain FSDP2, under EP 4 and EP 2 x TP 2 (4 processes) and, consolidated, on one process to the same weights (optimizer
  state included: without it the weights would part after one step); the checkpoint exports to HF.
- Bad sizes are refused before any process starts, naming the flags.
"""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from launch import free_port

from moe import get_preset
from moe.model import Transformer
from moe.train.parallel import recompute_blocks

from ..cli_runs import ROOT, refused, tiny_run_args

WORKER = Path(__file__).parent / "expert_parallel_worker.py"


def launch(world_size: int, checks: str, cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": str(world_size)}
    procs = [subprocess.Popen([sys.executable, str(WORKER), checks], cwd=cwd, env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(world_size)]
    logs = [p.communicate(timeout=600)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-6000:]
    expected = sum({"dispatch": 1, "layouts": 3, "capacity": 1, "compile": 1}[check] for check in checks.split(","))
    assert all(log.count("\nok ") + log.startswith("ok ") == expected for log in logs), logs


def test_expert_parallel_equals_one_process(tmp_path):
    launch(4, "dispatch,layouts,capacity", tmp_path)


def test_expert_parallel_compiles(tmp_path):
    """EP 2 with every block compiled (torch.compile; the split sizes' host read breaks the graph there) equals one
    process, as the eager layouts do. 2 processes: inductor compiles in each."""
    launch(2, "compile", tmp_path)


def test_recomputation_does_not_repeat_the_count_reduction(monkeypatch):
    """Activation checkpointing recomputes each block in the backward pass; the MoE layers reuse the global
    assignment fractions of the first pass instead of issuing their all-reduce again, and the gradient is the one
    without recomputation."""
    import moe.moe_layer

    calls = []

    def fraction(counts, n_tokens, group):  # one process's fractions, as a 1-process group would return
        calls.append(group)
        return counts / n_tokens

    monkeypatch.setattr(moe.moe_layer, "global_assignment_fraction", fraction)
    config = get_preset("tiny-moe", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=32,
                        max_seq_len=16, n_experts=4, top_k=2)
    ids = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(0))
    grads = []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = Transformer(config)
        for block in model.layers:
            block.mlp.count_group = "group"
        if recompute:
            recompute_blocks(model)
        calls.clear()
        out = model(ids[:, :-1], labels=ids[:, 1:])
        (out.loss + out.aux_loss).backward()
        assert calls == ["group"] * config.n_layers  # once per layer, in the first pass only
        grads.append({name: p.grad for name, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def run_cli(workdir: Path, args: list[str], devices: int | None) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOE_CACHE_DIR": str(workdir / "cache")}
    command = [sys.executable, str(ROOT / "cli.py"), "fit", *args]
    if devices:
        command += ["--trainer.devices", str(devices)]
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]


def final_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    from moe.train.checkpoint import load_lightning_checkpoint

    model, _ = load_lightning_checkpoint(checkpoint)
    return model.state_dict()


def test_expert_parallel_fit_resumes_exactly_and_moves_between_layouts(workdir):
    (workdir / "tiny-callbacks.yaml").write_text(
        "trainer:\n  callbacks:\n  - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "    init_args: {every_n_train_steps: 3, save_top_k: -1, save_last: true}\n")
    args = tiny_run_args(workdir) + ["--trainer.accumulate_grad_batches", "2", "--data.batch_size", "2",
                                     "--trainer.log_every_n_steps", "1"]
    ep = ["--config", str(ROOT / "configs/strategy/fsdp2-ep.yaml")]
    run_cli(workdir, args + ep, devices=2)
    runs = workdir / "runs/quickstart"
    step3, straight = runs / "version_0/checkpoints/epoch=0-step=3.ckpt", runs / "version_0/checkpoints/last.ckpt"
    with open(runs / "version_0/metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("experts/ep_rows_max_over_mean")]
    assert len(rows) == 6 and all(float(row["experts/ep_rows_max_over_mean"]) >= 1.0 for row in rows)

    # Each resume from step 3 branches into a folder it names (a plain resume would continue in version_0).
    def resume(version: int) -> list[str]:
        return args + ["--ckpt_path", str(step3), "--trainer.logger.init_args.version", f"version_{version}"]

    run_cli(workdir, resume(1) + ep, devices=2)  # version_1: EP 2 again, exact
    run_cli(workdir, resume(2) + ["--config", str(ROOT / "configs/strategy/fsdp2.yaml")], devices=2)
    # version_3: EP 4, the same global batch of 4 rows in 4 processes
    run_cli(workdir, resume(3) + ep + ["--trainer.strategy.init_args.expert_parallel_size", "4",
                                       "--data.batch_size", "1"], devices=4)
    # version_4: EP 2 x TP 2 (fsdp2-ep-tp.yaml), 4 processes of which 2 see different data: the same global batch
    run_cli(workdir, resume(4) + ["--config", str(ROOT / "configs/strategy/fsdp2-ep-tp.yaml")], devices=4)
    import cli

    single = workdir / "step3.ckpt"
    cli.main(["consolidate", str(step3), str(single)])
    # version_5: one process, the same global batch (2 micro-batches of 2 x 2 rows)
    run_cli(workdir, args + ["--data.batch_size", "4", "--ckpt_path", str(single)], devices=None)

    expected = final_weights(straight)
    exact = final_weights(runs / "version_1/checkpoints/last.ckpt")
    for name, weight in expected.items():
        assert torch.equal(exact[name], weight), name
    for version in (2, 3, 4, 5):  # other layouts: the same sums in another order
        moved = final_weights(runs / f"version_{version}/checkpoints/last.ckpt")
        for name, weight in expected.items():
            torch.testing.assert_close(moved[name], weight, rtol=1e-4, atol=1e-5, msg=f"version {version} {name}")

    cli.main(["export", str(straight), str(workdir / "hf")])
    from transformers import AutoModelForCausalLM

    from moe.train.checkpoint import load_lightning_checkpoint

    model, _ = load_lightning_checkpoint(straight)
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    hf = AutoModelForCausalLM.from_pretrained(workdir / "hf").eval()
    torch.testing.assert_close(hf(ids).logits, model.eval()(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("flags", "message"), [
    (["--trainer.devices", "3"],
     "--trainer.strategy.init_args.expert_parallel_size=2 does not divide the data-parallel size 3"),
    (["--trainer.devices", "2", "--model.config.n_experts", "3"],
     "--trainer.strategy.init_args.expert_parallel_size=2 does not divide --model.config.n_experts=3"),
    (["--trainer.devices", "2", "--model.config.n_experts", "0"], "the model has no MoE layer"),
    (["--trainer.devices", "2", "--trainer.strategy.init_args.expert_parallel_size", "0"],
     "--trainer.strategy.init_args.expert_parallel_size=0: expected a whole number of processes >= 1"),
])
def test_bad_expert_parallel_sizes_are_refused_before_any_process_starts(workdir, capsys, flags, message):
    error = refused(capsys, ["fit", *tiny_run_args(workdir), "--config", str(ROOT / "configs/strategy/fsdp2-ep.yaml"),
                             *flags])
    assert message in error
