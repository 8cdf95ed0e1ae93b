"""Zero-shot evaluation of a causal LM on multiple-choice tasks, scored as lm-evaluation-harness 0.4 scores them
(see eval/requests.py for the requests, eval/scoring.py for the forward passes and eval/metrics.py for the
metrics)."""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.distributed as dist

from eval.data import check_doc, data_path, read_rows, resolve_local
from eval.metrics import TaskScores, item_scores
from eval.requests import Item, build_items
from eval.scoring import plan_batches, run_plan
from eval.tasks import get_task
from moe.data.tokenizer import eos_id as default_eos_id  # the token documents were separated by in training
from moe.data.tokenizer import tokenizer_hash
from moe.generate import inference_context  # eval mode, dropless routing, eager: as generation runs


def subsample(n: int, limit: int | None, seed: int) -> list[int]:
    """All of range(n), or `limit` of them drawn with a fixed seed, in ascending order."""
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    return sorted(random.Random(seed).sample(range(n), limit))


def _supports_cache(model) -> bool:
    return hasattr(model, "config") and hasattr(model, "embed_tokens")


def _gather(obj, world_size: int) -> list:
    """obj from every rank when torch.distributed runs this world, else just this rank's."""
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        gathered = [None] * world_size
        dist.all_gather_object(gathered, obj)
        return gathered
    return [obj]


# Tokenized items of recent evaluations, so that an in-loop evaluation every N steps does not re-read, re-check
# and re-tokenize its tasks: keyed by task, data file (path, size, mtime), subsample and tokenizer.
_ITEMS: dict[tuple, list[Item]] = {}
_ITEMS_KEPT = 16


def _file_key(task, data_dir, data_files) -> tuple | None:
    path = data_path(task, data_dir, data_files)
    if path is None:
        return ("hub", task.hf_path, task.hf_name, task.split)
    file = resolve_local(task, path)
    stat = file.stat()
    return (str(file.resolve()), stat.st_size, stat.st_mtime_ns)


def build_task_items(tasks: list[str], encode, prefix_id: int, data_dir=None, data_files=None,
                     limit: int | None = None, seed: int = 1234, tokenizer_key: str | None = None) -> list[Item]:
    """Tokenized items of every task, in task then document order. Only the subsampled rows are preprocessed
    and checked (all rows are parsed, so a malformed line anywhere still fails with its file and line)."""
    items = []
    for name in tasks:
        task = get_task(name)
        key = None if tokenizer_key is None else (name, _file_key(task, data_dir, data_files), limit, seed,
                                                  prefix_id, tokenizer_key)
        if key is None or key not in _ITEMS:
            rows, places = read_rows(task, data_path(task, data_dir, data_files))
            indices = subsample(len(rows), limit, seed)
            docs = {i: check_doc(task, rows[i], places[i]) for i in indices}
            built = build_items(task, docs, indices, encode, prefix_id, places)
            if key is None:
                items += built
                continue
            if len(_ITEMS) >= _ITEMS_KEPT:
                _ITEMS.pop(next(iter(_ITEMS)))
            _ITEMS[key] = built
        items += _ITEMS[key]
    return items


def task_items(tokenizer, tasks: list[str], data_dir: str | Path | None = None,
               data_files: dict[str, str | Path] | None = None, limit: int | None = None, seed: int = 1234,
               eos_id: int | None = None) -> list[Item]:
    """The tokenized items `evaluate` scores with these arguments (cached, so `evaluate` does not redo the work).
    Bad or missing data raises an EvalDataError naming the file and line: a caller that evaluates later (the
    in-loop callback) calls this first to fail before training rather than at the first evaluation."""
    eos_id = default_eos_id(tokenizer) if eos_id is None else eos_id

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    tokenizer_key = tokenizer_hash(tokenizer) if hasattr(tokenizer, "to_str") else None
    return build_task_items(list(dict.fromkeys(tasks)), encode, eos_id, data_dir, data_files, limit, seed,
                            tokenizer_key)


def default_batch_tokens(device: torch.device) -> int:
    """Tokens per scoring batch: small on CPUs, where a batch that stays in cache runs fastest (measured on 2
    cores: 2-4K tokens beat 16-32K by 1.7-2x), large on GPUs to fill them."""
    return 65536 if device.type == "cuda" else 4096


def evaluate(model, tokenizer, tasks: list[str], data_dir: str | Path | None = None,
             data_files: dict[str, str | Path] | None = None, limit: int | None = None, seed: int = 1234,
             batch_tokens: int | None = None, share_context: bool = True, eos_id: int | None = None,
             max_length: int | None = None, rank: int = 0, world_size: int = 1, return_requests: bool = False):
    """Zero-shot scores {task: {"acc", "acc_stderr", ["acc_norm", "acc_norm_stderr",] "n"}}.

    model: called as model(ids) -> object with .logits (B, T, V); a moe.Transformer also shares contexts
    through its KV cache. tokenizer: a `tokenizers.Tokenizer`. Rows come from data_files[task], else from
    data_dir (holding <task>/validation.jsonl), else from the HF Hub. limit: score a fixed-seed subsample of
    that many items per task. batch_tokens: tokens per forward pass, padding included (None: by device,
    see default_batch_tokens). max_length: the
    model's context (default model.config.max_seq_len); longer requests are left-truncated as in lm-eval.
    share_context=False scores every choice's whole sequence (slower; same numbers).

    Sharded: every rank passes its rank and world_size and all ranks must call this together; each runs its
    share of one global plan and the same number of forward passes, and the scores are summed over ranks when
    torch.distributed is initialised (else each rank returns its own share's scores).

    return_requests=True returns (scores, requests) with requests {task: [{"index", "choice", "context",
    "continuation", "loglikelihood"}, ...]} for every request scored (all ranks' when distributed).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    eos_id = default_eos_id(tokenizer) if eos_id is None else eos_id
    if max_length is None:
        max_length = model.config.max_seq_len
    device = next(model.parameters()).device
    share_context = share_context and _supports_cache(model)
    tasks = list(dict.fromkeys(tasks))
    for name in tasks:
        get_task(name)  # an unknown name fails before any data is read

    items = task_items(tokenizer, tasks, data_dir, data_files, limit, seed, eos_id)
    if batch_tokens is None:
        batch_tokens = default_batch_tokens(device)
    plan = plan_batches(items, max_length, batch_tokens, share_context)
    with torch.inference_mode(), inference_context(model):
        lls, _ = run_plan(model, items, plan, max_length, eos_id, rank, world_size)

    sync = world_size > 1 and dist.is_available() and dist.is_initialized()
    scores = {name: TaskScores(get_task(name).metrics, sync) for name in tasks}
    for i, item_lls in lls.items():
        item = items[i]
        scores[item.task].update(item_scores(item_lls, item.choice_chars, item.gold))
    results = {name: scores[name].compute() for name in tasks}
    if not return_requests:
        return results
    requests = {name: [] for name in tasks}
    for rank_lls in _gather(lls, world_size):
        for i, item_lls in rank_lls.items():
            item = items[i]
            for choice, ((context, continuation), ll) in enumerate(zip(item.requests, item_lls)):
                requests[item.task].append({"index": item.index, "choice": choice, "context": context,
                                            "continuation": continuation, "loglikelihood": ll})
    for rows in requests.values():
        rows.sort(key=lambda row: (row["index"], row["choice"]))
    return results, requests
