"""Rank-sharded samplers: the resumable one over the global training stream, and the one of the held-out windows.

Global batch g is samples [g*W*B, (g+1)*W*B); rank r reads its B consecutive ones. An epoch is `batches_per_epoch`
global batches. Where iteration starts is not the epoch Lightning passes to `set_epoch` but the number of training
batches already consumed (counted by the DataModule and saved in the checkpoint), read when iteration begins: so a
run resumed mid-epoch continues with exactly the next batch, and a run resumed at an epoch boundary starts the
next epoch. It subclasses DistributedSampler only so that Lightning does not wrap it in its own sampler, and its
loader is a `ResumableLoader` only so that Lightning knows a mid-epoch resume is exact.

Validation must not be wrapped either: Lightning's DistributedSampler pads every rank to the same length by
repeating windows, so those windows would count twice in the validation loss. `EvalShardSampler` gives every rank
the same number of batches (collectives inside a forward, as under FSDP, must not wait for a rank that has
finished) and every window to exactly one rank, varying batch sizes by at most one instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader, Dataset, DistributedSampler


class GlobalBatchSampler(DistributedSampler):
    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        batches_per_epoch: int,
        rank: int,
        world_size: int,
        consumed_batches: Callable[[], int],
    ):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=False, drop_last=True)
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.consumed_batches = consumed_batches

    def __iter__(self) -> Iterator[int]:
        start = self.consumed_batches()
        epoch_end = (start // self.batches_per_epoch + 1) * self.batches_per_epoch
        global_batch = self.batch_size * self.num_replicas
        for g in range(start, epoch_end):
            first = g * global_batch + self.rank * self.batch_size
            yield from range(first, first + self.batch_size)

    def __len__(self) -> int:
        # A full epoch even when resuming mid-epoch: Lightning ends the epoch when its restored batch count reaches
        # this length, which is exactly when the shorter resumed iteration runs out.
        return self.batches_per_epoch * self.batch_size


class ResumableLoader(DataLoader):
    """The training loader. Lightning warns on every mid-epoch resume ("your dataloader is not resumable") unless
    the loader has `state_dict` / `load_state_dict`; this one resumes exactly, but its position is not its own: it is
    the DataModule's consumed batch count, saved and checked against the data's fingerprint in the DataModule's
    state and read by `GlobalBatchSampler` when iteration begins. So the loader's own state is empty."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


class EvalShardSampler(DistributedSampler):
    """Yields this rank's batches (lists of dataset indices) of `n` items: contiguous, unrepeated, equally many
    per rank, each at most `batch_size` long unless there are fewer than that many batches' worth of items per
    rank (then a few batches hold one item more)."""

    def __init__(self, dataset: Dataset, batch_size: int, rank: int, world_size: int):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=False, drop_last=False)
        n = len(dataset)
        if n < world_size:
            raise ValueError(f"{n} validation sequences cannot give each of {world_size} devices one")
        self.n_batches = min(math.ceil(n / (world_size * batch_size)), n // world_size)  # per rank
        total = world_size * self.n_batches
        # Global batch j of `total` holds n // total items, one more for the first n % total.
        self.bounds = [j * (n // total) + min(j, n % total) for j in range(total + 1)]

    def __iter__(self) -> Iterator[list[int]]:
        for j in range(self.rank * self.n_batches, (self.rank + 1) * self.n_batches):
            yield list(range(self.bounds[j], self.bounds[j + 1]))

    def __len__(self) -> int:
        return self.n_batches
