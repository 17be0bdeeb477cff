"""Learning-rate warmdown (the official lr_mul, plus the wall-clock-fraction form), hand numbers."""

from __future__ import annotations

import pytest

from pgolf.config import TrainConfig
from pgolf.train.lr import lr_scale


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**kw)


def test_iteration_warmdown_without_cap():
    c = cfg(iterations=1000, warmdown_iters=200, max_wallclock_seconds=0)
    elapsed = 123_456.0  # ignored without a cap
    assert lr_scale(0, elapsed, c) == 1.0
    assert lr_scale(799, elapsed, c) == 1.0
    assert lr_scale(800, elapsed, c) == 1.0  # (1000 - 800) / 200
    assert lr_scale(900, elapsed, c) == pytest.approx(0.5)
    assert lr_scale(950, elapsed, c) == pytest.approx(0.25)
    assert lr_scale(999, elapsed, c) == pytest.approx(0.005)
    # Official lr_mul: outside [iterations - warmdown, iterations) the multiplier is 1.0
    # (step == iterations is never trained).
    assert lr_scale(1000, elapsed, c) == 1.0


def test_iteration_warmdown_longer_than_training():
    c = cfg(iterations=100, warmdown_iters=400, max_wallclock_seconds=0)
    assert lr_scale(0, 0.0, c) == pytest.approx(0.25)  # (100 - 0) / 400
    assert lr_scale(60, 0.0, c) == pytest.approx(0.1)


def test_wallclock_warmdown_iters_official_formula():
    # cap 600 s; warmdown lasts warmdown_iters steps at the average step time so far.
    c = cfg(iterations=20_000, warmdown_iters=100, max_wallclock_seconds=600.0)
    # 1000 steps in 500 s: 500 ms/step -> warmdown 50 s; 100 s remain -> not yet.
    assert lr_scale(1000, 500_000.0, c) == 1.0
    # 1100 steps in 572 s: 520 ms/step -> warmdown 52 s; 28 s remain -> 28/52.
    assert lr_scale(1100, 572_000.0, c) == pytest.approx(28 / 52)
    # 1150 steps in 598.0 s: 520 ms/step -> 2 s / 52 s.
    assert lr_scale(1150, 598_000.0, c) == pytest.approx(2 / 52)
    # Past the cap: 0.
    assert lr_scale(1200, 600_000.0, c) == 0.0
    assert lr_scale(1210, 610_000.0, c) == 0.0
    # Iterations play no part once a cap is set: near `iterations` but early in the budget.
    assert lr_scale(19_990, 1_000.0, c) == 1.0


def test_wallclock_warmdown_at_step_zero():
    c = cfg(warmdown_iters=1200, max_wallclock_seconds=600.0)
    assert lr_scale(0, 0.0, c) == 1.0  # no step time known yet: 0 ms warmdown
    # Step 0 counts as one step: 1000 ms/step -> warmdown 1200 s > 599 s remaining.
    assert lr_scale(0, 1_000.0, c) == pytest.approx(599_000 / 1_200_000)


def test_wallclock_default_baseline_numbers():
    # The baseline: 1200 warmdown iters, 600 s. At ~43.5 ms/step the warmdown takes 52.2 s.
    c = cfg()
    assert c.warmdown_iters == 1200 and c.max_wallclock_seconds == 600.0 and c.warmdown_frac == 0.0
    step, elapsed = 10_000, 435_000.0  # 43.5 ms/step
    assert lr_scale(step, elapsed, c) == 1.0
    step, elapsed = 13_000, 565_500.0  # 43.5 ms/step, 34.5 s left of a 52.2 s warmdown
    assert lr_scale(step, elapsed, c) == pytest.approx(34_500 / 52_200)


def test_wallclock_warmdown_frac():
    c = cfg(warmdown_frac=0.2, warmdown_iters=1200, max_wallclock_seconds=600.0)
    # Last 20% of the 600 s budget = the last 120 s, independent of the step count.
    assert lr_scale(10, 400_000.0, c) == 1.0
    assert lr_scale(10, 480_000.0, c) == 1.0
    assert lr_scale(99_999, 480_000.0, c) == 1.0
    assert lr_scale(10, 540_000.0, c) == pytest.approx(0.5)
    assert lr_scale(10, 570_000.0, c) == pytest.approx(0.25)
    assert lr_scale(10, 600_000.0, c) == 0.0
    assert lr_scale(10, 700_000.0, c) == 0.0


def test_warmdown_frac_without_cap_uses_iterations():
    c = cfg(warmdown_frac=0.25, iterations=1000, max_wallclock_seconds=0)
    assert lr_scale(749, 0.0, c) == 1.0
    assert lr_scale(750, 0.0, c) == 1.0
    assert lr_scale(875, 0.0, c) == pytest.approx(0.5)
    assert lr_scale(990, 0.0, c) == pytest.approx(0.04)


@pytest.mark.parametrize("cap", [0.0, 600.0])
def test_no_warmdown(cap):
    c = cfg(warmdown_iters=0, max_wallclock_seconds=cap, iterations=100)
    for step, elapsed in ((0, 0.0), (50, 300_000.0), (99, 599_999.0), (100, 700_000.0)):
        assert lr_scale(step, elapsed, c) == 1.0


