"""Throughput accounting: MFU by PaLM appendix B against datasheet peaks."""

import pytest
import torch

from moe import get_preset
from moe.train import throughput
from moe.train.throughput import ThroughputMeter, device_peak_tflops


@pytest.mark.parametrize("name,precision,peak", [
    ("NVIDIA H100 80GB HBM3", "bf16-mixed", 989.4),
    ("NVIDIA H100 PCIe", "bf16-mixed", 756.5),
    ("NVIDIA H100 NVL", "16-mixed", 835.5),
    ("NVIDIA H200", "bf16-true", 989.4),
    ("NVIDIA A100-SXM4-80GB", "32-true", 156.0),
    ("NVIDIA L40S", "bf16-mixed", 362.05),
    ("NVIDIA L4", "bf16-mixed", 121.0),
    ("Tesla T4", "bf16-mixed", None),
])
def test_peak_table(monkeypatch, name, precision, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert device_peak_tflops(torch.device("cuda", 0), precision) == peak


def test_cpu_has_no_peak():
    assert device_peak_tflops(torch.device("cpu"), "32-true") is None


def test_meter_rates(monkeypatch):
    clock = iter([100.0, 102.0, 102.0, 103.0, 103.0])
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: next(clock))
    flops = get_preset("mixtral-8x7b").flops_per_token(4096)
    meter = ThroughputMeter(flops, world_size=8, peak_tflops=989.4)
    meter.start()  # t = 100
    meter.update(4096 * 8)
    meter.update(4096 * 8)
    first = meter.report()  # t = 102, window of 2 s
    assert first["tokens_per_s"] == pytest.approx(4096 * 8)
    assert first["tflops_per_device"] == pytest.approx(4096 * 8 * flops / 8 / 1e12)
    assert first["mfu"] == pytest.approx(first["tflops_per_device"] / 989.4)
    meter.update(1000)
    second = meter.report()  # new window opened at 102, closes at 103
    assert second["tokens_per_s"] == pytest.approx(1000)
    assert meter.tokens_seen == 2 * 4096 * 8 + 1000


def test_mixtral_flops_per_token_by_hand():
    # PaLM appendix B: 6 N + 12 L H Q T, N the active non-embedding weights with the output layer.
    c = get_preset("mixtral-8x7b")
    active_without_input_embedding = c.num_active_params() - c.vocab_size * c.d_model
    assert c.flops_per_token(2048) == 6 * active_without_input_embedding + 12 * 32 * 32 * 128 * 2048
    assert 6 * active_without_input_embedding / 1e9 == pytest.approx(6 * 12.75, rel=0.01)  # ~12.75B active
