"""Rank-sharded, resumable sampler over the global sample stream.

Global batch g is samples [g*W*B, (g+1)*W*B); rank r reads its B consecutive ones. An epoch is `batches_per_epoch`
global batches. Where iteration starts is not the epoch Lightning passes to `set_epoch` but the number of training
batches already consumed (counted by the DataModule and saved in the checkpoint), read when iteration begins: so a
run resumed mid-epoch continues with exactly the next batch, and a run resumed at an epoch boundary starts the
next epoch. It subclasses DistributedSampler only so that Lightning does not wrap it in its own sampler.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from torch.utils.data import Dataset, DistributedSampler


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
