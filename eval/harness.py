"""Zero-shot evaluation of a causal LM on multiple-choice tasks, scored as lm-evaluation-harness 0.4 scores them
(see eval/requests.py for the requests, eval/scoring.py for the forward passes and eval/metrics.py for the
metrics)."""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.distributed as dist

from eval.data import EvalDataError, check_doc, data_path, read_rows, resolve_local
from eval.fewshot import FEWSHOT_SEED, draw_examples
from eval.groups import aggregate, proportional_limits
from eval.metrics import TaskScores, item_scores
from eval.requests import Item, build_items
from eval.scoring import plan_batches, run_plan
from eval.tasks import Group, Task, get_task, leaf_tasks, resolve
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
# and re-tokenize its tasks: keyed by task definition, data files (path, size, mtime), subsample, few-shot
# settings and tokenizer. Row counts per data file, for stratified subsamples.
_ITEMS: dict[tuple, list[Item]] = {}
_ITEMS_KEPT = 256  # MMLU alone is 57 tasks
_ROW_COUNTS: dict[tuple, int] = {}


def _file_key(task: Task, data_dir, data_files, split: str) -> tuple:
    path = data_path(task, data_dir, data_files, split)
    if path is None:
        return ("hub", task.dataset_path, task.dataset_name, split)
    file = resolve_local(task, path, split)
    stat = file.stat()
    return (str(file.resolve()), stat.st_size, stat.st_mtime_ns)


def _rows(task: Task, data_dir, data_files, split: str) -> tuple[list[dict], list[str]]:
    return read_rows(task, data_path(task, data_dir, data_files, split), split)


def shots(task: Task, num_fewshot: int | None) -> int:
    """Examples per document: the evaluation's num_fewshot, else the task file's, else none; a file that says 0
    stays zero-shot whatever the evaluation asks (lm-eval never overrides it)."""
    if task.num_fewshot == 0:
        return 0
    return num_fewshot if num_fewshot is not None else (task.num_fewshot or 0)


def _row_count(task: Task, data_dir, data_files) -> int:
    key = _file_key(task, data_dir, data_files, task.split)
    if key not in _ROW_COUNTS:
        _ROW_COUNTS[key] = len(_rows(task, data_dir, data_files, task.split)[0])
    return _ROW_COUNTS[key]


def task_limits(selection: list[Task | Group], limit: int | None, group_limit: int | None, data_dir=None,
                data_files=None) -> dict[str, int | None]:
    """Items to score per task: `limit` each (None: all), and within a group given `group_limit`, that many
    for the whole group split over its tasks in proportion to their sizes (a stratified subsample), capped by
    `limit`."""
    limits = {task.name: limit for task in leaf_tasks(selection)}
    if group_limit is None:
        return limits
    for item in selection:
        if isinstance(item, Group):
            sizes = {task.name: _row_count(task, data_dir, data_files) for task in item.leaves()}
            for name, n in proportional_limits(sizes, group_limit).items():
                limits[name] = n if limit is None else min(n, limit)
    return limits


def _build(task: Task, encode, prefix_id: int, data_dir, data_files, limit, seed, num_fewshot,
           fewshot_seed, encode_batch) -> list[Item]:
    rows, places = _rows(task, data_dir, data_files, task.split)
    indices = subsample(len(rows), limit, seed)
    docs = {i: check_doc(task, rows[i], places[i]) for i in indices}
    examples = None
    n_shots = shots(task, num_fewshot)
    if n_shots:
        source = task.fewshot_source
        pool_rows, pool_places = (rows, places) if source == task.split else _rows(task, data_dir, data_files, source)
        pool = [check_doc(task, row, place) for row, place in zip(pool_rows, pool_places)]
        try:
            examples = draw_examples(task, docs, pool, n_shots, fewshot_seed)
        except ValueError as error:
            raise EvalDataError(str(error)) from None
    return build_items(task, docs, indices, encode, prefix_id, places, examples, encode_batch)


