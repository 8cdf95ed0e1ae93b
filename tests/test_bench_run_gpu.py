"""bench/run_gpu.sh, the one command for a device lease: it parses, and a mistyped part is refused before anything
runs or is written (a lease is too short to lose to a typo)."""

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "run_gpu.sh"


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_unknown_part_is_refused_before_anything_runs(tmp_path):
    result = subprocess.run(["bash", str(SCRIPT), "check", "mo"], check=False, capture_output=True, text=True,
                            env={**os.environ, "OUT": str(tmp_path)})
    assert result.returncode == 2
    assert "unknown part 'mo'" in result.stderr and "check moe dense strategies fit ep" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_failing_part_is_reported_and_fails_the_run(tmp_path):
    """Without a GPU the check part exits non-zero: its log is kept, the run ends with exit 1 and names it."""
    result = subprocess.run(["bash", str(SCRIPT), "check"], check=False, capture_output=True, text=True,
                            env={**os.environ, "OUT": str(tmp_path)})
    assert result.returncode == 1
    assert "failed: gpu_check" in result.stderr
    assert (tmp_path / "gpu_check.log").exists() and (tmp_path / "gpu_environment.txt").exists()
