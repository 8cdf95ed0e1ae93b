"""Tokenization speed: the token cache's engine (moe.data.parallel_tokenize.encode_chunks) against the plain
tokenizers library, on the same JSONL corpus and tokenizer, at one or more corpus sizes. Prints a table of MiB/s
of input text, the ratio to the plain single-threaded baseline, CPU and peak memory, and writes
bench/results/tokenize_speed.json.

    PYTHONPATH=. python bench/tokenize_speed.py                  # 256 MiB and 1 GiB of stdlib text: ~30 min, 2 cores
    PYTHONPATH=. python bench/tokenize_speed.py --sizes 32,64    # a quick check
    PYTHONPATH=. python bench/tokenize_speed.py --input docs.jsonl --tokenizer tokenizer.json

The corpus is Python's standard library (the embedded `stdlib` source), its files shuffled and repeated into
{"text": ...} records up to each size; the tokenizer a 4096-id byte-level BPE trained on a 4 MiB sample of it
(moe.data.tokenizer.train_tokenizer), unless --tokenizer gives one.

Each variant runs in fresh processes, one variant after the other; each reads the file with json.loads into chunks
of 4 Mi characters (as the token cache does) and writes the ids (uint16 for up to 65,536 ids) to a file with their
CRC-32, and the ids of every variant must agree before any speed is reported. Processes run with
TOKENIZERS_PARALLELISM=false and RAYON_NUM_THREADS=1 unless said otherwise:
- plain: `Tokenizer.encode_batch_fast` on each chunk, its ids made an array: one core, the baseline.
- plain-threads: the same with the tokenizers library's threads on every core (what the token cache did before).
- engine-1: encode_chunks(num_proc=1), in the process, on one core.
- engine-N: encode_chunks(num_proc=N), N single-threaded worker processes (--num-proc, default 2).
- plain-xN: N plain processes at once, each on every N-th chunk, with no coordination at all: what N processes
  get from this machine (cores shared with other users, caches and memory bandwidth shared among the N), the
  ceiling of engine-N. Their ids are checked by count, not checksum (each writes its own file).
The issue's targets, on >= 1 GB of text: engine-1 >= 1.0x plain, engine-2 >= 1.8x plain.

The engine is loaded from its file, without the `moe` package, whose import would add torch to the measured process
(the token cache's process has torch loaded anyway). With psutil installed, the processes of a variant and all their
descendants (workers, fork server, resource tracker) are sampled every 0.1 s for their resident memory, whose peak
sum should not grow with the corpus, and their CPU seconds. Worker start-up is timed to the first result of
encode_chunks on one tiny chunk: the first call in a process (which starts the fork server) and a later one.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from datetime import date
from pathlib import Path

from bench.results_file import write_results

REPO = Path(__file__).resolve().parents[1]
ENGINE = REPO / "moe" / "data" / "parallel_tokenize.py"
CHUNK_CHARS = 4 << 20  # the token cache's chunk (moe.data.token_cache._CHUNK_BYTES, counted in characters)
MIB = 1 << 20
SINGLE_THREAD = {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"}
TOKENIZER_SAMPLE = 4 * MIB
VOCAB_SIZE = 4096


# ------------------------------------------------------------------------------------------------ measured processes
def read_chunks(path: str, text_field: str, part: int = 0, parts: int = 1):
    """The file's documents in chunks of CHUNK_CHARS characters; with `parts`, only the chunks numbered `part`
    modulo `parts` (every process still parses the whole file: seconds beside the tokenizing)."""
    chunk, size, number = [], 0, 0
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            text = json.loads(line)[text_field]
            chunk.append(text)
            size += len(text)
            if size >= CHUNK_CHARS:
                if number % parts == part:
                    yield chunk
                chunk, size, number = [], 0, number + 1
    if chunk and number % parts == part:
        yield chunk


def load_engine():
    spec = importlib.util.spec_from_file_location("parallel_tokenize", ENGINE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure(variant: str, corpus: str, text_field: str, tokenizer_path: str, ids_path: str, part: int,
            parts: int) -> dict:
    """Tokenize the corpus (or its `part`) once as `variant` says, writing the ids; the figures of this process."""
    import numpy as np
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(tokenizer_path)
    eos = tokenizer.token_to_id("<|endoftext|>")
    eos = 0 if eos is None else eos
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 1 << 16 else np.uint32  # as the token cache chooses
    chunks = read_chunks(corpus, text_field, part, parts)
    n_tokens = crc = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    with open(ids_path, "wb") as out:
        if variant.startswith("plain"):
            for chunk in chunks:
                stream = []
                for encoding in tokenizer.encode_batch_fast(chunk, add_special_tokens=False):
                    stream += encoding.ids
                    stream.append(eos)
                data = np.array(stream, dtype=dtype).tobytes()
                out.write(data)
                crc = zlib.crc32(data, crc)
                n_tokens += len(stream)
        else:
            num_proc = int(variant.removeprefix("engine-"))
            for ids, _, _ in load_engine().encode_chunks(chunks, tokenizer, eos, num_proc, dtype):
                data = ids.tobytes()
                out.write(data)
                crc = zlib.crc32(data, crc)
                n_tokens += ids.size
    seconds, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    return {"seconds": seconds, "n_tokens": n_tokens, "crc32": crc, "cpu_s": cpu_s,
            "peak_rss_mib": own_peak_rss_mib(resource.getrusage(resource.RUSAGE_SELF))}


def own_peak_rss_mib(usage) -> float:
    """This process's peak resident memory: Linux's VmHWM, which starts afresh at exec, where ru_maxrss keeps the
    peak of the process this one was forked from (the orchestrator, with torch loaded)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return usage.ru_maxrss / 1024


