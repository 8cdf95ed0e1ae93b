"""Zero-shot evaluation under DDP: two CPU processes (gloo) score their shares of the items and the callback's
reduced results equal a single-process evaluate() of the same model on the same items."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eval import evaluate

from .conftest import EVALDATA
from .ddp_eval_worker import LIMIT, TASKS, build


@pytest.mark.skipif(not EVALDATA.is_dir(), reason="no evaluation data")
def test_ddp_validate_equals_one_process(tmp_path):
    out = tmp_path / "ddp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    subprocess.run([sys.executable, str(Path(__file__).parent / "ddp_eval_worker.py"), str(out), str(EVALDATA)],
                   cwd=tmp_path, env=env, check=True, timeout=300)
    got = json.loads(out.read_text())
    tokenizer, module = build(EVALDATA)
    expected = evaluate(module.model, tokenizer, TASKS, data_dir=EVALDATA, limit=LIMIT, batch_tokens=512)
    for task in TASKS:
        assert got["results"][task]["n"] == LIMIT  # every item scored once, over both ranks
        for metric, value in expected[task].items():
            assert got["results"][task][metric] == pytest.approx(value, abs=1e-9), (task, metric)
        assert got["logged"][f"eval/{task}/acc"] == pytest.approx(expected[task]["acc"], abs=1e-6)
    calls = got["forward_calls"]
    assert calls[0] == calls[1] > 0  # the same number of forward passes on both ranks: no collective can hang
    assert len((tmp_path / "zero_shot.jsonl").read_text().splitlines()) == 1  # rank zero writes once
