"""Tokenization of chunks of documents in single-threaded worker processes, one per core: the token cache's engine.

The parent reads chunks and hands out results while workers encode: a bounded number of chunks is in flight (two
per worker), so memory does not grow with the corpus, and results come back in the chunks' order. Workers return
ids already in the cache's dtype (uint16 for vocabularies up to 65,536), half the bytes of int32 to send back.

Workers come from a fork server (never `fork` of the parent, which may be running torch's and rayon's threads),
and start in milliseconds because they import numpy and tokenizers only. Two things would make each of them
import torch and Lightning as well (5 s and 400 MB per worker on a 2-core machine, for every shard):
- the `moe` package: unpickling a reference to `moe.data.parallel_tokenize.f` imports `moe` first, whose
  `__init__` imports the model (torch), and `moe.data`'s the data module (Lightning). So a worker loads this file
  by its path, under another name (`_BOOTSTRAP`, run by the builtin `exec` as the pool's initializer), and is sent
  its functions as attributes of that module (`_WorkerFunction`).
- the parent's `__main__`: `spawn` and `forkserver` import it in every new process, so that functions defined in
  it can be unpickled there (the `moe` command's is cli.py, which imports Lightning). Workers run nothing from it,
  so it is hidden while they start (`_main_hidden`). The fork server's own remedy, preloading `__main__`, did
  nothing before CPython gh-126631 (fixed in 3.13), and would put torch in the server that every worker forks from.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import multiprocessing
import os
import signal
import sys
import threading
import types
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor

import numpy as np
from tokenizers import Tokenizer

# Chunks sent per worker: one being encoded and one waiting, so that no worker idles while the parent collects
# results; more would only hold more chunks in memory.
_IN_FLIGHT_PER_WORKER = 2
# Imported once by the fork server, so that each worker, a fork of it, need not.
_FORKSERVER_PRELOAD = ["numpy", "tokenizers"]
# Serializes `_main_hidden`, so that two threads starting pools at once cannot restore each other's stand-in.
_MAIN_LOCK = threading.Lock()
# The name this file is loaded under in a worker, outside the `moe` package.
_WORKER_MODULE = "_moe_parallel_tokenize_worker"
# Run in each worker by the pool's initializer, the builtin `exec`: a builtin unpickles without importing anything.
_BOOTSTRAP = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location(name, path)
module = importlib.util.module_from_spec(spec)
sys.modules[name] = module
spec.loader.exec_module(module)
module._start_worker(tokenizer_json)
"""

# A worker's tokenizer, built once by `_start_worker`.
_worker_tokenizer: Tokenizer | None = None


