"""Training in reduced precision, the GPU default, through its CPU twins: bf16-mixed (and bf16-true) fits through the
real `fit` command for a dense and an MoE model, with clipping binding and off, on one process and on two (DDP and
FSDP2); fp16 with a gradient scaler and torch's fused AdamW.

bf16-mixed crashed at the first optimizer step: Lightning's mixed-precision plugin refuses to clip for the fused
AdamW, and the LLaMA recipe clips at 1.0 (moe/train/clipping.py). Clipping is checked where the optimizer sees the
gradients: their norm after clipping is min(norm, clip) of the norm logged before it. FSDPStrategy (FSDP1), the
last strategy whose precision plugin refuses to clip, runs on CPU in tests/train/test_model_parallel.py.
"""

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

sys.path.insert(0, str(Path(__file__).parent))
from launch import free_port
from precision_worker import RecordClipping
from test_module import TINY, PatternData

import cli
from moe.train import LanguageModel
from moe.train.guard import StepGuard

from ..cli_runs import ROOT, tiny_run_args

MODELS = {"moe": [], "dense": ["--config", str(ROOT / "configs/model/tiny-dense.yaml")],
          # QK-norm: the norms' float32 weights turn q and k to float32 under autocast, as in HF's Qwen3 and OLMoE
          "qwen3-moe": ["--config", str(ROOT / "configs/model/tiny-qwen3-moe.yaml")],
          "olmoe": ["--config", str(ROOT / "configs/model/tiny-olmoe.yaml")],
          # OLMo 3: norms on bf16 sublayer outputs added to the float32 residual stream, windows
          "olmo3": ["--config", str(ROOT / "configs/model/tiny-olmo3.yaml")]}
CLIP = 0.5  # below the tiny models' first gradient norms (about 1 to 2), so it binds


def fit(workdir: Path, *extra: str) -> dict:
    """The real `fit` command on the tiny run, shortened to 4 steps, with RecordClipping; what it recorded."""
    out = workdir / f"record{len(list(workdir.glob('record*')))}"
    cli.main(["fit", *tiny_run_args(workdir), "--trainer.max_steps", "4", "--trainer.val_check_interval", "4", *extra,
              "--trainer.callbacks+=precision_worker.RecordClipping", f"--trainer.callbacks.out={out}"])
    return torch.load(f"{out}.rank0.pt")


def assert_clipped(record: dict, clip: float) -> None:
    assert len(record["before"]) == len(record["after"]) == 4
    for before, after in zip(record["before"], record["after"]):
        assert torch.isfinite(torch.tensor(before))
        expected = min(before, clip) if clip else before
        assert after == pytest.approx(expected, rel=2e-3)  # the norm itself is computed in float32
    if clip:
        assert any(before > clip for before in record["before"]), "clipping never bound: the test would not see it"


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("clip", [CLIP, 0.0])
def test_bf16_mixed_fit_through_the_command_line(workdir, kind, clip):
    record = fit(workdir, *MODELS[kind], "--trainer.precision", "bf16-mixed", "--trainer.gradient_clip_val", str(clip))
    assert_clipped(record, clip)
    assert record["dtypes"] == {"torch.float32"}  # master weights stay float32
    assert (workdir / "runs/quickstart/version_0/checkpoints/last.ckpt").is_file()
    if clip:
        # The forward ran under autocast: the losses are not those of float32 arithmetic, but close to them.
        reference = fit(workdir, *MODELS[kind], "--trainer.precision", "32-true", "--trainer.gradient_clip_val",
                        str(clip))
        assert record["losses"] != reference["losses"]
        assert record["losses"] == pytest.approx(reference["losses"], rel=0.03)


def test_bf16_true_fit_through_the_command_line(workdir):
    record = fit(workdir, "--trainer.precision", "bf16-true", "--trainer.gradient_clip_val", str(CLIP))
    assert record["dtypes"] == {"torch.bfloat16"}
    assert len(record["after"]) == 4 and all(after <= CLIP * 1.01 for after in record["after"])
    assert all(torch.isfinite(torch.tensor(record["losses"])))


def test_fp16_with_a_gradient_scaler_and_fused_adamw():
    """16-mixed on a GPU: GradScaler scales the loss and the fused AdamW unscales inside its step, which Lightning
    leaves to it. The step guard, the logged norm and clipping must see unscaled gradients (clipping.py), and the
    scaler must still skip overflowing steps. Lightning turns precision='16-mixed' into bf16 on a CPU, so the
    plugin is given directly, with a small initial scale so that the first steps do not overflow."""
    def run(precision_plugin=None, **kwargs) -> tuple[dict, LanguageModel]:
        torch.manual_seed(0)
        module, record = LanguageModel(TINY, warmup_steps=1), RecordClipping()
        trainer = pl.Trainer(accelerator="cpu", max_steps=4, gradient_clip_val=CLIP, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, limit_val_batches=0, callbacks=[record],
                             plugins=[precision_plugin] if precision_plugin else None, **kwargs)
        trainer.fit(module, datamodule=PatternData())
        return {"before": record.before, "after": record.after}, module

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    record, module = run(MixedPrecision("16-mixed", "cpu", scaler=scaler))
    assert module.trainer.optimizers[0].defaults["fused"]
    reference, reference_module = run(precision="32-true")
    # Unscaled: the norm is that of float32 training to fp16's precision, not 16 times it.
    assert record["before"][0] == pytest.approx(reference["before"][0], rel=0.05)
    assert_clipped(record, CLIP)
    # The guard judges the loss, not the scaled loss the backward pass starts from (a doubled scale is no spike).
    (guard,) = [c for c in module.trainer.callbacks if isinstance(c, StepGuard)]
    (reference_guard,) = [c for c in reference_module.trainer.callbacks if isinstance(c, StepGuard)]
    assert list(guard.recent) == pytest.approx(list(reference_guard.recent), rel=0.05)

    # An overflow: the scaler skips the step and lowers its scale; the guard leaves it to the scaler.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60)
    record, module = run(MixedPrecision("16-mixed", "cpu", scaler=scaler))
    assert module.trainer.precision_plugin.scaler.get_scale() < 2.0**60
    (guard,) = [c for c in module.trainer.callbacks if isinstance(c, StepGuard)]
    assert guard.skipped == 0


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "fsdp2-ep"])
def test_bf16_mixed_on_two_processes_through_the_command_line(tmp_path, strategy):
    from ..cli_runs import write_tiny_run

    write_tiny_run(tmp_path)
    port, procs = free_port(), []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "WORLD_SIZE": "2", "NODE_RANK": "0", "LOCAL_RANK": str(rank), "MOE_CACHE_DIR": str(tmp_path / "cache")}
        log = open(tmp_path / f"worker{rank}.log", "w")  # noqa: SIM115 (the worker writes to it until it exits)
        procs.append(subprocess.Popen([sys.executable, str(Path(__file__).parent / "precision_worker.py"), strategy,
                                       str(tmp_path), str(tmp_path)], cwd=tmp_path, env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=180) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert codes == [0, 0], (tmp_path / "worker0.log").read_text()[-4000:] + (tmp_path / "worker1.log").read_text()[-4000:]
    ranks = [torch.load(tmp_path / f"{strategy}.rank{r}.pt") for r in range(2)]
    for rank in ranks:
        assert_clipped(rank, CLIP)
    assert ranks[0]["before"] == ranks[1]["before"]  # the norm of the whole gradient, the same on both
    for name, weight in ranks[0]["weights"].items():
        assert torch.equal(weight, ranks[1]["weights"][name]), name
    assert (tmp_path / "runs/quickstart/version_0/checkpoints/last.ckpt").exists()