def measure_startup(tokenizer_path: str, num_proc: int) -> dict:
    """Seconds to the first result of encode_chunks on one tiny chunk: the first call, then the best later one."""
    import numpy as np
    from tokenizers import Tokenizer

    engine, tokenizer = load_engine(), Tokenizer.from_file(tokenizer_path)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        results = engine.encode_chunks([["def f(x): return x"]], tokenizer, 0, num_proc, np.uint16)
        next(results)
        times.append(time.perf_counter() - start)
        results.close()
    return {"first_s": times[0], "later_s": min(times[1:])}


def measured_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--measure")
    parser.add_argument("--measure-startup", action="store_true")
    parser.add_argument("--input")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--tokenizer")
    parser.add_argument("--ids")
    parser.add_argument("--part", type=int, default=0)
    parser.add_argument("--parts", type=int, default=1)
    parser.add_argument("--num-proc", type=int)
    args = parser.parse_args(argv)
    if args.measure_startup:
        print(json.dumps(measure_startup(args.tokenizer, args.num_proc)))
    else:
        print(json.dumps(measure(args.measure, args.input, args.text_field, args.tokenizer, args.ids, args.part,
                                 args.parts)))


# ------------------------------------------------------------------------------------------------ orchestration
def run_measured(runs: list[list[str]], env: dict) -> tuple[list[dict], dict]:
    """Run this script as measured processes, all at once; the figures each reports, and with psutil those of all
    of them and their descendants together: the peak of their resident memory, and their CPU seconds."""
    try:
        import psutil
    except ImportError:
        psutil = None
    processes = [subprocess.Popen([sys.executable, __file__, *arguments], stdout=subprocess.PIPE, text=True, env=env)
                 for arguments in runs]
    peak, cpu, done = 0, {}, threading.Event()

    def sample():
        nonlocal peak
        roots = [psutil.Process(process.pid) for process in processes]
        while not done.wait(0.1):
            try:
                tree = [p for root in roots if root.is_running() for p in (root, *root.children(recursive=True))]
                peak = max(peak, sum(p.memory_info().rss for p in tree))
                for p in tree:  # a worker's last 0.1 s of CPU may be missed: nothing beside minutes of encoding
                    times = p.cpu_times()
                    cpu[p.pid] = times.user + times.system
            except psutil.Error:  # a process ended between the listing and the reading: the next sample
                continue

    sampler = threading.Thread(target=sample, daemon=True) if psutil else None
    if sampler:
        sampler.start()
    outputs = [process.communicate()[0] for process in processes]
    done.set()
    if sampler:
        sampler.join()
    for process, arguments in zip(processes, runs):
        if process.returncode != 0:
            raise SystemExit(f"measured run {' '.join(arguments)} failed with exit code {process.returncode}")
    figures = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    if not psutil:
        return figures, {"tree_cpu_s": None, "tree_peak_rss_mib": None}
    for process, own in zip(processes, figures):
        # Its own CPU while it tokenized (not while it started), where the samples would count both; its
        # descendants only live while it tokenizes.
        cpu[process.pid] = own.get("cpu_s", 0.0)
    return figures, {"tree_cpu_s": sum(cpu.values()), "tree_peak_rss_mib": peak / MIB}


