"""Map-style torch datasets over the packed token arrays: the training mixture and the validation windows.

They hold file paths, not arrays: a DataLoader worker opens its own memory map on first use, since pickling an
`np.memmap` would copy the whole corpus into every worker.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from moe.data.mixture import MixtureSchedule
from moe.data.packing import window


@dataclass(frozen=True)
class TokenFile:
    """One shard's token array on disk."""

    path: str
    dtype: str
    n_tokens: int
    offset: int = 0
    """Bytes before the ids: a NumPy header in a pre-tokenized .npy shard."""

    def open(self) -> np.memmap:
        return np.memmap(self.path, dtype=np.dtype(self.dtype), mode="r", offset=self.offset, shape=(self.n_tokens,))


@dataclass(frozen=True)
class SourceTokens:
    """A source's token stream: its shards' arrays one after the other."""

    files: tuple[TokenFile, ...]

    @property
    def n_tokens(self) -> int:
        return sum(f.n_tokens for f in self.files)

    @property
    def paths(self) -> list[str]:
        return [f.path for f in self.files]

    def open(self) -> np.ndarray | ShardedArray:
        """The stream as one array: the memory map itself for one shard, else a view over all of them."""
        if len(self.files) == 1:
            return self.files[0].open()
        return ShardedArray(list(self.files))


class ShardedArray:
    """Several token files read as the concatenation of their arrays, without copying them: slices (step 1) and
    integer-array indexing, which is all that windows and the unigram baseline ask of a token stream. A window that
    spans a shard boundary is assembled from both. Shards are mapped when first read and at most MAX_OPEN at a time, the least recently read closed first
    (each map holds a file descriptor; a corpus may have tens of thousands of shards)."""

    MAX_OPEN = 16  # per array; a process has several (training, validation), each DataLoader worker its own

    def __init__(self, files: list[TokenFile]):
        self.files = files
        self.starts = np.cumsum([0] + [f.n_tokens for f in files])  # starts[i]: offset of shard i; last: the length
        self.dtype = np.result_type(*(np.dtype(f.dtype) for f in files))
        self._open: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": collections.OrderedDict()}

    def _array(self, i: int) -> np.ndarray:
        if i in self._open:
            self._open.move_to_end(i)
        else:
            self._open[i] = self.files[i].open()
            if len(self._open) > self.MAX_OPEN:
                self._open.popitem(last=False)
        return self._open[i]

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise IndexError("a sharded token stream is read in contiguous slices")
            if stop <= start:
                return np.empty(0, dtype=self.dtype)
            first = int(np.searchsorted(self.starts, start, side="right")) - 1
            last = int(np.searchsorted(self.starts, stop, side="left")) - 1
            parts = [self._array(i)[max(start, self.starts[i]) - self.starts[i] : min(stop, self.starts[i + 1])
                                    - self.starts[i]] for i in range(first, last + 1)]
            return parts[0] if len(parts) == 1 else np.concatenate(parts).astype(self.dtype, copy=False)
        positions = np.asarray(index)
        if positions.size and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"position out of range for a {len(self)}-token stream")
        flat = positions.ravel()
        shard = np.searchsorted(self.starts, flat, side="right") - 1
        out = np.empty(flat.shape, dtype=self.dtype)
        order = np.argsort(shard, kind="stable")  # grouped by shard: one pass, however many shards
        bounds = np.searchsorted(shard[order], np.arange(len(self.files) + 1))
        for i in np.flatnonzero(np.diff(bounds)):
            picked = order[bounds[i] : bounds[i + 1]]
            out[picked] = self._array(int(i))[flat[picked] - self.starts[i]]
        return out.reshape(positions.shape)


class _PackedDataset(Dataset):
    def __init__(self, files: list[SourceTokens | None], seq_len: int):
        self.files = files
        self.seq_len = seq_len
        self._arrays: list[np.memmap] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}

    def _item(self, source: int, window_index: int, index: int) -> dict[str, torch.Tensor]:
        if self._arrays is None:
            self._arrays = [None if source is None else source.open() for source in self.files]  # None: a stream
        inputs, labels = window(self._arrays[source], window_index, self.seq_len)
        return {
            "input_ids": torch.from_numpy(inputs),
            "labels": torch.from_numpy(labels),
            "index": torch.tensor(index, dtype=torch.long),
        }


class MixtureDataset(_PackedDataset):
    """Sample k of the (unbounded) training stream; its length is one epoch, the sampler decides what is read."""

    def __init__(self, files: list[SourceTokens], seq_len: int, schedule: MixtureSchedule, epoch_samples: int):
        super().__init__(files, seq_len)
        self.schedule = schedule
        self.epoch_samples = epoch_samples

    def __len__(self) -> int:
        return self.epoch_samples

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        source, window_index = self.schedule(k)
        return self._item(source, window_index, k)


class ValidationDataset(_PackedDataset):
    """All held-out windows of all sources, source by source; a list of indices gets a batch of them."""

    def __init__(self, files: list[SourceTokens], seq_len: int, val_windows: list[np.ndarray]):
        super().__init__(files, seq_len)
        self.entries = [(s, int(w)) for s, windows in enumerate(val_windows) for w in windows]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int | list[int]) -> dict[str, torch.Tensor]:
        if isinstance(index, list):
            items = [self[i] for i in index]
            return {key: torch.stack([item[key] for item in items]) for key in items[0]}
        source, window_index = self.entries[index]
        return self._item(source, window_index, index)
