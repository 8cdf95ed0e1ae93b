"""Data pipeline: text sources, a LLaMA-1-style byte-level BPE, cached token arrays, packing and mixtures."""

from moe.data.datamodule import TextDataModule
from moe.data.sources import DataError, Source

__all__ = ["DataError", "Source", "TextDataModule"]
