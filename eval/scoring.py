"""Log-likelihoods of tokenized multiple-choice items under a causal LM: the batching plan and the forward passes.

Each request's input is lm-eval's: whole = context ids + continuation ids, input = whole[:-1] left-truncated to
the model's max length ((whole)[-(max_length + 1):][:-1], lm_eval/models/huggingface.py
HFLM._loglikelihood_tokens), and its score is the summed log-probability of the continuation ids at the last
len(continuation) input positions.

Two ways to run an item (all its choices together, so that an item is always complete on one rank):
- shared: the inputs of all choices start with the same p tokens (p <= every context length). Those p tokens
  are prefilled once into a KV cache, the cache row is repeated once per choice (KVCache.select_rows) and the
  rest of every input runs right-padded in one batch: under causal attention padding after a token cannot
  change it. A choice's first continuation token is scored from the prefill's last logit when its context is
  exactly p tokens long. Items of one batch share a single p (all cache rows share positions): the smallest of
  theirs, the rest of a longer shared part simply runs with the remainders.
- full: every choice's whole input, right-padded, in one forward pass. Used when truncation applies (the
  inputs then no longer start with the context), when the inputs share no first token, without a KV cache, or
  when sharing is switched off.
Our Transformer is told each row's real length and runs everything but attention on the real tokens only
(moe/unpadded.py): right padding costs attention alone.

The plan is a deterministic list of batches computed identically on every rank; rank r runs batches r::world
and then dummy forward passes until it has made as many calls as the busiest rank, so that collectives inside
a sharded model's forward (FSDP's all-gathers) pair up on every rank.

An optional observer (eval/routing.py's RoutingRecorder) is told before every forward pass what its rows are
(ForwardObserver); with none, nothing is computed for it.
Shapes: B items, R requests (rows), T tokens, V vocabulary, N scored tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from tqdm import tqdm

from eval.requests import Item
from moe.kv_cache import KVCache
from moe.model import Transformer

SHARED, FULL = "shared", "full"
FORWARD_CALLS = {SHARED: 2, FULL: 1}


@dataclass(frozen=True)
class Batch:
    kind: str  # SHARED or FULL
    items: tuple[int, ...]  # indices into the item list
    prefix_len: int = 0  # p, shared batches only


class ForwardObserver(Protocol):
    def before_forward(self, ids: torch.Tensor, lengths: list[int], tasks: list[str | None], weights: list[int],
                       continues: list[int] | None = None) -> None:
        """The next forward pass runs ids (B, T), right-padded: row r's real tokens are its first lengths[r],
        belong to task tasks[r] and stand for weights[r] requests' identical tokens (a shared prefix stands for
        every choice of its item). continues[r], when given, is the row of the previous forward pass (the
        prefill) whose tokens precede row r's in its sequence (its KV cache row)."""


def _inputs(item: Item, max_length: int) -> list[list[int]]:
    """lm-eval's model input per choice: (context + continuation)[-(max_length + 1):][:-1]."""
    return [(context + continuation)[-(max_length + 1):][:-1] for context, continuation in item.tokens]


def shareable_prefix(item: Item, max_length: int) -> int:
    """Tokens p that every choice's input starts with and that precede every continuation (0: run in full)."""
    if any(len(context) + len(continuation) > max_length + 1 for context, continuation in item.tokens):
        return 0  # truncated inputs start mid-context, differently per choice
    inputs = _inputs(item, max_length)
    p = min(len(context) for context, _ in item.tokens)
    for other in inputs[1:]:
        common = next((i for i, (a, b) in enumerate(zip(inputs[0], other)) if a != b), min(len(inputs[0]),
                                                                                           len(other)))
        p = min(p, common)
    return p