def test_wallclock_schedules_end_at_the_budget_less_the_calibration_reserve():
    """Training stops at max_wallclock_seconds less the export's calibration reserve (budget_ms,
    the one definition the stop uses): the warmdown reaches 0 there, not at the full cap."""
    from pgolf.train.lr import budget_ms

    frac = cfg(warmdown_frac=0.2, max_wallclock_seconds=600.0)
    assert budget_ms(frac, 100.0) == 500_000.0 and budget_ms(frac) == 600_000.0
    assert budget_ms(cfg(max_wallclock_seconds=0), 100.0) is None
    assert lr_scale(10, 400_000.0, frac, 100.0) == 1.0  # the warmdown is the last 20% of 500 s: 100 s
    assert lr_scale(10, 450_000.0, frac, 100.0) == pytest.approx(0.5)
    assert lr_scale(10, 500_000.0, frac, 100.0) == 0.0
    iters = cfg(warmdown_iters=100, max_wallclock_seconds=600.0)
    # 1000 steps in 474 s: 474 ms/step -> a 47.4 s warmdown; 26 s remain of 500 s.
    assert lr_scale(1000, 474_000.0, iters, 100.0) == pytest.approx(26 / 47.4)
    assert lr_scale(1050, 500_000.0, iters, 100.0) == 0.0


# --- train.min_lr: the warmdown's floor ---------------------------------------------------------

def record_lr_mul(frac: float, warmdown_frac: float, min_lr: float) -> float:
    """The 1.06108 record's lr_mul (pr1855 train_gpt.py), frac = elapsed / (cap - gptq reserve)."""
    return max((1.0 - frac) / warmdown_frac, min_lr) if frac >= 1.0 - warmdown_frac else 1.0


@pytest.mark.parametrize("reserve", [0.0, 0.5])
def test_min_lr_with_warmdown_frac_is_the_records_schedule(reserve):
    c = cfg(warmdown_frac=0.85, min_lr=0.1, max_wallclock_seconds=600.0)
    budget = 600_000.0 - 1000.0 * reserve
    for frac in (0.0, 0.1, 0.15, 0.3, 0.5, 0.8, 0.9, 0.915, 0.92, 0.99, 1.0, 1.1):
        assert lr_scale(7, frac * budget, c, reserve) == pytest.approx(record_lr_mul(frac, 0.85, 0.1)), frac
    assert lr_scale(7, 0.5 * budget, c, reserve) == pytest.approx(0.5 / 0.85)  # above the floor: linear
    assert lr_scale(7, 0.95 * budget, c, reserve) == 0.1  # the floor binds from frac 0.915
    assert lr_scale(7, budget, c, reserve) == 0.1


def test_min_lr_floors_the_official_warmdown_iters_forms():
    no_cap = cfg(iterations=1000, warmdown_iters=200, max_wallclock_seconds=0, min_lr=0.25)
    assert lr_scale(700, 0.0, no_cap) == 1.0
    assert lr_scale(900, 0.0, no_cap) == pytest.approx(0.5)
    assert lr_scale(960, 0.0, no_cap) == 0.25  # 0.2 floored
    assert lr_scale(999, 0.0, no_cap) == 0.25
    capped = cfg(warmdown_iters=100, max_wallclock_seconds=600.0, min_lr=0.25)
    assert lr_scale(1000, 474_000.0, capped, 100.0) == pytest.approx(26 / 47.4)  # 1000 steps at 474 ms
    assert lr_scale(1040, 492_960.0, capped, 100.0) == 0.25  # 474 ms/step: 7.04 s of 47.4 s left, 0.149 floored
    assert lr_scale(1050, 500_000.0, capped, 100.0) == 0.25
    frac_no_cap = cfg(warmdown_frac=0.25, iterations=1000, max_wallclock_seconds=0, min_lr=0.1)
    assert lr_scale(875, 0.0, frac_no_cap) == pytest.approx(0.5)
    assert lr_scale(990, 0.0, frac_no_cap) == 0.1


def test_min_lr_default_is_no_floor_and_is_validated():
    from pgolf.config import ConfigError
    from pgolf.config.resolve import resolve_config

    assert cfg().min_lr == 0.0
    assert lr_scale(10, 600_000.0, cfg(warmdown_frac=0.2)) == 0.0
    assert lr_scale(1200, 0.0, cfg(iterations=1200, max_wallclock_seconds=0)) == 1.0  # past the end: unchanged
    assert lr_scale(1199, 0.0, cfg(iterations=1200, max_wallclock_seconds=0)) == pytest.approx(1 / 1200)
    assert lr_scale(5, 0.0, cfg(warmdown_iters=0, max_wallclock_seconds=0, min_lr=0.5)) == 1.0  # no warmdown
    with pytest.raises(ConfigError, match=r"train.min_lr must be within \[0, 1\], got 1.5"):
        resolve_config(None, ["train.min_lr=1.5"], env={})