def run_variant(variant: str, corpus: Path, args, tokenizer: str, workdir: Path) -> dict:
    """One variant on the corpus: its seconds, token count and checksum, CPU and memory."""
    parts = int(variant.removeprefix("plain-x")) if variant.startswith("plain-x") else 1
    env = {**os.environ, **SINGLE_THREAD}
    if variant == "plain-threads":
        env = {k: v for k, v in os.environ.items() if k not in SINGLE_THREAD}
    ids = [workdir / f"ids-{variant}-{part}.bin" for part in range(parts)]
    runs = [["--measure", "plain" if parts > 1 else variant, "--input", str(corpus), "--text-field", args.text_field,
             "--tokenizer", tokenizer, "--ids", str(ids[part]), "--part", str(part), "--parts", str(parts)]
            for part in range(parts)]
    figures, tree = run_measured(runs, env)
    for path in ids:
        path.unlink()
    return {"seconds": max(f["seconds"] for f in figures), "n_tokens": sum(f["n_tokens"] for f in figures),
            "crc32": figures[0]["crc32"] if parts == 1 else None,
            "parent_cpu_s": figures[0]["cpu_s"] if parts == 1 else None,
            "parent_peak_rss_mib": max(f["peak_rss_mib"] for f in figures), **tree}


def build_corpus(path: Path, mib: int, seed: int) -> int:
    """A JSONL file of stdlib sources, shuffled and repeated, of `mib` MiB of text; returns the text's bytes."""
    from moe.data.sources import stdlib_files

    texts = [p.read_text(encoding="utf-8") for p in stdlib_files()]
    rng, target, written = random.Random(seed), mib * MIB, 0
    with open(path, "w", encoding="utf-8") as out:
        while written < target:
            rng.shuffle(texts)
            for text in texts:
                out.write(json.dumps({"text": text}) + "\n")
                written += len(text.encode("utf-8"))
                if written >= target:
                    break
    return written


def corpus_for(size_mib: int, workdir: Path, seed: int) -> tuple[Path, int]:
    """The corpus of that size in workdir, built unless a previous run left it there."""
    path = workdir / f"stdlib-{size_mib}mib-seed{seed}.jsonl"
    record = path.with_suffix(".bytes")
    if path.is_file() and record.is_file():
        return path, int(record.read_text())
    print(f"building a {size_mib} MiB corpus in {path} ...", flush=True)
    n_bytes = build_corpus(path, size_mib, seed)
    record.write_text(str(n_bytes))
    return path, n_bytes


def text_bytes(path: Path, text_field: str) -> int:
    with open(path, encoding="utf-8") as lines:
        return sum(len(json.loads(line)[text_field].encode("utf-8")) for line in lines)


