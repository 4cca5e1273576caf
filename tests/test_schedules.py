import math

import pytest
from ajepa.config import OptimConfig
from ajepa.train.schedules import ema_momentum, learning_rate, warmup_steps, weight_decay

CFG = OptimConfig(steps=1000, lr=2e-4, warmup_fraction=0.125, warmup_start_factor=0.2, final_lr=1e-6)


def test_learning_rate_warms_up_linearly_then_cosine_to_final():
    assert warmup_steps(CFG) == 125
    assert learning_rate(0, CFG) == pytest.approx(0.2 * 2e-4)
    assert learning_rate(62, CFG) == pytest.approx(0.2 * 2e-4 + 0.8 * 2e-4 * 62 / 125)
    assert learning_rate(125, CFG) == pytest.approx(2e-4)
    cosine = 1e-6 + 0.5 * (2e-4 - 1e-6) * (1 + math.cos(math.pi * 437 / 875))
    assert learning_rate(125 + 437, CFG) == pytest.approx(cosine)
    assert learning_rate(1000, CFG) == pytest.approx(1e-6)
    values = [learning_rate(s, CFG) for s in range(125, 1001)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_weight_decay_cosine_and_ema_linear():
    assert weight_decay(0, CFG) == pytest.approx(0.04)
    assert weight_decay(500, CFG) == pytest.approx(0.22)
    assert weight_decay(1000, CFG) == pytest.approx(0.4)
    assert ema_momentum(0, CFG) == pytest.approx(0.996)
    assert ema_momentum(250, CFG) == pytest.approx(0.997)
    assert ema_momentum(1000, CFG) == 1.0
    assert ema_momentum(5000, CFG) == 1.0  # clamped past the end


def test_no_warmup():
    cfg = OptimConfig(steps=10, lr=1.0, warmup_fraction=0.0, final_lr=0.0)
    assert learning_rate(0, cfg) == 1.0
    assert learning_rate(5, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
