"""Zero-shot evaluation speed: our harness (eval.evaluate) against lm-evaluation-harness's HF backend on the same
model, data, tokenizer and CPU/GPU, in one process. Prints a table of items/s per task set and writes a JSON record.

The model is a seeded random preset (default tiny-moe) with a byte-level BPE trained on the six original tasks'
text, exported once as an HF directory for lm-eval; both harnesses score the same fixed-seed subsample, and the
script checks that they agree on acc before it reports speed (a fast wrong answer is no result).

By default two task sets, timed one after the other with the same model: the six original tasks, and the eight with
sciq and openbookqa added. The six-task rows are the ones to compare across runs and code changes ("the new tasks
do not slow the old ones"); the eight-task set also times the two new tasks alone, so that the six's share of the
eight-task run (its time less theirs) can be set beside the six run on their own.

    PYTHONPATH=. python bench/eval_speed.py --data-dir ../shared/evaldata                 # six and eight tasks
    PYTHONPATH=. python bench/eval_speed.py --data-dir ../shared/evaldata --tasks hellaswag piqa --limit 300 \
        --lm-eval-batch-size 32
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from bench.results_file import write_results
from eval import evaluate
from eval.data import load_docs, resolve_local
from eval.harness import _ITEMS, subsample
from eval.lm_eval_tasks import PREFIX, write_lm_eval_tasks
from eval.tasks import get_task, task_names
from moe import build_model
from moe.hf import save_hf_checkpoint
from moe.hf_tokenizer import save_hf_tokenizer

ORIGINAL_TASKS = ["arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq"]  # the first record's six
NEW_TASKS = ["sciq", "openbookqa"]
SEED = 1234  # evaluate's default subsample seed, which lm-eval's samples must repeat


def train_tokenizer(tasks: list[str], data_dir: str, vocab_size: int) -> Tokenizer:
    texts = []
    for task in tasks:
        for doc in load_docs(get_task(task), resolve_local(get_task(task), data_dir))[:2000]:
            texts.append(" ".join(str(v) for v in doc.values()))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    return tok


def task_sets(tasks: list[str] | None) -> dict[str, list[str]]:
    """{set name: tasks}: the given tasks, or the six original tasks and the eight (with the new two)."""
    if tasks:
        return {"custom": tasks}
    missing = [t for t in ORIGINAL_TASKS + NEW_TASKS if t not in task_names()]
    if missing:
        raise SystemExit(f"tasks {missing} are not among eval.tasks.task_names(): {task_names()}")
    return {"six": ORIGINAL_TASKS, "eight": ORIGINAL_TASKS + NEW_TASKS}


def n_docs(task: str, data_dir: str) -> int:
    return len(load_docs(get_task(task), resolve_local(get_task(task), data_dir)))


def time_ours(model, tokenizer, tasks: list[str], args, cold: bool = True, **kwargs) -> tuple[float, dict]:
    if cold:
        _ITEMS.clear()  # reading, checking and tokenizing the data is timed, as it is for lm-eval
    start = time.perf_counter()
    scores = evaluate(model, tokenizer, tasks, data_dir=args.data_dir, limit=args.limit,
                      batch_tokens=args.batch_tokens, **kwargs)
    return time.perf_counter() - start, scores


# (row, cold, evaluate's options). Warm is the callback's case from its second evaluation on: tokenized items kept.
OUR_ROWS = [("ours, default (shared contexts), cold", True, {}),
            ("ours, full sequences, cold", True, {"share_context": False}),
            ("ours, default, items kept", False, {})]
NEW_ALONE = "ours, the new tasks alone, cold"


def run_set(model, tokenizer, tasks: list[str], hf_dir: Path, yaml_dir: Path, args) -> dict:
    """Our rows and lm-eval's for one task set, each timed `repeats` times (rows interleaved, so that the machine's
    drift falls on all of them) and checked to agree on acc: {"items", "rows", ...}, rows by their median time."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    n_items = {t: min(args.limit, n_docs(t, args.data_dir)) for t in tasks}
    new = [t for t in tasks if t in NEW_TASKS]
    names = write_lm_eval_tasks(yaml_dir, args.data_dir, tasks)
    manager = TaskManager(include_path=str(yaml_dir))
    samples = {f"{PREFIX}{t}": subsample(n, None if n < args.limit else args.limit, SEED)
               for t, n in ((t, n_docs(t, args.data_dir)) for t in tasks)}
    lms = {batch_size: HFLM(pretrained=str(hf_dir), device=args.device, dtype="float32", batch_size=batch_size)
           for batch_size in args.lm_eval_batch_size}
    evaluate(model, tokenizer, tasks, data_dir=args.data_dir, limit=8)  # warm-up (allocator, kernels)
    seconds, scores = {}, {}
    for _ in range(args.repeats):
        for name, cold, options in OUR_ROWS:
            elapsed, scores[name] = time_ours(model, tokenizer, tasks, args, cold, **options)
            seconds.setdefault(name, []).append(elapsed)
        if new and len(new) < len(tasks):
            seconds.setdefault(NEW_ALONE, []).append(time_ours(model, tokenizer, new, args)[0])
        for batch_size, lm in lms.items():
            start = time.perf_counter()
            out = simple_evaluate(model=lm, tasks=names, task_manager=manager, samples=samples, num_fewshot=0,
                                  bootstrap_iters=0)
            name = f"lm-eval HF, batch_size={batch_size}"
            seconds.setdefault(name, []).append(time.perf_counter() - start)
            scores[name] = {t: {"acc": out["results"][f"{PREFIX}{t}"]["acc,none"]} for t in tasks}

    theirs = scores[f"lm-eval HF, batch_size={args.lm_eval_batch_size[-1]}"]
    for name, results in scores.items():
        for t in tasks:
            if abs(results[t]["acc"] - theirs[t]["acc"]) > 1e-9:
                raise SystemExit(f"{name} disagrees with lm-eval on {t} acc: {results[t]['acc']} vs {theirs[t]['acc']}")

    median = {name: statistics.median(times) for name, times in seconds.items()}
    fastest = min((name for name in median if name.startswith("lm-eval")), key=median.get)  # the strongest baseline
    total = sum(n_items.values())
    record = {"tasks": tasks, "items": n_items, "repeats": args.repeats, "baseline": fastest, "rows": []}
    for name, times in seconds.items():
        whole = name != NEW_ALONE
        n = total if whole else sum(n_items[t] for t in new)
        record["rows"].append({"harness": name, "seconds": median[name], "items_per_s": n / median[name],
                               "items_per_s_range": [n / max(times), n / min(times)],
                               "vs_fastest_lm_eval": median[fastest] / median[name] if whole else None,
                               "all_seconds": times})
    if NEW_ALONE in median:
        old_items = sum(n for t, n in n_items.items() if t not in NEW_TASKS)
        share = median[OUR_ROWS[0][0]] - median[NEW_ALONE]
        record["old_tasks_share_of_default_cold"] = {"seconds": share, "items_per_s": old_items / share}
    return record