def train_sample_tokenizer(path: Path, seed: int) -> None:
    from moe.data.sources import stdlib_files
    from moe.data.tokenizer import train_tokenizer

    texts = [p.read_text(encoding="utf-8") for p in stdlib_files()]
    random.Random(seed).shuffle(texts)
    sample, size = [], 0
    for text in texts:
        if size >= TOKENIZER_SAMPLE:
            break
        sample.append(text)
        size += len(text)
    train_tokenizer(sample, VOCAB_SIZE).save(str(path))


def machine() -> dict:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": names[0] if names else platform.processor() or "CPU", "cores": os.cpu_count(),
            "usable_cores": usable, "os": platform.platform()}


def versions() -> dict:
    import numpy
    import tokenizers

    return {"python": platform.python_version(), "tokenizers": tokenizers.__version__, "numpy": numpy.__version__}


def print_table(rows: list[dict], startup: dict, num_proc: int, load: tuple[float, float]) -> None:
    info, library = machine(), versions()
    print(f"\n{info['cpu']}, {info['usable_cores']} usable cores; Python {library['python']}, tokenizers "
          f"{library['tokenizers']}; load average {load[0]:.2f} before, {load[1]:.2f} after")
    # On a shared machine wall-clock ratios measure other users' load too. "cores" is the CPU a variant's processes
    # got per second of wall time, MiB/CPU-s their text per CPU second; the parent's CPU seconds say whether the
    # parent (reading, JSON, pickling, writing) could hold the workers back.
    print(f"{'MiB':>6}  {'variant':<15}{'seconds':>9}{'MiB/s':>8}{'vs plain':>10}{'cores':>7}{'MiB/CPU-s':>11}"
          f"{'parent CPU s':>14}{'peak RSS MiB: all':>19}{'parent':>8}")
    for row in rows:
        tree = (f"{row['cores_busy']:>7.2f}{row['mib_per_cpu_s']:>11.2f}" if row["tree_cpu_s"]
                else f"{'n/a':>7}{'n/a':>11}")
        parent_cpu = f"{row['parent_cpu_s']:>14.1f}" if row["parent_cpu_s"] is not None else f"{'':>14}"
        peak = f"{row['tree_peak_rss_mib']:>19.0f}" if row["tree_peak_rss_mib"] is not None else f"{'n/a':>19}"
        print(f"{row['corpus_mib']:>6.0f}  {row['variant']:<15}{row['seconds']:>9.1f}{row['mib_per_s']:>8.2f}"
              f"{row['vs_plain']:>9.2f}x{tree}{parent_cpu}{peak}{row['parent_peak_rss_mib']:>8.0f}")
    print(f"worker start-up ({num_proc} workers, to the first result of a tiny chunk): the first call in a process "
          f"{startup['first_s']:.2f} s (it starts the fork server), later calls {startup['later_s']:.2f} s")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    corpus = parser.add_mutually_exclusive_group()
    corpus.add_argument("--sizes", default="256,1024", help="corpus sizes in MiB of text, comma-separated")
    corpus.add_argument("--mb", type=int, help="one corpus size in MiB of text (the same as --sizes MB)")
    corpus.add_argument("--input", help="a JSONL corpus to measure instead of the generated ones")
    parser.add_argument("--text-field", default="text", help="the field of --input's records that holds the text")
    parser.add_argument("--tokenizer", help="a tokenizer.json (default: a 4096-id BPE trained on the stdlib)")
    parser.add_argument("--num-proc", type=int, default=2, help="processes of the engine-N and plain-xN variants")
    parser.add_argument("--variants", nargs="+", default=None,
                        help="default: plain plain-threads engine-1 engine-N plain-xN (N: --num-proc)")
    parser.add_argument("--workdir", help="where corpora and ids are written, and corpora kept for the next run "
                                          "(default: a temporary folder, removed at the end)")
    parser.add_argument("--seed", type=int, default=0, help="of the corpus's shuffling and the tokenizer's sample")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "tokenize_speed.json"))
    args = parser.parse_args(argv)
    n = args.num_proc
    variants = args.variants or ["plain", "plain-threads", "engine-1", f"engine-{n}", f"plain-x{n}"]
    if "plain" not in variants:
        parser.error("--variants: plain is the baseline of every ratio, and must be among them")
    for variant in variants:
        known = variant in ("plain", "plain-threads") or any(
            variant.startswith(prefix) and variant.removeprefix(prefix).isdigit() for prefix in ("engine-", "plain-x"))
        if not known:
            parser.error(f"--variants: unknown variant {variant!r} (plain, plain-threads, engine-N or plain-xN)")
    sizes = [None] if args.input else [args.mb] if args.mb else [int(s) for s in args.sizes.split(",")]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        tokenizer = args.tokenizer
        if tokenizer is None:
            tokenizer = str(workdir / f"tokenizer-bpe{VOCAB_SIZE}-seed{args.seed}.json")
            if not Path(tokenizer).is_file():
                train_sample_tokenizer(Path(tokenizer), args.seed)
        load_before = os.getloadavg()
        (startup,), _ = run_measured([["--measure-startup", "--tokenizer", tokenizer, "--num-proc", str(n)]],
                                     {**os.environ, **SINGLE_THREAD})
        for size in sizes:
            if args.input:
                path, n_bytes = Path(args.input), text_bytes(Path(args.input), args.text_field)
            else:
                path, n_bytes = corpus_for(size, workdir, args.seed)
            results = {}
            for variant in variants:
                print(f"{n_bytes / MIB:.0f} MiB: running {variant} ...", flush=True)
                results[variant] = run_variant(variant, path, args, tokenizer, workdir)
            # The same ids from every variant, or the comparison is void.
            reference = results["plain"]
            for variant, result in results.items():
                if result["n_tokens"] != reference["n_tokens"] or result["crc32"] not in (None, reference["crc32"]):
                    raise SystemExit(f"{variant} wrote other ids than plain ({result['n_tokens']} tokens, CRC-32 "
                                     f"{result['crc32']}; plain {reference['n_tokens']}, {reference['crc32']}): "
                                     "its speed means nothing")
            for variant, result in results.items():
                cpu = result["tree_cpu_s"]
                rows.append({"corpus_mib": n_bytes / MIB, "variant": variant, **result,
                             "mib_per_s": n_bytes / MIB / result["seconds"],
                             "vs_plain": reference["seconds"] / result["seconds"],
                             "cores_busy": cpu / result["seconds"] if cpu else None,
                             "mib_per_cpu_s": n_bytes / MIB / cpu if cpu else None})
    load = (load_before[0], os.getloadavg()[0])
    print_table(rows, startup, n, load)

    record = {
        "date": str(date.today()), "machine": machine(), "versions": versions(), "load_average_before_after": load,
        "corpus": args.input or f"Python {platform.python_version()} stdlib, shuffled and repeated (seed {args.seed})",
        "tokenizer": args.tokenizer or f"byte-level BPE, {VOCAB_SIZE} ids, trained on {TOKENIZER_SAMPLE // MIB} MiB "
                                       "of the corpus",
        "chunk_chars": CHUNK_CHARS, "num_proc": n, "worker_startup_s": startup,
        "note": "mib_per_s: MiB of UTF-8 input text per second of wall time; vs_plain: the speed-up over the "
                "single-threaded plain tokenizers loop; tree_cpu_s: CPU seconds of the variant's processes and their "
                "descendants (sampled every 0.1 s); cores_busy: tree_cpu_s per second; mib_per_cpu_s: text per CPU "
                "second; tree_peak_rss_mib: sampled peak of their resident memory together; parent_*: the measured "
                "process alone (for plain-xN, none)",
        "rows": rows,
    }
    write_results(args.out, record)
    return record


if __name__ == "__main__":
    if any(a in ("--measure", "--measure-startup") for a in sys.argv[1:]):
        measured_main(sys.argv[1:])
    else:
        main()
