"""Throughput and model FLOPs utilisation (MFU), as in PaLM (Chowdhery et al. 2022, appendix B).

Training FLOPs per token come from the model config (6 x active non-embedding weights including the output
layer, plus 12 x layers x heads x head_dim x sequence length for attention); MFU divides the achieved FLOP/s
per device by the device's dense peak from its datasheet. Peaks are per device for dense (not 2:4 sparse)
matrix multiplies; unknown devices (and CPUs) report no MFU unless a peak is given.

Peak memory is logged beside them: on a CUDA device what PyTorch's allocator held at most since the previous log
(the peak is reset after each), and everywhere the process's peak resident host memory since it started (the kernel
keeps no other), each the largest over processes.
"""

from __future__ import annotations

import sys
import time

import lightning.pytorch as pl
import torch

from moe.train.parallel import data_parallel_size

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


def peak_host_memory_gib() -> float | None:
    """The peak resident memory of this process since it started, in GiB; None where the OS does not report it."""
    try:
        import resource  # Unix only
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20  # bytes on macOS, KiB on Linux


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


class ThroughputMonitor(pl.Callback):
    """Logs perf/tokens_per_s, perf/tflops_per_device and perf/mfu (with a known or given peak) over the optimizer
    steps since the previous log, and train/tokens_seen, every `trainer.log_every_n_steps` optimizer steps; also
    perf/peak_memory_gib on a CUDA device (allocated, since the previous log) and perf/peak_host_memory_gib (resident,
    since the process started), each the largest over processes.
    Validation inside fit is not training time: the clock stops for it. tokens_seen continues across a resume.
    Registered by LanguageModel by default; give one in `trainer.callbacks` to set its peak."""

    def __init__(self, peak_tflops: float | None = None):
        """
        Args:
            peak_tflops: Peak TFLOP/s of one device for MFU; None looks the device up in a datasheet table (no MFU
                on CPU or unknown devices).
        """
        self.peak_tflops = peak_tflops
        self.meter: ThroughputMeter | None = None
        self._tokens_seen_before = 0  # of the run this one resumes, from its checkpoint
        self._last_report_step = -1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.meter is None:
            peak = self.peak_tflops or device_peak_tflops(pl_module.device, str(trainer.precision))
            flops = pl_module.model_config.flops_per_token(batch["input_ids"].shape[1])
            self.meter = ThroughputMeter(flops, trainer.world_size, peak)
            self.meter.tokens_seen = self._tokens_seen_before
            self.meter.start()
        # Counted as the batch starts, so that a checkpoint saved at its end (by any callback) includes it. Tokens
        # of the global batch: tensor-parallel processes share theirs, so count data-parallel ones only.
        self.meter.update(batch["input_ids"].numel() * data_parallel_size(trainer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not is_log_step(trainer, self._last_report_step):
            return
        self._last_report_step = step
        for name, value in self.meter.report().items():
            pl_module.log(f"perf/{name}", value, prog_bar=name == "tokens_per_s")
        pl_module.log("train/tokens_seen", torch.tensor(float(self.meter.tokens_seen), dtype=torch.float64))
        self.log_peak_memory(trainer, pl_module)

    def log_peak_memory(self, trainer, pl_module) -> None:
        device = pl_module.device
        peaks = {}
        if device.type == "cuda":
            peaks["perf/peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)  # so that the next log shows its own interval's peak
        host = peak_host_memory_gib()
        if host is not None:
            peaks["perf/peak_host_memory_gib"] = host
        # The largest over processes, the one that runs out of memory first: one collective, at log steps only.
        values = trainer.strategy.reduce(torch.tensor(list(peaks.values()), device=device), reduce_op="max")
        for name, value in zip(peaks, values):
            pl_module.log(name, value)

    def on_validation_start(self, trainer, pl_module) -> None:
        if self.meter is not None:
            self.meter.pause()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.meter is not None:
            self.meter.resume()

    def state_dict(self) -> dict:
        return {"tokens_seen": self.meter.tokens_seen if self.meter is not None else self._tokens_seen_before}

    def load_state_dict(self, state_dict: dict) -> None:
        self._tokens_seen_before = int(state_dict["tokens_seen"])


def is_log_step(trainer, last_logged_step: int) -> bool:
    """Whether an optimizer step just ended at one of the steps Lightning logs and nothing logged it yet: global_step
    counts optimizer steps, so under gradient accumulation it stays 0 through the first micro-batches and repeats
    after each step."""
    step = trainer.global_step
    return step != 0 and step != last_logged_step and step % trainer.log_every_n_steps == 0
