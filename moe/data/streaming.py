"""The streaming training stream: `hf:` sources read with `datasets`' streaming mode, tokenized and packed on the fly
in the DataLoader workers, mixed with the cached sources by the same `MixtureSchedule`, and resumed exactly.

Batches keep the map-style path's structure (sampler.py): global batch g is samples [g*W*B, (g+1)*W*B), rank r
takes its B consecutive ones, and `schedule(k)` names the source of sample k. A cached source serves the window the
schedule names, so a mixture without streaming sources gives the very samples `MixtureDataset` gives; a streaming
source serves the next window of this reader's share of its stream. A reader is one (rank, DataLoader worker): the
DataLoader hands out iterable-dataset batches round-robin over its workers, so worker i of n yields global batches
i, i+n, ... (the loader checks every batch it yields against that order).

Sharding is `datasets`' own: `split_dataset_by_node` splits a stream over the ranks and `datasets.IterableDataset`
splits a rank's shards over the DataLoader workers, so every document goes to exactly one reader per epoch as long
as every reader gets a shard (`shard_strategy`). Packing is packing.py's: documents joined by EOS (encoded as the
token cache encodes them), windows of seq_len + 1 tokens at stride seq_len.

Resume: a reader's state is, per streaming source, the `datasets` state just before the document holding its next
token, plus how many tokens of that document are already used; resuming re-reads and re-tokenizes that one
document, so the state stays a few numbers however long documents are. torchdata's `StatefulDataLoader` saves and
restores each worker's state. Two things Lightning does not do are done by `StreamingLoader`: Lightning saves the
loader's state one batch ahead of training (it prefetches a batch), so the loader keeps its state after each batch
and saves the one matching the batches training consumed; and only rank 0 writes the checkpoint, so every rank's
state is gathered into it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import IterableDataset, get_worker_info

from moe.data.datasets import SourceTokens
from moe.data.mixture import MixtureSchedule
from moe.data.packing import window
from moe.data.parallel_tokenize import encode_with_eos
from moe.data.sources import HF_PREFIX, DataError, Source

# A streaming source's entry in MixtureSchedule's train_windows: the schedule needs a non-empty array per source,
# but only a streaming source's weight matters (its windows come from the stream, not from the schedule).
PLACEHOLDER_WINDOWS = np.zeros(1, dtype=np.int64)
STATE_VERSION = 1
_START = {"epoch": 0, "position": None, "skip": 0}


def source_label(source: Source) -> str:
    return source.name or source.path


def shard_strategy(source: Source, n_shards: int, world_size: int, num_workers: int) -> str:
    """`split_dataset_by_node`'s strategy for a stream of `n_shards` shards read by `world_size` ranks of
    `num_workers` DataLoader workers each, or a DataError when some worker would get no shard.

    "shards" gives each rank whole shards (round robin; some may get one more), each of its workers at least one.
    With fewer shards than readers, "examples" has every rank read every shard and keep one example in
    `world_size`: still each document once, but each rank reads all the data. With fewer shards than workers,
    `datasets` would leave workers idle, and an idle reader cannot serve its share of every batch."""
    workers = max(1, num_workers)
    if n_shards >= world_size * workers:
        return "shards"
    if n_shards >= workers:
        return "examples"
    raise DataError(
        f"streaming source {source_label(source)!r} has {n_shards} shard(s) (files, or Parquet row groups), fewer than "
        f"the {workers} DataLoader workers of each device; split it into at least {world_size * workers} files "
        "(devices x workers) or lower TextDataModule.num_workers"
    )


def open_stream(source: Source, rank: int, world_size: int, num_workers: int = 0):
    """This rank's share of a streaming `hf:<name>[:<config>]` source, as a `datasets.IterableDataset` of its text
    column (`datasets` splits it further over the DataLoader workers that iterate it), and the `shard_strategy`
    that split it."""
    import datasets
    from datasets.distributed import split_dataset_by_node

    if not source.path.startswith(HF_PREFIX):
        raise ValueError(f"only {HF_PREFIX!r} sources stream, got {source.path!r}")
    name, _, config = source.path[len(HF_PREFIX) :].partition(":")
    stream = datasets.load_dataset(name, config or None, split=source.split, data_files=source.data_files,
                                   revision=source.revision, streaming=True)
    columns = stream.column_names  # None when the features are known only once read: checked per document then
    if columns is not None:
        if source.text_field not in columns:
            raise DataError(f"streaming source {source_label(source)!r} has no column {source.text_field!r} (columns: "
                            f"{columns}); set Source.text_field")
        stream = stream.select_columns([source.text_field])
    if stream.num_shards < world_size * max(1, num_workers):
        stream = stream.reshard()  # Parquet: one shard per row group instead of per file
    strategy = shard_strategy(source, stream.num_shards, world_size, num_workers)
    if world_size > 1:
        stream = split_dataset_by_node(stream, rank, world_size, strategy=strategy)
    return stream, strategy


class _SourceStream:
    """One reader's share of one streaming source, packed into windows.

    The buffer starts at the first token of the oldest document still needed (the anchor); `_docs` holds, for each
    document in the buffer, the stream position just before it and its token count. The state is the anchor's
    (epoch, position) and the tokens of it already used, so resuming re-reads the anchor and skips those tokens.
    An epoch is one pass over the reader's share; each opens the stream afresh, so the share stays the same."""

    def __init__(self, source: Source, rank: int, world_size: int, num_workers: int, tokenizer: Tokenizer,
                 eos_id: int, seq_len: int, state: dict):
        self.source, self.rank, self.world_size, self.num_workers = source, rank, world_size, num_workers
        self.tokenizer, self.eos_id, self.seq_len = tokenizer, eos_id, seq_len
        self._buffer = np.empty(0, dtype=np.int64)
        self._cursor = state["skip"]  # first token of the next window, in the buffer
        self._docs: deque[tuple[tuple[int, dict | None], int]] = deque()
        self._open(state["epoch"], state["position"])

    def _open(self, epoch: int, position: dict | None) -> None:
        self._epoch, self._start = epoch, position
        self._stream, _ = open_stream(self.source, self.rank, self.world_size, self.num_workers)
        if position is not None:
            self._stream.load_state_dict(position)
        self._examples = iter(self._stream)
        self._advanced = False  # until the first example, the stream's own state_dict is not yet the live one
        self._documents = 0

    def _position(self) -> dict | None:
        return self._stream.state_dict() if self._advanced else self._start

    def _next_document(self) -> tuple[tuple[int, dict | None], str]:
        while True:
            before = (self._epoch, self._position())
            try:
                example = next(self._examples)
            except StopIteration:
                if self._documents == 0:
                    worker = get_worker_info()
                    raise DataError(
                        f"streaming source {source_label(self.source)!r} gave no documents to rank {self.rank}, DataLoader "
                        f"worker {worker.id if worker else 0}: its shard(s) hold no text in {self.source.text_field!r}"
                    ) from None
                self._open(self._epoch + 1, None)
                continue
            self._advanced = True
            text = example.get(self.source.text_field)
            if text is None and self.source.text_field not in example:
                raise DataError(f"streaming source {source_label(self.source)!r}: a record has no field "
                                f"{self.source.text_field!r} (fields: {sorted(example)}); set Source.text_field")
            if text is not None and not isinstance(text, str):
                raise DataError(f"streaming source {source_label(self.source)!r}: field {self.source.text_field!r} holds "
                                f"{type(text).__name__}, not text")
            if text:  # empty documents are left out, as the cached sources leave them out
                self._documents += 1
                return before, text

    def next_window(self) -> np.ndarray:
        """The next seq_len + 1 tokens; the last is the first of the next window."""
        need = self._cursor + self.seq_len + 1 - len(self._buffer)
        pieces = [self._buffer]
        while need > 0:
            before, text = self._next_document()
            ids = encode_with_eos(self.tokenizer, [text], self.eos_id)
            self._docs.append((before, len(ids)))
            pieces.append(ids)
            need -= len(ids)
        if len(pieces) > 1:
            self._buffer = np.concatenate(pieces)
        chunk = self._buffer[self._cursor : self._cursor + self.seq_len + 1].copy()
        self._cursor += self.seq_len
        while self._cursor >= self._docs[0][1]:  # the anchor is used up; tokens remain after the cursor, so a
            _, n_tokens = self._docs.popleft()  # later document stays
            self._cursor -= n_tokens
            self._buffer = self._buffer[n_tokens:]
        return chunk

    def state_dict(self) -> dict:
        epoch, position = self._docs[0][0] if self._docs else (self._epoch, self._position())
        return {"epoch": epoch, "position": position, "skip": self._cursor}


