"""GPUs the planner knows: memory as `nvidia-smi` reports it, the dense bf16/tf32 peak of moe/train/throughput.py's
datasheet table (the peak MFU is measured against), and the MFU this project has measured on the card, if any.
"""

from __future__ import annotations

from dataclasses import dataclass

# MFU recorded in docs/benchmarks.md for a training run on the card, with where it was recorded. None so far: that
# file's GPU training rows are "not yet measured" (only the MoE layer alone, 462 TFLOP/s, was timed on an H200).
RECORDED_MFU: dict[str, tuple[float, str]] = {}
ASSUMED_MFU = 0.40  # used when nothing is recorded: typical of well-tuned large dense runs (LLaMA-65B ~49%, below)


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    """Total device memory as nvidia-smi reports it (MiB / 1024)."""
    peak_key: str
    """Entry of moe.train.throughput.GPU_PEAK_TFLOPS holding its datasheet peak."""

    def peak_tflops(self, precision: str) -> float:
        from moe.train.throughput import GPU_PEAK_TFLOPS, precision_kind  # the one datasheet table

        return dict(GPU_PEAK_TFLOPS)[self.peak_key][precision_kind(precision)]

    def mfu(self) -> tuple[float, str]:
        """The MFU to assume on this card and where it comes from."""
        if self.name in RECORDED_MFU:
            return RECORDED_MFU[self.name]
        return ASSUMED_MFU, f"assumed: docs/benchmarks.md records no training MFU for {self.name}"


GPUS: dict[str, GPU] = {gpu.name: gpu for gpu in [
    GPU("a100-40gb", 40.0, "a100"),  # 40960 MiB
    GPU("a100-80gb", 80.0, "a100"),  # 81920 MiB
    GPU("h100-80gb", 79.6, "h100"),  # SXM, 81559 MiB
    GPU("h100-pcie", 79.6, "h100 pcie"),
    GPU("h100-nvl", 93.6, "h100 nvl"),  # 95830 MiB
    GPU("h200", 140.4, "h200"),  # 141 GB: 143771 MiB
    GPU("b200", 178.4, "b200"),  # 180 GB: 182700 MiB
    GPU("l40s", 45.0, "l40s"),  # 46068 MiB
    GPU("l4", 22.5, "l4"),  # 23034 MiB
]}


def get_gpu(name: str) -> GPU:
    key = name.lower().replace(" ", "-").replace("_", "-")
    if key not in GPUS:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}")
    return GPUS[key]
