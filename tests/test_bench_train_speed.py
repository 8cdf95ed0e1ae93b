"""bench/train_speed.py: the plan of every config prints without a GPU, and a two-step CPU run of the three
uncompiled variants produces a record whose variants trained the same model (the script checks the first-step
cross-entropy) at a positive speed. The compiled variants are left to the benchmark runs: compiling costs tens of
seconds per variant."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "train_speed.py"


@pytest.fixture(scope="module")
def train_speed():
    spec = importlib.util.spec_from_file_location("train_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("config", ["cpu-tiny", "moe-bench", "dense-bench"])
def test_dry_run_prints_the_plan(train_speed, config, capsys):
    assert train_speed.main(["--config", config, "--dry-run"]) is None
    plan = capsys.readouterr().out
    assert f"config {config}" in plan and "tokens/step" in plan
    assert "ours-lightning-compile" in plan and "hf-compile" in plan
    assert ("MixtralForCausalLM" in plan) == (config != "dense-bench")


def test_two_step_cpu_run_writes_a_record(train_speed, tmp_path):
    out = tmp_path / "train_speed.json"
    record = train_speed.main(["--config", "cpu-tiny", "--warmup", "1", "--steps", "1", "--batch-size", "1",
                               "--seq-len", "32", "--layers", "1", "--out", str(out), "--repeats", "2",
                               "--variants", "ours-lightning", "ours-loop", "hf"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(record))
    rows = {row["variant"]: row for row in record["rows"]}
    assert list(rows) == ["ours-lightning", "ours-loop", "hf"]
    for row in rows.values():
        assert [len(times) for times in row["step_times_s"]] == [2, 2] and row["tokens_per_s"] > 0
        assert len(row["repeat_vs_hf"]) == 2
        assert row["first_ce"] == pytest.approx(rows["hf"]["first_ce"], rel=1e-4)
    assert rows["hf"]["vs_hf"] == pytest.approx(1.0) and rows["hf"]["repeat_vs_hf"] == pytest.approx([1.0, 1.0])
    assert rows["hf"]["hf_experts_implementation"]
    assert record["torch"] and record["transformers"] and record["lightning"] and record["machine"]


@pytest.mark.parametrize("argv", [["--repeats", "0"], ["--variants", "hf", "hf"]])
def test_bad_repeats_and_duplicate_variants_are_refused(train_speed, argv):
    with pytest.raises(SystemExit) as exit_info:
        train_speed.main(argv + ["--dry-run"])
    assert exit_info.value.code == 2
