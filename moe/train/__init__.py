"""Training layer: the LightningModule, optimiser and schedules, throughput accounting and callbacks.

The only part of `moe` (with `moe.data`) that imports Lightning; the model code stays plain PyTorch.
"""

from moe.train.module import LanguageModel, Sampling

__all__ = ["LanguageModel", "Sampling"]