def build_task_items(tasks: list[str | Task], encode, prefix_id: int, data_dir=None, data_files=None,
                     limit: int | None | dict[str, int | None] = None, seed: int = 1234,
                     tokenizer_key: str | None = None, num_fewshot: int | None = None,
                     fewshot_seed: int = FEWSHOT_SEED, encode_batch=None) -> list[Item]:
    """Tokenized items of every task, in task then document order. Only the subsampled rows are preprocessed
    and checked (all rows are parsed, so a malformed line anywhere still fails with its file and line). limit:
    one for every task, or per task name. encode_batch: a list of strings -> their encode ids, faster (optional)."""
    items = []
    for task in tasks:
        task = get_task(task) if isinstance(task, str) else task
        task_limit = limit.get(task.name) if isinstance(limit, dict) else limit
        n_shots = shots(task, num_fewshot)
        key = None
        if tokenizer_key is not None:
            files = [_file_key(task, data_dir, data_files, task.split)]
            if n_shots and task.fewshot_source != task.split:
                files.append(_file_key(task, data_dir, data_files, task.fewshot_source))
            key = (task.fingerprint, tuple(files), task_limit, seed, n_shots, fewshot_seed, prefix_id, tokenizer_key)
        if key is None or key not in _ITEMS:
            built = _build(task, encode, prefix_id, data_dir, data_files, task_limit, seed, num_fewshot, fewshot_seed,
                           encode_batch)
            if key is None:
                items += built
                continue
            if len(_ITEMS) >= _ITEMS_KEPT:
                _ITEMS.pop(next(iter(_ITEMS)))
            _ITEMS[key] = built
        items += _ITEMS[key]
    return items


def task_items(tokenizer, tasks: list[str | Task | Group], data_dir: str | Path | None = None,
               data_files: dict[str, str | Path] | None = None, limit: int | None = None, seed: int = 1234,
               eos_id: int | None = None, num_fewshot: int | None = None, fewshot_seed: int = FEWSHOT_SEED,
               group_limit: int | None = None) -> list[Item]:
    """The tokenized items `evaluate` scores with these arguments (cached, so `evaluate` does not redo the work).
    Bad or missing data raises an EvalDataError naming the file and line: a caller that evaluates later (the
    in-loop callback) calls this first to fail before training rather than at the first evaluation."""
    eos_id = default_eos_id(tokenizer) if eos_id is None else eos_id
    selection = _selection(tasks)

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in tokenizer.encode_batch(texts, add_special_tokens=False)]

    tokenizer_key = tokenizer_hash(tokenizer) if hasattr(tokenizer, "to_str") else None
    limits = task_limits(selection, limit, group_limit, data_dir, data_files)
    return build_task_items(leaf_tasks(selection), encode, eos_id, data_dir, data_files, limits, seed,
                            tokenizer_key, num_fewshot, fewshot_seed, encode_batch)


def _selection(tasks: list[str | Task | Group]) -> list[Task | Group]:
    """Names and files resolved (eval.tasks.resolve); Task and Group objects kept."""
    out = []
    for item in dict.fromkeys(tasks):
        out += resolve([item]) if isinstance(item, str) else [item]
    return out


def default_batch_tokens(device: torch.device) -> int:
    """Tokens per scoring batch: small on CPUs, where a batch that stays in cache runs fastest (measured on 2
    cores: 2-4K tokens beat 16-32K by 1.7-2x), large on GPUs to fill them."""
    return 65536 if device.type == "cuda" else 4096


