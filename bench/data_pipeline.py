"""The data pipeline end to end, as a user meets it: a FineWeb-Edu style corpus of Parquet shards prepared through
`TextDataModule` (per-shard caches, `num_proc` processes), started again with everything cached, grown by one
shard, exported and read back as pre-tokenized shards, and read as a stream. Prints a table and writes
bench/results/data_pipeline.json.

    PYTHONPATH=. python bench/data_pipeline.py                 # 8 shards of 16 MiB: about 5 min on 2 cores
    PYTHONPATH=. python bench/data_pipeline.py --shards 4 --shard-mib 4

The shards hold the running Python's standard-library sources as {"text": ...} rows (the embedded corpus, shuffled
and repeated), the tokenizer is a 4096-id BPE trained on a sample of them. Each measurement runs in a fresh process
(torch and Lightning imported in each, as in a run), with its own cache folder where the row says "cold".
- prepare cold, num_proc N: `TextDataModule.setup("fit")` on an empty cache: hashing, reading, tokenizing, writing.
  num_proc 1 encodes in the process with the tokenizers library's own threads (on every core unless the user
  turned them off); num_proc 2 with two single-threaded worker processes.
- start warm: the same with every shard cached (hash records and verified stamps in place).
- add a shard: one more file in the folder; only it is tokenized.
- export + start pre-tokenized: `export_tokens`, then a data module over the exported `.bin` shards, cold (each file
  scanned once).
- stream, W workers: batches of the streaming source (`hf:parquet`, `streaming: true`), tokenized in W DataLoader
  workers; tokens per second of training windows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

from bench.results_file import write_results

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20

MEASURE = r"""
import json, sys, time
import resource
settings = json.loads(sys.argv[1])
started = time.perf_counter()
from moe.data import Source, TextDataModule
imported = time.perf_counter()
kind = settings["kind"]
sources = [Source(**s) for s in settings["sources"]]
data = TextDataModule(sources=sources, tokenizer=settings["tokenizer"], seq_len=settings["seq_len"], batch_size=8,
                      num_workers=settings.get("num_workers", 0), num_proc=settings.get("num_proc", 1),
                      cache_dir=settings["cache_dir"], val_fraction=0.001)
result = {}
if kind == "prepare":
    data.setup("fit")
    result["tokens"] = sum(f.n_tokens for f in data.corpus.files if f is not None)
elif kind == "export":
    from moe.data.pretokenized import export_tokens
    data.setup("fit")
    (folder,) = export_tokens(data.corpus, settings["out"])
    result["folder"] = str(folder)
elif kind == "stream":
    data.setup("fit")
    loader = data.train_dataloader()
    batches = iter(loader)
    next(batches)  # workers started, streams opened
    first = time.perf_counter()
    n = 0
    for _ in range(settings["batches"]):
        batch = next(batches)
        data.consumed_batches += 1
        n += batch["input_ids"].numel()
    result["tokens_per_s"] = n / (time.perf_counter() - first)
result["seconds"] = time.perf_counter() - imported
result["import_seconds"] = imported - started
result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(result))
"""


def run(settings: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(settings)], capture_output=True, text=True,
                         env=env, check=False)
    if out.returncode != 0:
        raise SystemExit(f"measurement failed: {settings['kind']}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def build_shards(folder: Path, n_shards: int, shard_mib: float, seed: int) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from moe.data.sources import stdlib_files

    texts = [p.read_text() for p in stdlib_files()]
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_shards):
        rows, size = [], 0
        while size < shard_mib * MIB:
            text = rng.choice(texts)
            rows.append(text)
            size += len(text.encode())
        path = folder / f"train-{i:05d}.parquet"
        pq.write_table(pa.table({"text": rows}), path, row_group_size=256)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--shard-mib", type=float, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--stream-batches", type=int, default=100)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "data_pipeline.json"))
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="data-pipeline-"))
    shards = build_shards(work / "corpus", args.shards, args.shard_mib, seed=0)
    extra = build_shards(work / "extra", 1, args.shard_mib, seed=1)[0]
    text_mib = args.shards * args.shard_mib  # of UTF-8 text (the Parquet files are compressed)
    parquet_mib = sum(p.stat().st_size for p in shards) / MIB
    from moe.data.sources import stdlib_files
    from moe.data.tokenizer import train_tokenizer

    sample = [path.read_text() for path in stdlib_files()[:400]]
    tokenizer = work / "tokenizer.json"
    train_tokenizer(sample, 4096).save(str(tokenizer))

    base = {"tokenizer": str(tokenizer), "seq_len": args.seq_len}
    folder_source = [{"path": str(work / "corpus")}]
    rows = []

    def row(name: str, result: dict, mib: float | None = None) -> None:
        rate = f"{mib / result['seconds']:.2f} MiB/s" if mib else ""
        if "tokens_per_s" in result:
            rate = f"{result['tokens_per_s'] / 1e3:.0f}K tokens/s"
        rows.append({"step": name, **result, "rate": rate})
        print(f"{name:<46} {result['seconds']:>8.1f} s  {rate:>16}  peak RSS {result['peak_rss_mib']:.0f} MiB",
              flush=True)

    print(f"corpus: {args.shards} Parquet shards, {text_mib:.0f} MiB of text ({parquet_mib:.0f} MiB of Parquet); "
          f"seq_len {args.seq_len}")
    for num_proc, how in ((1, "tokenizers' own threads"), (2, "2 single-threaded workers")):
        cache = work / f"cache-{num_proc}"
        row(f"prepare cold, num_proc {num_proc} ({how})",
            run({**base, "kind": "prepare", "sources": folder_source, "cache_dir": str(cache), "num_proc": num_proc}),
            text_mib)
    cache = work / "cache-2"
    row("start warm (all cached)", run({**base, "kind": "prepare", "sources": folder_source, "cache_dir": str(cache)}))
    (work / "corpus" / extra.name.replace("00000", f"{args.shards:05d}")).write_bytes(extra.read_bytes())
    row("add a shard, num_proc 2", run({**base, "kind": "prepare", "sources": folder_source, "cache_dir": str(cache),
                                        "num_proc": 2}), args.shard_mib)
    exported = run({**base, "kind": "export", "sources": folder_source, "cache_dir": str(cache),
                    "out": str(work / "tokens")})
    row("export tokens", exported)
    row("start pre-tokenized (cold scan)",
        run({**base, "kind": "prepare", "sources": [{"path": exported["folder"]}],
             "tokenizer": str(Path(exported["folder"]) / "tokenizer.json"), "cache_dir": str(work / "cache-pre")}))
    stream = [{"path": "hf:parquet", "data_files": [str(p) for p in shards], "streaming": True}]
    for workers in (0, 2):
        row(f"stream, {workers} DataLoader workers",
            run({**base, "kind": "stream", "sources": stream, "cache_dir": str(work / "cache-stream"),
                 "num_workers": workers, "batches": args.stream_batches}))

    import numpy
    import tokenizers
    import torch

    record = {
        "date": date.today().isoformat(),
        "machine": {"cpu": next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                                 if line.startswith("model name")), platform.processor()),
                    "cores": os.cpu_count()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "tokenizers": tokenizers.__version__, "numpy": numpy.__version__},
        "corpus": {"shards": args.shards, "text_mib": text_mib, "parquet_mib": round(parquet_mib, 1),
                   "seq_len": args.seq_len},
        "rows": rows,
    }
    write_results(args.out, record)


if __name__ == "__main__":
    main()
