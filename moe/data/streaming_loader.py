"""The training loader of a mixture with streaming sources (streaming.py): torchdata's `StatefulDataLoader`, saving
the state of the batches training consumed, for every rank.

Lightning 2.6 saves a stateful loader's state in the checkpoint and restores it on `fit(ckpt_path=...)`, but saves
it after its prefetched batch (one past the last step) and writes rank 0's alone; `StreamingLoader` keeps the state
after each batch, saves the one matching the data module's consumed count, and gathers every rank's.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from tokenizers import Tokenizer
from torchdata.stateful_dataloader import StatefulDataLoader

from moe.data.datasets import SourceTokens
from moe.data.mixture import MixtureSchedule
from moe.data.sources import Source
from moe.data.streaming import STATE_VERSION, StreamingMixture, open_stream, source_label
from moe.errors import IncompatibleResume

# Loader states kept per batch: enough for any prefetch depth between the loader and the training step.
_KEPT_STATES = 32


class StreamingLoader(StatefulDataLoader):
    """The training loader over a `StreamingMixture`: a torchdata `StatefulDataLoader` whose state is the one after
    the batches training consumed (`consumed_batches()`; the batches yielded when it is None), for every rank.

    Lightning saves a stateful loader's state in the checkpoint and restores it on `fit(ckpt_path=...)`, but (2.6)
    saves it after its prefetched batch, one batch past the last step, and writes rank 0's alone; so the state
    after each batch is kept, and `state_dict` all-gathers the ranks' states over `process_group` (None: the
    default group): every rank must call it, as Lightning's checkpointing does. A new iteration (a new Lightning
    epoch) continues from the consumed position instead of restarting the stream."""

    def __init__(self, dataset: StreamingMixture, *, consumed_batches: Callable[[], int] | None = None,
                 process_group: Any = None, **loader_kwargs: Any):
        super().__init__(dataset, batch_size=dataset.batch_size, snapshot_every_n_steps=1, **loader_kwargs)
        self.consumed_batches = consumed_batches
        self.process_group = process_group
        self._start = 0  # global batch the next iteration starts at
        self._start_state: dict = {}  # the StatefulDataLoader state for it; {} is the beginning
        self._states: dict[int, dict] = {}  # next global batch -> state, for the batches this iteration yielded
        self._yielded = 0

    def _position(self) -> int:
        return self.consumed_batches() if self.consumed_batches is not None else self._yielded

    def _state_at(self, batch: int) -> dict:
        if batch == self._start:
            return self._start_state
        if batch not in self._states:
            raise RuntimeError(f"the streaming loader holds no state for global batch {batch}: it has yielded up to "
                               f"batch {self._yielded} and keeps the last {_KEPT_STATES}")
        return self._states[batch]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._states:  # a new iteration continues where training stands
            start = self._position()
            self._start, self._start_state = start, self._state_at(start)
            super().load_state_dict(self._start_state)
        if self.consumed_batches is not None and self.consumed_batches() != self._start:
            raise RuntimeError(f"the streaming loader starts at global batch {self._start}, but "
                               f"{self.consumed_batches()} were consumed: its state and the data module's disagree")
        self._states, self._yielded = {}, self._start
        return self._track(super().__iter__())

    def _track(self, batches: Iterator[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
        global_batch = self.dataset.batch_size * self.dataset.world_size
        for batch in batches:
            g = int(batch["index"][0]) // global_batch
            if g != self._yielded:  # the DataLoader no longer takes workers' batches round robin
                raise RuntimeError(f"the DataLoader yielded global batch {g} where batch {self._yielded} was due")
            self._yielded += 1
            self._states[self._yielded] = super().state_dict()
            self._states.pop(self._yielded - _KEPT_STATES, None)
            yield batch

    def state_dict(self) -> dict[str, Any]:
        position = self._position()
        mine = {"rank": self.dataset.rank, "next_batch": position, "loader": self._state_at(position)}
        return {
            "version": STATE_VERSION,
            "world_size": self.dataset.world_size,
            "num_workers": self.num_workers,
            "batch_size": self.dataset.batch_size,
            "ranks": self._gather(mine),
        }

    def _gather(self, mine: dict) -> dict[int, dict]:
        if self.dataset.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return {mine["rank"]: mine}  # one process (or ranks simulated in one): its own state
        states: list[Any] = [None] * dist.get_world_size(self.process_group)
        dist.all_gather_object(states, mine, group=self.process_group)
        return {state["rank"]: state for state in states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:  # a loader without state (another data path's): the stream's beginning
            self._start, self._start_state, self._states = 0, {}, {}
            super().load_state_dict({})
            return
        saved = {key: state_dict.get(key) for key in ("version", "world_size", "num_workers", "batch_size")}
        ours = {"version": STATE_VERSION, "world_size": self.dataset.world_size, "num_workers": self.num_workers,
                "batch_size": self.dataset.batch_size}
        changed = [f"{key} {saved[key]} -> {ours[key]}" for key in ours if saved[key] != ours[key]]
        if changed:
            raise IncompatibleResume(
                "the streaming data's readers differ from the checkpoint's (" + ", ".join(changed) + "), so its "
                "stream positions do not apply; resume with the same devices, TextDataModule.batch_size and "
                "TextDataModule.num_workers"
            )
        mine = state_dict["ranks"].get(self.dataset.rank)
        if mine is None:
            raise IncompatibleResume(f"the checkpoint holds no streaming position for rank {self.dataset.rank} "
                                     f"(only ranks {sorted(state_dict['ranks'])})")
        self._start, self._start_state, self._states = mine["next_batch"], mine["loader"], {}
        super().load_state_dict(mine["loader"])


def streaming_train_loader(
    sources: list[Source],
    token_files: list[SourceTokens | None],
    schedule: MixtureSchedule,
    tokenizer: Tokenizer,
    eos_id: int,
    seq_len: int,
    batch_size: int,
    rank: int,
    world_size: int,
    num_workers: int,
    seed: int,
    consumed_batches: Callable[[], int] | None = None,
    process_group: Any = None,
) -> StreamingLoader:
    """This rank's training loader over a mixture with streaming sources; `token_files[s]` is None exactly for the
    streaming ones, and `schedule` has one entry per source (PLACEHOLDER_WINDOWS for a streaming one).

    The batches depend on world_size and num_workers (they decide each reader's share of a stream), so both belong
    in the resume fingerprint. Each stream is opened here once, so a missing column or too few shards fail now."""
    if not len(sources) == len(token_files) == len(schedule.weights):
        raise ValueError(f"{len(sources)} sources, {len(token_files)} token files, {len(schedule.weights)} weights")
    for source, token_file in zip(sources, token_files):
        if source.streaming == (token_file is not None):
            raise ValueError(f"source {source_label(source)!r}: a token file is needed exactly for a non-streaming source")
    for source in sources:
        if source.streaming and open_stream(source, rank, world_size, num_workers)[1] == "examples" and rank == 0:
            warnings.warn(f"streaming source {source_label(source)!r} has fewer shards than devices x DataLoader workers, "
                          "so every device reads all of it (and keeps its share); split it into more files to read "
                          "less", stacklevel=2)
    if num_workers > 0:
        # The workers tokenize, one each: forked after the parent used the Rust thread pool, `tokenizers` would
        # warn in every worker and turn parallelism off anyway.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    dataset = StreamingMixture(sources, token_files, schedule, tokenizer.to_str(), eos_id, seq_len, batch_size,
                               rank, world_size)
    with warnings.catch_warnings():
        # torchdata 0.11 calls torch.set_vital, which this torch (2.13) deprecates: a warning about its code.
        warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
        return StreamingLoader(
            dataset,
            consumed_batches=consumed_batches,
            process_group=process_group,
            num_workers=num_workers,
            pin_memory=torch.cuda.is_available(),
            # The workers' base seed comes from this generator, not torch's global one: creating iterators must
            # not shift the training's random stream (the batches themselves depend on no seed drawn here).
            generator=torch.Generator().manual_seed(seed),
        )
