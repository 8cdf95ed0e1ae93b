"""Learning-rate schedules against HF transformers' schedulers (the oracle) and at hand-computed steps."""

import math

import pytest
import torch
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup, get_wsd_schedule

from moe.train.schedule import lr_multiplier, warmup_cosine, warmup_stable_decay


def hf_multipliers(make_scheduler, steps: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(optimizer)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("warmup,total", [(2000, 10000), (10, 100), (0, 50), (7, 8)])
def test_cosine_matches_transformers(warmup, total):
    expected = hf_multipliers(
        lambda opt: get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, total, min_lr_rate=0.1), total + 1)
    ours = [warmup_cosine(s, warmup, total, 0.1) for s in range(total + 1)]
    assert ours == pytest.approx(expected, abs=1e-12)
    # Past the planned end HF's cosine rises again; ours stays at the floor.
    assert warmup_cosine(total + 7, warmup, total, 0.1) == pytest.approx(0.1)


def test_cosine_at_chosen_steps():
    f = lambda s: lr_multiplier(s, schedule="cosine", warmup_steps=2000, total_steps=100_000, min_ratio=0.1)
    assert f(0) == 0.0
    assert f(1000) == pytest.approx(0.5)
    assert f(2000) == pytest.approx(1.0)
    assert f(51_000) == pytest.approx(0.55)  # half way through the decay: 0.1 + 0.9 * 0.5
    assert f(100_000) == pytest.approx(0.1)
    assert f(200_000) == pytest.approx(0.1)  # past the end it stays at the floor


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
def test_wsd_matches_transformers_after_warmup(shape):
    warmup, total, decay = 20, 200, 40
    expected = hf_multipliers(
        lambda opt: get_wsd_schedule(opt, warmup, decay, num_training_steps=total, decay_type=shape,
                                     min_lr_ratio=0.1), total + 3)
    ours = [warmup_stable_decay(s, warmup, total, decay, 0.1, shape) for s in range(total + 3)]
    # HF starts its warmup at min_lr_ratio; ours ramps from zero like the cosine schedule.
    assert ours[warmup:] == pytest.approx(expected[warmup:], abs=1e-12)
    assert ours[:warmup] == pytest.approx([s / warmup for s in range(warmup)])


def test_wsd_at_chosen_steps():
    f = lambda s: lr_multiplier(s, schedule="wsd", warmup_steps=100, total_steps=1000, min_ratio=0.1,
                                decay_fraction=0.2, decay_shape="1-sqrt")
    assert f(50) == pytest.approx(0.5)
    assert f(100) == f(500) == f(799) == 1.0
    assert f(900) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.5)))
    assert f(1000) == pytest.approx(0.1)


def test_constant_and_unknown():
    assert lr_multiplier(5, schedule="constant", warmup_steps=10, total_steps=100, min_ratio=0.1) == 0.5
    assert lr_multiplier(50, schedule="constant", warmup_steps=10, total_steps=100, min_ratio=0.1) == 1.0
    with pytest.raises(ValueError, match="schedule='linear'"):
        lr_multiplier(5, schedule="linear", warmup_steps=10, total_steps=100, min_ratio=0.1)