def evaluate(model, tokenizer, tasks: list[str | Task | Group], data_dir: str | Path | None = None,
             data_files: dict[str, str | Path] | None = None, limit: int | None = None, seed: int = 1234,
             batch_tokens: int | None = None, share_context: bool = True, eos_id: int | None = None,
             max_length: int | None = None, rank: int = 0, world_size: int = 1, return_requests: bool = False,
             num_fewshot: int | None = None, fewshot_seed: int = FEWSHOT_SEED, group_limit: int | None = None,
             replicas: int = 1, routing=None, progress: bool = False):
    """Scores {name: {"acc", "acc_stderr", ["acc_norm", "acc_norm_stderr",] "n"}} of every task, then of every
    group (with "tasks", its number of tasks), lm-evaluation-harness 0.4's numbers for the same documents.

    tasks: shipped task names, group names (mmlu, olmo_core8, ...), tags or paths to task files (eval.tasks).
    model: called as model(ids) -> object with .logits (B, T, V); a moe.Transformer also shares contexts
    through its KV cache. tokenizer: a `tokenizers.Tokenizer`. Rows come from data_files[task], else the task
    file's own data files, else data_dir (holding <task>/<split>.jsonl, or mmlu/<subject>/<split>.jsonl), else
    the HF Hub. limit: score a fixed-seed subsample of that many items per task; group_limit: that many items per
    group, split over its tasks in proportion to their sizes (stratified). num_fewshot: solved examples before
    each item (None: each task file's num_fewshot, else 0), drawn as lm-eval draws them with fewshot_seed.
    batch_tokens: tokens per forward pass, padding included (None: by device, see default_batch_tokens).
    max_length: the model's context (default model.config.max_seq_len); longer requests are left-truncated as
    in lm-eval. share_context=False scores every choice's whole sequence (slower; same numbers).
    routing: an entered eval.routing.RoutingRecorder, told about every forward pass (None: nothing recorded).
    progress: show a progress bar of the forward passes (this rank's).

    Sharded: every rank passes its rank and world_size and all ranks must call this together; each runs its
    share of one global plan and the same number of forward passes, and the scores are summed over ranks when
    torch.distributed is initialised (else each rank returns its own share's scores). Under tensor parallelism
    rank and world_size are the data-parallel ones, so a model's tensor-parallel peers run the same batches, and
    replicas (the peers per share, torch.distributed's world size over world_size) keeps each item counted once.

    return_requests=True returns (scores, requests) with requests {task: [{"index", "choice", "context",
    "continuation", "loglikelihood"}, ...]} for every request scored (all ranks' when distributed).
    """
    if world_size < 1 or not 0 <= rank < world_size or replicas < 1:
        raise ValueError(f"need 0 <= rank < world_size and replicas >= 1, got rank={rank}, "
                         f"world_size={world_size}, replicas={replicas}")
    eos_id = default_eos_id(tokenizer) if eos_id is None else eos_id
    if max_length is None:
        max_length = model.config.max_seq_len
    device = next(model.parameters()).device
    share_context = share_context and _supports_cache(model)
    selection = _selection(tasks)  # an unknown name or a bad task file fails before any data is read
    leaves = leaf_tasks(selection)

    items = task_items(tokenizer, selection, data_dir, data_files, limit, seed, eos_id, num_fewshot, fewshot_seed,
                       group_limit)
    if batch_tokens is None:
        batch_tokens = default_batch_tokens(device)
    plan = plan_batches(items, max_length, batch_tokens, share_context)
    with torch.inference_mode(), inference_context(model):
        lls, _ = run_plan(model, items, plan, max_length, eos_id, rank, world_size, observer=routing,
                          progress=progress)

    sync = world_size * replicas > 1 and dist.is_available() and dist.is_initialized()
    scores = {task.name: TaskScores(task.metrics, sync, replicas if sync else 1) for task in leaves}
    for i, item_lls in lls.items():
        item = items[i]
        scores[item.task].update(item_scores(item_lls, item.choice_chars, item.gold))
    results = {task.name: scores[task.name].compute() for task in leaves}
    for group in _groups(selection):
        results[group.name] = aggregate(group, results)
    if not return_requests:
        return results
    requests = {task.name: [] for task in leaves}
    every_rank = {}  # item index -> log-likelihoods; tensor-parallel peers return the same items
    for rank_lls in _gather(lls, world_size * replicas):
        every_rank.update(rank_lls)
    for i, item_lls in every_rank.items():
        item = items[i]
        for choice, ((context, continuation), ll) in enumerate(zip(item.requests, item_lls)):
            requests[item.task].append({"index": item.index, "choice": choice, "context": context,
                                        "continuation": continuation, "loglikelihood": ll})
    for rows in requests.values():
        rows.sort(key=lambda row: (row["index"], row["choice"]))
    return results, requests


def _groups(selection: list[Task | Group]) -> list[Group]:
    """The selection's groups and their subgroups, each once, a group before its subgroups."""
    out, seen = [], set()
    for item in selection:
        if isinstance(item, Group):
            for group in [item, *item.subgroups()]:
                if group.name not in seen:
                    seen.add(group.name)
                    out.append(group)
    return out
