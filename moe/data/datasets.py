"""Map-style torch datasets over the packed token arrays: the training mixture and the validation windows.

They hold file paths, not arrays: a DataLoader worker opens its own memory map on first use, since pickling an
`np.memmap` would copy the whole corpus into every worker.
"""

from __future__ import annotations

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
        return ShardedArray([f.open() for f in self.files])


class ShardedArray:
    """Several 1-d arrays read as their concatenation, without copying them: slices (step 1) and integer-array
    indexing, which is all that windows and the unigram baseline ask of a token stream. A window that spans a shard
    boundary is assembled from both."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays
        self.starts = np.cumsum([0] + [len(a) for a in arrays])  # starts[i]: offset of arrays[i]; last: the length
        self.dtype = np.result_type(*(np.asarray(a[0:0]).dtype for a in arrays))

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
            parts = [self.arrays[i][max(start, self.starts[i]) - self.starts[i] : min(stop, self.starts[i + 1])
                                    - self.starts[i]] for i in range(first, last + 1)]
            return parts[0] if len(parts) == 1 else np.concatenate(parts).astype(self.dtype, copy=False)
        positions = np.asarray(index)
        if positions.size and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"position out of range for a {len(self)}-token stream")
        shard = np.searchsorted(self.starts, positions, side="right") - 1
        out = np.empty(positions.shape, dtype=self.dtype)
        for i in np.unique(shard):
            where = shard == i
            out[where] = self.arrays[i][positions[where] - self.starts[i]]
        return out


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
