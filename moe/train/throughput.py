"""Throughput and model FLOPs utilisation (MFU), as in PaLM (Chowdhery et al. 2022, appendix B).

Training FLOPs per token come from the model config (6 x active non-embedding weights including the output
layer, plus 12 x layers x heads x head_dim x sequence length for attention); MFU divides the achieved FLOP/s
per device by the device's dense peak from its datasheet. Peaks are per device for dense (not 2:4 sparse)
matrix multiplies; unknown devices (and CPUs) report no MFU unless a peak is given.
"""

from __future__ import annotations

import time

import torch

# Dense tensor-core peaks in TFLOP/s from NVIDIA datasheets: bf16/fp16 and tf32 (used for fp32 training when
# TF32 matmuls are allowed). Matched by substring of torch.cuda.get_device_name(), most specific first.
GPU_PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("gb200", {"bf16": 2500.0, "tf32": 1250.0}),
    ("b200", {"bf16": 2250.0, "tf32": 1100.0}),
    ("h200", {"bf16": 989.4, "tf32": 494.7}),  # also GH200, whose name contains it
    ("h100 nvl", {"bf16": 835.5, "tf32": 417.5}),
    ("h100 pcie", {"bf16": 756.5, "tf32": 378.0}),
    ("h100", {"bf16": 989.4, "tf32": 494.7}),  # SXM
    ("h800", {"bf16": 989.4, "tf32": 494.7}),
    ("a100", {"bf16": 312.0, "tf32": 156.0}),
    ("a800", {"bf16": 312.0, "tf32": 156.0}),
    ("l40s", {"bf16": 362.05, "tf32": 183.0}),
    ("l4", {"bf16": 121.0, "tf32": 60.0}),
]


def precision_kind(precision: str) -> str:
    """Lightning precision flag -> the peak that bounds its matmuls."""
    return "bf16" if precision.startswith(("bf16", "16")) else "tf32"


def device_peak_tflops(device: torch.device, precision: str) -> float | None:
    """Datasheet dense peak of one device for the given Lightning precision, or None when unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    for key, peaks in GPU_PEAK_TFLOPS:
        if key in name:
            return peaks[precision_kind(precision)]
    return None


class ThroughputMeter:
    """Tokens/s, TFLOP/s and MFU over the window since the previous report.

    Measured from wall time between reports without synchronising the device each step: over a window of
    many steps the host cannot run more than a few kernels ahead, so the figure converges to the device rate.
    """

    def __init__(self, flops_per_token: float, world_size: int, peak_tflops: float | None):
        self.flops_per_token, self.world_size, self.peak_tflops = flops_per_token, world_size, peak_tflops
        self.tokens_seen = 0  # over all ranks
        self._window_start: float | None = None
        self._window_tokens = 0
        self._paused_at: float | None = None

    def start(self) -> None:
        self._window_start, self._window_tokens = time.perf_counter(), 0

    def pause(self) -> None:
        """Stop the clock (e.g. for validation) until `resume`."""
        if self._paused_at is None:
            self._paused_at = time.perf_counter()

    def resume(self) -> None:
        if self._paused_at is not None:
            if self._window_start is not None:
                self._window_start += time.perf_counter() - self._paused_at
            self._paused_at = None

    def update(self, global_tokens: int) -> None:
        self.tokens_seen += global_tokens
        self._window_tokens += global_tokens

    def report(self) -> dict[str, float]:
        """Rates since the last report (empty before any tokens), then opens a new window."""
        now = time.perf_counter()
        if self._window_start is None or self._window_tokens == 0 or now <= self._window_start:
            self.start()
            return {}
        tokens_per_s = self._window_tokens / (now - self._window_start)
        tflops_per_device = tokens_per_s * self.flops_per_token / self.world_size / 1e12
        metrics = {"tokens_per_s": tokens_per_s, "tflops_per_device": tflops_per_device}
        if self.peak_tflops:
            metrics["mfu"] = tflops_per_device / self.peak_tflops
        self.start()
        return metrics