class StreamingMixture(IterableDataset):
    """The training samples of one rank, in the map-style path's order and items (input_ids, labels, index k);
    each DataLoader worker yields whole batches, those of the global batches g with g % num_workers == its id.
    Stateful (torchdata's protocol): the state is the reader's next sample and each streaming source's position."""

    def __init__(self, sources: list[Source], token_files: list[SourceTokens | None], schedule: MixtureSchedule,
                 tokenizer_json: str, eos_id: int, seq_len: int, batch_size: int, rank: int, world_size: int):
        self.sources, self.token_files, self.schedule = sources, token_files, schedule
        self.tokenizer_json, self.eos_id, self.seq_len = tokenizer_json, eos_id, seq_len
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self._loaded: dict | None = None
        self._live: dict | None = None  # the running iteration's position and streams

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_live": None}

    @staticmethod
    def _reader() -> tuple[int, int]:
        worker = get_worker_info()
        return (worker.id, worker.num_workers) if worker is not None else (0, 1)

    def state_dict(self) -> dict[str, Any]:
        if self._live is not None:
            live = self._live
            streams = {s: stream.state_dict() for s, stream in live["streams"].items()}
            return {"next_batch": live["next_batch"], "offset": live["offset"], "streams": streams}
        if self._loaded is not None:
            return self._loaded
        return {"next_batch": self._reader()[0], "offset": 0, "streams": {}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded, self._live = state_dict, None

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # Set up now, not at the first sample: the state of an iteration is asked for before it yields anything.
        worker, n_workers = self._reader()
        state = self._loaded or {"next_batch": worker, "offset": 0, "streams": {}}
        self._loaded = None  # a later iteration without a loaded state starts afresh, as a DataLoader epoch does
        tokenizer = Tokenizer.from_str(self.tokenizer_json)
        streams = {
            s: _SourceStream(source, self.rank, self.world_size, n_workers, tokenizer, self.eos_id, self.seq_len,
                             state["streams"].get(s, _START))
            for s, source in enumerate(self.sources) if source.streaming
        }
        self._live = {"next_batch": state["next_batch"], "offset": state["offset"], "streams": streams}
        return self._samples(self._live, n_workers)

    def _samples(self, live: dict, n_workers: int) -> Iterator[dict[str, torch.Tensor]]:
        streams = live["streams"]
        arrays = {s: f.open() for s, f in enumerate(self.token_files) if f is not None}
        while True:
            k = (live["next_batch"] * self.world_size + self.rank) * self.batch_size + live["offset"]
            source, _ = self.schedule.source_ordinal(k)
            if source in streams:
                chunk = streams[source].next_window()
                inputs, labels = chunk[:-1], chunk[1:]
            else:
                inputs, labels = window(arrays[source], self.schedule(k)[1], self.seq_len)
            live["offset"] += 1
            if live["offset"] == self.batch_size:
                live["next_batch"], live["offset"] = live["next_batch"] + n_workers, 0
            yield {
                "input_ids": torch.from_numpy(inputs),
                "labels": torch.from_numpy(labels),
                "index": torch.tensor(k, dtype=torch.long),
            }
