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
    path: str
    dtype: str
    n_tokens: int

    def open(self) -> np.memmap:
        return np.memmap(self.path, dtype=np.dtype(self.dtype), mode="r", shape=(self.n_tokens,))


class _PackedDataset(Dataset):
    def __init__(self, files: list[TokenFile], seq_len: int):
        self.files = files
        self.seq_len = seq_len
        self._arrays: list[np.memmap] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}

    def _item(self, source: int, window_index: int, index: int) -> dict[str, torch.Tensor]:
        if self._arrays is None:
            self._arrays = [f.open() for f in self.files]
        inputs, labels = window(self._arrays[source], window_index, self.seq_len)
        return {
            "input_ids": torch.from_numpy(inputs),
            "labels": torch.from_numpy(labels),
            "index": torch.tensor(index, dtype=torch.long),
        }


class MixtureDataset(_PackedDataset):
    """Sample k of the (unbounded) training stream; its length is one epoch, the sampler decides what is read."""

    def __init__(self, files: list[TokenFile], seq_len: int, schedule: MixtureSchedule, epoch_samples: int):
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

    def __init__(self, files: list[TokenFile], seq_len: int, val_windows: list[np.ndarray]):
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
