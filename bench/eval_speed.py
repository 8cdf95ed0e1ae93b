"""Zero-shot evaluation speed: our harness (eval.evaluate) against lm-evaluation-harness's HF backend on the same
model, data, tokenizer and CPU/GPU, in one process. Prints a table of items/s and writes a JSON record.

The model is a seeded random preset (default tiny-moe) with a byte-level BPE trained on the evaluation text,
exported once as an HF directory for lm-eval; both harnesses score the same fixed-seed subsample, and the script
checks that they agree on acc before it reports speed (a fast wrong answer is no result).

    PYTHONPATH=. python bench/eval_speed.py --data-dir ../shared/evaldata --tasks hellaswag arc_easy piqa \
        --limit 300 --lm-eval-batch-size 32
"""

from __future__ import annotations

import argparse
import platform
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
from eval.tasks import get_task
from moe import build_model
from moe.hf import save_hf_checkpoint
from moe.hf_tokenizer import save_hf_tokenizer


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="folder of <task>/validation.jsonl")
    parser.add_argument("--tasks", nargs="+", default=["hellaswag", "arc_easy", "piqa"])
    parser.add_argument("--limit", type=int, default=300, help="items per task (fixed-seed subsample)")
    parser.add_argument("--preset", default="tiny-moe")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--lm-eval-batch-size", type=int, nargs="+", default=[1, 32],
                        help="lm-eval batch sizes to time (1 is lm-eval's default)")
    parser.add_argument("--batch-tokens", type=int, default=None, help="our tokens per scoring batch (default: by device)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench/results/eval_speed.json")
    args = parser.parse_args()

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    torch.manual_seed(0)
    tokenizer = train_tokenizer(args.tasks, args.data_dir, args.vocab_size)
    model = build_model(args.preset, vocab_size=tokenizer.get_vocab_size(), max_seq_len=args.max_seq_len,
                        device=args.device).eval()
    n_items = {t: min(args.limit, len(load_docs(get_task(t), resolve_local(get_task(t), args.data_dir))))
               for t in args.tasks}
    total = sum(n_items.values())

    rows = {}
    evaluate(model, tokenizer, args.tasks, data_dir=args.data_dir, limit=8)  # warm-up (allocator, kernels)
    for share in (True, False):
        _ITEMS.clear()  # cold: reading, checking and tokenizing the data is timed, as it is for lm-eval
        start = time.perf_counter()
        ours = evaluate(model, tokenizer, args.tasks, data_dir=args.data_dir, limit=args.limit,
                        batch_tokens=args.batch_tokens, share_context=share)
        rows[f"ours (share_context={share})"] = (time.perf_counter() - start, ours)
    # Warm: the callback's case from its second evaluation on, with the tokenized items kept in memory.
    start = time.perf_counter()
    ours = evaluate(model, tokenizer, args.tasks, data_dir=args.data_dir, limit=args.limit,
                    batch_tokens=args.batch_tokens)
    rows["ours (default, items cached)"] = (time.perf_counter() - start, ours)

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir, yaml_dir = Path(tmp) / "hf", Path(tmp) / "tasks"
        save_hf_checkpoint(model, hf_dir)
        save_hf_tokenizer(tokenizer, hf_dir, "<|endoftext|>", args.max_seq_len)
        names = write_lm_eval_tasks(yaml_dir, args.data_dir, args.tasks)
        manager = TaskManager(include_path=str(yaml_dir))
        samples = {f"{PREFIX}{t}": subsample(n, None if n < args.limit else args.limit, 1234)
                   for t, n in ((t, len(load_docs(get_task(t), resolve_local(get_task(t), args.data_dir))))
                                for t in args.tasks)}
        for batch_size in args.lm_eval_batch_size:
            lm = HFLM(pretrained=str(hf_dir), device=args.device, dtype="float32", batch_size=batch_size)
            start = time.perf_counter()
            out = simple_evaluate(model=lm, tasks=names, task_manager=manager, samples=samples, num_fewshot=0,
                                  bootstrap_iters=0)
            elapsed = time.perf_counter() - start
            theirs = {t: {"acc": out["results"][f"{PREFIX}{t}"]["acc,none"]} for t in args.tasks}
            rows[f"lm-eval HF (batch_size={batch_size})"] = (elapsed, theirs)

    for name, (_, results) in rows.items():
        for t in args.tasks:
            if abs(results[t]["acc"] - theirs[t]["acc"]) > 1e-9:
                raise SystemExit(f"{name} disagrees with lm-eval on {t} acc: {results[t]['acc']} vs {theirs[t]['acc']}")

    baseline = total / elapsed  # the last lm-eval row: its largest batch size, the strongest baseline
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.processor() or 'CPU'}"
    print(f"\n{args.preset}, {', '.join(f'{t} {n}' for t, n in n_items.items())} items; {device}, "
          f"{torch.get_num_threads()} threads; torch {torch.__version__}")
    print(f"{'harness':<36}{'seconds':>10}{'items/s':>10}{'vs lm-eval b' + str(args.lm_eval_batch_size[-1]):>16}")
    records = []
    for name, (seconds, _) in rows.items():
        print(f"{name:<36}{seconds:>10.1f}{total / seconds:>10.1f}{total / seconds / baseline:>15.2f}x")
        records.append({"harness": name, "seconds": seconds, "items_per_s": total / seconds})
    import lm_eval
    record = {"date": str(date.today()), "device": device, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "lm_eval": getattr(lm_eval, "__version__", "?"), "preset": args.preset,
              "items": n_items, "batch_tokens": args.batch_tokens,
              "rows": records}
    write_results(args.out, record)


if __name__ == "__main__":
    main()
