"""bench/strategies_gpu.py on a CPU: the plan prints with every strategy skipped for want of a GPU, and one
strategy's run (the subprocess body) records a loss per optimizer step."""

import json
import os
import subprocess
import sys

import pytest

from .cli_runs import ROOT

SCRIPT = ROOT / "bench" / "strategies_gpu.py"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}


def test_dry_run_prints_the_plan():
    done = subprocess.run([sys.executable, SCRIPT, "--dry-run"], capture_output=True, text=True, env=ENV, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    for name in ("single", "fsdp-full", "deepspeed-zero2", "deepspeed-zero3"):
        assert name in done.stdout
    assert "skip: no CUDA GPU" in done.stdout


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_one_strategy_run_records_each_steps_loss(tmp_path, precision):
    out = tmp_path / "single.json"
    done = subprocess.run([sys.executable, SCRIPT, "--only", "single", "--steps", "3", "--out", out,
                           "--accelerator", "cpu", "--precision", precision], capture_output=True, text=True, env=ENV,
                          timeout=300, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["devices"] == 1 and len(result["losses"]) == 3
    assert all(4.0 < loss < 7.0 for loss in result["losses"])  # about ln(256) = 5.5 for random tokens