def print_set(name: str, record: dict, preset: str) -> None:
    print(f"\n{name}: {preset}, {', '.join(f'{t} {n}' for t, n in record['items'].items())} items; "
          f"median of {record['repeats']} (items/s range)")
    print(f"{'harness':<40}{'seconds':>9}{'items/s':>9}{'range':>14}  vs fastest lm-eval "
          f"({record['baseline'].split(', ')[1]})")
    for row in record["rows"]:
        low, high = row["items_per_s_range"]
        ratio = "" if row["vs_fastest_lm_eval"] is None else f"{row['vs_fastest_lm_eval']:>9.2f}x"
        print(f"{row['harness']:<40}{row['seconds']:>9.1f}{row['items_per_s']:>9.1f}{f'{low:.0f}-{high:.0f}':>14}"
              f"{ratio}")
    if "old_tasks_share_of_default_cold" in record:
        share = record["old_tasks_share_of_default_cold"]
        print(f"the six's share of ours default cold (less the new tasks alone): {share['seconds']:.1f} s, "
              f"{share['items_per_s']:.1f} items/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="folder of <task>/validation.jsonl")
    parser.add_argument("--tasks", nargs="+", default=None,
                        help="one task set (default: the six original tasks, then the eight with sciq and openbookqa)")
    parser.add_argument("--limit", type=int, default=200, help="items per task (fixed-seed subsample)")
    parser.add_argument("--preset", default="tiny-moe")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--lm-eval-batch-size", type=int, nargs="+", default=[1, 32, 64],
                        help="lm-eval batch sizes to time (1 is lm-eval's default); ours is compared with the fastest")
    parser.add_argument("--batch-tokens", type=int, default=None, help="our tokens per scoring batch (default: by device)")
    parser.add_argument("--repeats", type=int, default=1, help="times each row runs; medians are reported")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench/results/eval_speed.json")
    args = parser.parse_args()

    sets = task_sets(args.tasks)
    torch.manual_seed(0)
    tokenizer = train_tokenizer(args.tasks or ORIGINAL_TASKS, args.data_dir, args.vocab_size)
    model = build_model(args.preset, vocab_size=tokenizer.get_vocab_size(), max_seq_len=args.max_seq_len,
                        device=args.device).eval()
    records = {}
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "hf"
        save_hf_checkpoint(model, hf_dir)
        save_hf_tokenizer(tokenizer, hf_dir, "<|endoftext|>", args.max_seq_len)
        for name, tasks in sets.items():
            records[name] = run_set(model, tokenizer, tasks, hf_dir, Path(tmp) / f"tasks_{name}", args)

    import lm_eval
    import transformers

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.processor() or 'CPU'}"
    print(f"\n{device}, {torch.get_num_threads()} threads; torch {torch.__version__}, lm-eval "
          f"{getattr(lm_eval, '__version__', '?')}, transformers {transformers.__version__}")
    for name, record in records.items():
        print_set(name, record, args.preset)
    write_results(args.out, {"date": str(date.today()), "device": device, "threads": torch.get_num_threads(),
                             "torch": torch.__version__, "lm_eval": getattr(lm_eval, "__version__", "?"),
                             "transformers": transformers.__version__, "preset": args.preset, "limit": args.limit,
                             "batch_tokens": args.batch_tokens, "sets": records})


if __name__ == "__main__":
    main()
