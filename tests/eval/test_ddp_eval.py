"""Zero-shot evaluation under DDP: two CPU processes (gloo) score their shares of the items and the callback's
reduced results, and its routing statistics, equal a single-process evaluate() of the same model on the same items
(and a single-process reference over both ranks' validation rows)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eval import evaluate
from eval.routing import RoutingRecorder, record_batches, routing_rows

from .conftest import EVALDATA
from .ddp_eval_worker import LIMIT, TASKS, build, reference_rows


@pytest.mark.skipif(not EVALDATA.is_dir(), reason="no evaluation data")
def test_ddp_validate_equals_one_process(tmp_path):
    out = tmp_path / "ddp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    subprocess.run([sys.executable, str(Path(__file__).parent / "ddp_eval_worker.py"), str(out), str(EVALDATA)],
                   cwd=tmp_path, env=env, check=True, timeout=300)
    got = json.loads(out.read_text())
    tokenizer, module = build(EVALDATA)
    recorder = RoutingRecorder(module.model)
    with recorder:
        expected = evaluate(module.model, tokenizer, TASKS, data_dir=EVALDATA, limit=LIMIT, batch_tokens=512,
                            routing=recorder)
    for task in TASKS:
        assert got["results"][task]["n"] == LIMIT  # every item scored once, over both ranks
        for metric, value in expected[task].items():
            assert got["results"][task][metric] == pytest.approx(value, abs=1e-9), (task, metric)
        assert got["logged"][f"eval/{task}/acc"] == pytest.approx(expected[task]["acc"], abs=1e-6)
    calls = got["forward_calls"]
    assert calls[0] == calls[1] > 0  # the same number of forward passes on both ranks: no collective can hang
    assert len((tmp_path / "zero_shot.jsonl").read_text().splitlines()) == 1  # rank zero writes once

    rows = reference_rows()[:, :-1]
    reference = record_batches(module.model, [rows[0::2], rows[1::2]])  # rank 0's rows, then rank 1's
    routing = [json.loads(line) for line in (tmp_path / "routing.jsonl").read_text().splitlines()]
    expected_routing = routing_rows(recorder.sums().select(TASKS), reference)
    assert [(r["task"], r["layer"], r["tokens"]) for r in routing] == \
        [(r["task"], r["layer"], r["tokens"]) for r in expected_routing]
    for got_row, expected_row in zip(routing, expected_routing):
        assert got_row["expert_fraction"] == pytest.approx(expected_row["expert_fraction"], abs=1e-12)  # counts
        assert got_row.keys() == expected_row.keys() | {"stage", "step", "checkpoint"}  # reference: no divergence
        for key in {"router_entropy", "load_entropy", "same_top1_as_previous", "js_to_reference_bits"} & got_row.keys():
            # float32 entropies: the workers run one thread each, this process more, so matmuls round differently
            assert got_row[key] == pytest.approx(expected_row[key], rel=1e-6), (got_row["task"], key)
    assert (tmp_path / "routing_validate_step0.png").is_file()
