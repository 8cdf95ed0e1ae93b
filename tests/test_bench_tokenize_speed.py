"""bench/tokenize_speed.py runs end to end on a 1 MiB corpus: every variant tokenizes the same text into as many
tokens as the single-threaded loop, the same ids where it keeps them (CRC32; plain-xN's separate processes keep
none), and the record is written."""

import json
import os
import subprocess
import sys

from .cli_runs import ROOT


def test_every_variant_gives_the_plain_loop_s_tokens(tmp_path):
    out = tmp_path / "tokenize_speed.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "bench/tokenize_speed.py"), "--mb", "1", "--num-proc", "2",
                           "--workdir", str(tmp_path / "work"), "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    plain = next(row for row in rows if row["variant"] == "plain")
    assert len(rows) > 1 and plain["n_tokens"] > 100_000
    assert sum(row["crc32"] is not None for row in rows) >= 3  # plain, its threads and the engines
    for row in rows:
        assert row["n_tokens"] == plain["n_tokens"] and row["crc32"] in (plain["crc32"], None), row["variant"]
        assert row["mib_per_s"] > 0