def _pack(order: list[int], cost, batch_tokens: int) -> list[list[int]]:
    """Consecutive runs of `order`, each as long as cost(run) <= batch_tokens allows (at least one item)."""
    batches, current = [], []
    for i in order:
        if current and cost(current + [i]) > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def plan_batches(items: list[Item], max_length: int, batch_tokens: int, share_context: bool) -> list[Batch]:
    """The global list of batches: shared batches (longest shared prefix first), then full batches (longest
    input first), each holding whole items and at most batch_tokens tokens per forward pass (padding
    included) unless a single item needs more."""
    lengths = [[len(x) for x in _inputs(item, max_length)] for item in items]
    prefix = [shareable_prefix(item, max_length) if share_context else 0 for item in items]
    # Shared items in bands of 16 prefix tokens, longest remainder first within a band: a batch runs its
    # smallest prefix, so prefixes must be close, and its remainders are padded to the longest, so those must be
    # close too (on the six tasks: 200K tokens computed against 261K sorted by prefix alone, 129K without padding).
    shared = sorted((i for i in range(len(items)) if prefix[i] > 0),
                    key=lambda i: (-(prefix[i] // 16), -(max(lengths[i]) - prefix[i]), i))
    full = sorted((i for i in range(len(items)) if prefix[i] == 0), key=lambda i: (-max(lengths[i]), i))

    def shared_cost(run):  # tokens computed: the prefill, then every choice's remainder padded to the longest
        p = min(prefix[i] for i in run)
        rows = sum(len(lengths[i]) for i in run)
        return len(run) * p + rows * max(max(lengths[i]) - p for i in run)

    def full_cost(run):
        return sum(len(lengths[i]) for i in run) * max(max(lengths[i]) for i in run)

    plan = [Batch(SHARED, tuple(run), min(prefix[i] for i in run))
            for run in _pack(shared, shared_cost, batch_tokens)]
    plan += [Batch(FULL, tuple(run)) for run in _pack(full, full_cost, batch_tokens)]
    return plan


def forward_calls(plan: list[Batch], rank: int, world_size: int) -> int:
    """Forward passes rank `rank` makes for its share of the plan (dummy passes not counted)."""
    return sum(FORWARD_CALLS[batch.kind] for batch in plan[rank::world_size])


def _right_pad(rows: list[list[int]], pad_id: int, device) -> torch.Tensor:
    width = max(1, max(len(row) for row in rows))
    return torch.tensor([row + [pad_id] * (width - len(row)) for row in rows], dtype=torch.long, device=device)


def _sum_log_probs(pieces: list[tuple[torch.Tensor, list[int], list[int], list[int]]], n_requests: int):
    """Per-request sums of log p(target) over scored positions, from pieces (logits (M, V), rows, targets,
    requests): the n-th scored token is row rows[n] of its piece's logits, predicting targets[n] for request
    requests[n]. -> (R,) float64 on the CPU. Pieces rather than one concatenation of the logits, which would copy
    them (tens of MB per batch)."""
    sums = None
    for logits, rows, targets, requests in pieces:
        device = logits.device
        if sums is None:
            sums = torch.zeros(n_requests, dtype=torch.float64, device=device)
        if not targets:
            continue
        log_probs = F.log_softmax(logits.float(), dim=-1)  # (M, V)
        picked = log_probs[torch.tensor(rows, device=device), torch.tensor(targets, device=device)]  # (N,)
        sums.index_add_(0, torch.tensor(requests, device=device), picked.double())
    return sums.cpu()


def _scored_positions(inputs: list[list[list[int]]], items: list[Item]):
    """Per request: its input, the first scored input position and the continuation ids it scores (the targets).

    A continuation longer than the max length (where lm-eval asserts) keeps only its last max_length tokens, so
    that a small model's in-loop evaluation degrades instead of failing."""
    for item, item_inputs in zip(items, inputs):
        for (_, continuation), x in zip(item.tokens, item_inputs):
            start = max(0, len(x) - len(continuation))
            yield x, start, continuation[len(continuation) - (len(x) - start):]


def _logits_at(model, ids: torch.Tensor, lengths: list[int], rows: list[int], positions: list[int],
               observer: ForwardObserver | None, **kwargs) -> torch.Tensor:
    """(N, V) logits at (rows[i], positions[i]), which must be in row-major order, of right-padded ids whose row
    r holds lengths[r] real tokens. Our Transformer computes the output layer only there and runs everything
    but attention on the real tokens only, and the last block's feed-forward at the N positions only unless an
    observer records its routing; any other causal LM computes all logits and they are picked afterwards."""
    rows_t = torch.tensor(rows, dtype=torch.long, device=ids.device)
    positions_t = torch.tensor(positions, dtype=torch.long, device=ids.device)
    if isinstance(model, Transformer):
        mask = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
        mask[rows_t, positions_t] = True
        lengths_t = torch.tensor(lengths, dtype=torch.long, device=ids.device)
        return model(ids, logits_at=mask, lengths=lengths_t, trim_last_block=observer is None, **kwargs).logits
    return model(ids, **kwargs).logits[rows_t, positions_t]


def run_full(model, items: list[Item], max_length: int, pad_id: int, device,
             observer: ForwardObserver | None = None) -> torch.Tensor:
    """(R,) log-likelihoods of all choices of `items`, in item then choice order, one forward pass."""
    inputs = [_inputs(item, max_length) for item in items]
    flat = [x for item_inputs in inputs for x in item_inputs]
    rows, positions, targets = [], [], []
    for r, (x, start, continuation) in enumerate(_scored_positions(inputs, items)):
        rows += [r] * len(continuation)
        positions += range(start, len(x))
        targets += continuation
    ids, lengths = _right_pad(flat, pad_id, device), [len(x) for x in flat]
    if observer is not None:
        observer.before_forward(ids, lengths, [item.task for item in items for _ in item.tokens], [1] * len(flat))
    selected = _logits_at(model, ids, lengths, rows, positions, observer)  # (N, V)
    return _sum_log_probs([(selected, list(range(len(targets))), targets, rows)], len(flat))


def run_shared(model, items: list[Item], prefix_len: int, max_length: int, pad_id: int, device,
               observer: ForwardObserver | None = None) -> torch.Tensor:
    """As run_full, prefilling the first prefix_len tokens of each item once (see the module docstring)."""
    p = prefix_len
    inputs = [_inputs(item, max_length) for item in items]
    prefixes = [item_inputs[0][:p] for item_inputs in inputs]
    row_item = [b for b, item_inputs in enumerate(inputs) for _ in item_inputs]
    remainders = [x[p:] for item_inputs in inputs for x in item_inputs]
    width = max(1, max(len(r) for r in remainders))
    cache = KVCache.for_model(model, len(items), p + width)
    prefix_ids = _right_pad(prefixes, pad_id, device)
    last_column = torch.zeros(prefix_ids.shape, dtype=torch.bool, device=device)
    last_column[:, -1] = True
    if observer is not None:
        observer.before_forward(prefix_ids, [p] * len(items), [item.task for item in items],
                                [len(item.tokens) for item in items])
    last = model(prefix_ids, cache=cache, logits_at=last_column, trim_last_block=observer is None).logits  # (B, V)
    cache = cache.select_rows(torch.tensor(row_item, device=device))
    # Input position t of a request is the prefill's last logit when t = p - 1, else remainder position t - p.
    from_prefill, rest_rows, rest_positions, targets, owner = [], [], [], [], []
    prefill_targets, prefill_owner = [], []
    for r, (x, start, continuation) in enumerate(_scored_positions(inputs, items)):
        offset = 0
        if start == p - 1:
            from_prefill.append(row_item[r])
            prefill_targets.append(continuation[0])
            prefill_owner.append(r)
            offset = 1
        rest_rows += [r] * (len(continuation) - offset)
        rest_positions += range(start + offset - p, len(x) - p)
        targets += continuation[offset:]
        owner += [r] * (len(continuation) - offset)
    rest_ids, rest_lengths = _right_pad(remainders, pad_id, device), [len(r) for r in remainders]
    if observer is not None:
        observer.before_forward(rest_ids, rest_lengths, [items[b].task for b in row_item], [1] * len(remainders),
                                continues=row_item)
    rest = _logits_at(model, rest_ids, rest_lengths, rest_rows, rest_positions, observer, cache=cache)  # (N - prefill's, V)
    return _sum_log_probs([(last, from_prefill, prefill_targets, prefill_owner),
                           (rest, list(range(len(targets))), targets, owner)], len(remainders))


def run_plan(model, items: list[Item], plan: list[Batch], max_length: int, pad_id: int,
             rank: int = 0, world_size: int = 1,
             observer: ForwardObserver | None = None, progress: bool = False) -> tuple[dict[int, list[float]], int]:
    """Run rank `rank`'s batches: {item index: log-likelihood per choice}, and the forward calls made
    (dummy ones included: the same number on every rank). observer: told about every forward pass first.
    progress: show a progress bar of the batches (on stderr, cleared when done)."""
    device = next(model.parameters()).device
    results, calls = {}, 0
    batches = plan[rank::world_size]
    if progress:
        batches = tqdm(batches, desc="evaluation", unit="batch", leave=False, dynamic_ncols=True)
    for batch in batches:
        batch_items = [items[i] for i in batch.items]
        if batch.kind == SHARED:
            lls = run_shared(model, batch_items, batch.prefix_len, max_length, pad_id, device, observer)
        else:
            lls = run_full(model, batch_items, max_length, pad_id, device, observer)
        calls += FORWARD_CALLS[batch.kind]
        start = 0
        for i, item in zip(batch.items, batch_items):
            results[i] = lls[start:start + len(item.tokens)].tolist()
            start += len(item.tokens)
    busiest = max(forward_calls(plan, r, world_size) for r in range(world_size))
    for _ in range(busiest - calls):  # a rank short of work keeps its peers' collectives company
        dummy = torch.tensor([[pad_id]], device=device)
        if observer is not None:
            observer.before_forward(dummy, [0], [None], [0])  # no real token
        model(dummy)
        calls += 1
    return results, calls