def default_num_proc() -> int:
    """The cores this process may run on: its CPU affinity, which a job scheduler or `taskset` may restrict."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def encode_chunks(
    chunks: Iterable[list[str]], tokenizer: Tokenizer, eos_id: int, num_proc: int, dtype: np.dtype
) -> Iterator[tuple[np.ndarray, int, int]]:
    """For each chunk of documents (in order): (token ids of `doc EOS doc EOS ...` as `dtype`, number of documents,
    UTF-8 bytes of the chunk's text).

    The ids are those of `tokenizer.encode(doc, add_special_tokens=False)` for each document, whatever `num_proc`.
    With `num_proc` 1 the chunks are encoded in this process, by the tokenizers library's threads as the user set
    them (TOKENIZERS_PARALLELISM, RAYON_NUM_THREADS); with more, by that many single-threaded worker processes.
    An id that does not fit `dtype` is a ValueError; an error in a worker (a document that is not a str, say) is
    raised here, with its message. Closing the iterator early, or an error, stops the workers at once.
    """
    dtype = np.dtype(dtype)
    if not np.issubdtype(dtype, np.integer):
        raise ValueError(f"dtype must be an integer type, got {dtype}")
    if not 0 <= eos_id <= np.iinfo(dtype).max:
        raise ValueError(f"eos_id {eos_id} does not fit {dtype}")
    if num_proc < 1:
        raise ValueError(f"num_proc must be at least 1, got {num_proc}")
    if multiprocessing.current_process().daemon:
        num_proc = 1  # a daemonic process (a Pool's worker, say) may not start processes of its own
    if num_proc == 1:
        return (_encode(tokenizer, chunk, eos_id, dtype) for chunk in chunks)
    return _encode_in_workers(chunks, tokenizer.to_str(), eos_id, num_proc, dtype)


def encode_with_eos(tokenizer: Tokenizer, texts: list[str], eos_id: int) -> np.ndarray:
    """`doc0 EOS doc1 EOS ...` as int64 ids: how every document becomes tokens, in the cache and in a stream."""
    # add_special_tokens=False: an HF tokenizer's post-processor would otherwise add a BOS to every document,
    # while here documents are separated by EOS alone. The fast batch leaves out character offsets, unused here.
    encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    lengths = [len(encoding) for encoding in encodings]
    ids = np.empty(sum(lengths) + len(encodings), dtype=np.int64)  # any tokenizer's ids fit, whatever dtype is
    position = 0
    for encoding, length in zip(encodings, lengths):
        ids[position : position + length] = encoding.ids
        ids[position + length] = eos_id
        position += length + 1
    return ids


def _encode(tokenizer: Tokenizer, texts: list[str], eos_id: int, dtype: np.dtype) -> tuple[np.ndarray, int, int]:
    ids = encode_with_eos(tokenizer, texts, eos_id)
    if ids.size and int(ids.max()) > np.iinfo(dtype).max:
        raise ValueError(f"token id {int(ids.max())} does not fit {dtype}")
    return ids.astype(dtype), len(texts), sum(len(text.encode()) for text in texts)


def _encode_in_workers(chunks: Iterable[list[str]], tokenizer_json: str, eos_id: int, num_proc: int,
                       dtype: np.dtype) -> Iterator[tuple[np.ndarray, int, int]]:
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(_FORKSERVER_PRELOAD)
    else:  # Windows: each worker then imports numpy and tokenizers itself, a few tenths of a second
        context = multiprocessing.get_context("spawn")
    # A ProcessPoolExecutor rather than a multiprocessing.Pool: a worker that dies (killed for memory, say) fails
    # its chunk with BrokenProcessPool, where a Pool waits for the chunk forever.
    workers = ProcessPoolExecutor(
        num_proc,
        mp_context=context,
        initializer=exec,
        initargs=(_BOOTSTRAP, {"name": _WORKER_MODULE, "path": __file__, "tokenizer_json": tokenizer_json}),
    )
    encode = _WorkerFunction("_encode_in_worker")
    in_flight: collections.deque[Future] = collections.deque()
    finished = False
    try:
        for chunk in chunks:
            with _main_hidden():  # the executor starts its workers in submit
                in_flight.append(workers.submit(encode, chunk, eos_id, dtype))
            if len(in_flight) == _IN_FLIGHT_PER_WORKER * num_proc:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()
        finished = True
    finally:
        if not finished:  # the consumer stopped early, an error, Ctrl-C: the chunks being encoded are not needed
            _terminate(workers)
        workers.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def _main_hidden():
    """Start processes that do not import this program's `__main__` (see the module docstring).

    `multiprocessing` decides from `sys.modules["__main__"]` whether a new process imports it; an empty module in
    its place says no. Other threads see the empty module for as long as a process takes to start; none of this
    program's reads `__main__`."""
    with _MAIN_LOCK:
        main = sys.modules.get("__main__")
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            yield
        finally:
            if main is None:
                del sys.modules["__main__"]
            else:
                sys.modules["__main__"] = main


def _terminate(workers: ProcessPoolExecutor) -> None:
    """Stop the pool's workers now: Python 3.14's `terminate_workers`, and before it the same by hand."""
    if hasattr(workers, "terminate_workers"):
        workers.terminate_workers()
        return
    for process in list((workers._processes or {}).values()):
        process.terminate()


class _WorkerFunction:
    """A function of this file as a worker has it: pickled as an attribute of the worker's copy of this module,
    where pickle's own reference to `moe.data.parallel_tokenize` would make the worker import the `moe` package."""

    def __init__(self, name: str):
        self.name = name

    def __reduce__(self):
        return getattr, (_WorkerModule(), self.name)


class _WorkerModule:
    """This file's module as a worker loaded it (`_BOOTSTRAP`), when unpickled there."""

    def __reduce__(self):
        return importlib.import_module, (_WORKER_MODULE,)


def _start_worker(tokenizer_json: str) -> None:
    global _worker_tokenizer
    # One core per worker: the tokenizers library's threads would compete with the other workers. Both settings
    # are read at the first encode, so setting them before it is enough.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    # Ctrl-C reaches every process of the terminal: the parent stops the workers, and workers dying of it as well
    # would print a traceback each.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_tokenizer = Tokenizer.from_str(tokenizer_json)


def _encode_in_worker(texts: list[str], eos_id: int, dtype: np.dtype) -> tuple[np.ndarray, int, int]:
    return _encode(_worker_tokenizer, texts, eos_id, dtype)
