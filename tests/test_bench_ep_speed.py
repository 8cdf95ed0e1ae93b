"""bench/ep_speed.py without a GPU: the plan names the layouts that fit the GPU count and the model's experts, a
machine with fewer than 2 GPUs gets a skip record and exit 0, layouts whose first losses disagree void the run, and
the CPU smoke (2 gloo processes, a tiny MoE, FSDP2 and FSDP2 + EP 2) runs the whole path (subprocess per layout,
Lightning's launch, the strategy, timing, the JSON record) to layouts that trained the same model."""

import json
import math
import os
import subprocess
import sys

import pytest

from .cli_runs import ROOT

SCRIPT = ROOT / "bench" / "ep_speed.py"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def ep_speed():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(SCRIPT.parent))  # it imports train_speed as its neighbour, as when run as a script
        import ep_speed

        yield ep_speed


def run(args: list[str], cwd) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=ENV, cwd=cwd,
                          timeout=300, check=False)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done


@pytest.mark.parametrize(("gpus", "run_sizes"), [(8, [1, 2, 4, 8]), (6, [1, 2]), (4, [1, 2, 4]), (1, [])])
def test_dry_run_plans_the_layouts_that_fit(ep_speed, capsys, gpus, run_sizes):
    assert ep_speed.main(["--dry-run", "--gpus", str(gpus)]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  fsdp2")}
    assert list(lines) == ["fsdp2", "fsdp2-ep2", "fsdp2-ep4", "fsdp2-ep8"]
    for ep, name in zip([1, 2, 4, 8], lines):
        assert ("skip:" not in lines[name]) == (ep in run_sizes), lines[name]
    if gpus == 1:
        assert "needs at least 2 GPUs, found 1" in lines["fsdp2"]


def test_layouts_whose_first_losses_disagree_void_the_run(ep_speed):
    layouts = {"fsdp2": {"losses": [5.5, 5.4], "tokens_per_s": 100.0},
               "fsdp2-ep2": {"losses": [5.7, 5.4], "tokens_per_s": 150.0}}  # 3.6% apart; bf16 allows 2%
    problems = ep_speed.compare(layouts, "bf16-mixed")
    assert len(problems) == 1 and "fsdp2-ep2: first-step loss 5.700000 disagrees" in problems[0]
    assert layouts["fsdp2-ep2"]["speedup_vs_fsdp2"] == 1.5
    layouts["fsdp2-ep2"]["losses"] = [5.5, math.nan]
    assert ep_speed.compare(layouts, "bf16-mixed") == ["fsdp2-ep2: a loss is not finite: [5.5, nan]"]


def test_fewer_than_two_gpus_is_a_skip_record(tmp_path):
    results = tmp_path / "ep_speed.json"
    done = run(["--results", str(results)], tmp_path)
    assert "skipped: needs at least 2 GPUs, found 0" in done.stdout
    record = json.loads(results.read_text())
    assert record["skipped"] == "needs at least 2 GPUs, found 0" and record["gpus"] == 0
    assert "layouts" not in record and record["torch"] and record["lightning"] and record["date"]


def test_cpu_smoke_runs_both_layouts_to_the_same_losses(tmp_path):
    results = tmp_path / "ep_speed.json"
    done = run(["--cpu-smoke", "--results", str(results)], tmp_path)
    assert "fsdp2-ep2" in done.stdout and f"wrote {results}" in done.stdout
    record = json.loads(results.read_text())
    assert record["problems"] == [] and record["device"] == "cpu" and record["cpu_processes"] == 2
    layouts = record["layouts"]
    assert list(layouts) == ["fsdp2", "fsdp2-ep2"]
    steps, tokens = record["warmup_steps"] + record["timed_steps"], record["batch_size_per_process"] * record["seq_len"]
    routed = 2 * record["timed_steps"] * tokens * record["model"]["top_k"]  # assignments of the timed steps
    for ep, (name, layout) in enumerate(layouts.items(), start=1):
        assert layout["expert_parallel_size"] == ep and layout["processes"] == 2
        assert len(layout["step_times_s"]) == len(layout["losses"]) == steps
        assert 0 < layout["tokens_per_s"] < math.inf
        assert layout["tokens_per_s"] == pytest.approx(2 * tokens / layout["median_step_s"])
        assert layout["tokens_per_s_per_gpu"] == pytest.approx(layout["tokens_per_s"] / 2)
        assert all(4.5 < loss < 6.5 for loss in layout["losses"])  # about ln(256) = 5.55 for random tokens
        # Dropless: every assignment of the global batch runs on exactly one process, with or without EP.
        assert [sum(column) for column in zip(*layout["rows_per_process"])] == [routed] * record["model"]["n_layers"]
    assert layouts["fsdp2"]["rows_max_over_mean"] == 1.0 and layouts["fsdp2-ep2"]["rows_max_over_mean"] >= 1.0
    # The same weights, batches and arithmetic: the same loss at every step, not only the first (fp32).
    assert layouts["fsdp2-ep2"]["losses"] == pytest.approx(layouts["fsdp2"]["losses"], rel=1e-5)
    assert layouts["fsdp2-ep2"]["speedup_vs_fsdp2"] > 0
