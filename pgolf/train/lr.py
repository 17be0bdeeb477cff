"""Learning-rate multiplier: constant, then a linear warmdown to zero (or train.min_lr) at the end of training."""

from __future__ import annotations

from pgolf.train.config import TrainConfig


def budget_ms(cfg: TrainConfig, reserve_seconds: float = 0.0) -> float | None:
    """Training's wall-clock budget in ms, the one both the stop and the schedule use:
    max_wallclock_seconds less the seconds reserved for the export's calibration (None: no cap)."""
    return 1000.0 * (cfg.max_wallclock_seconds - reserve_seconds) if cfg.max_wallclock_seconds > 0 else None


def lr_scale(step: int, elapsed_ms: float, cfg: TrainConfig, reserve_seconds: float = 0.0) -> float:
    """Multiplier on every base learning rate at `step` after `elapsed_ms` of training time.

    - warmdown_frac > 0 and a wall-clock cap: decay over the last warmdown_frac of the budget.
    - warmdown_iters with a wall-clock cap (official): the warmdown lasts warmdown_iters steps at
      the average step time so far, ending when the budget runs out.
    - warmdown_iters without a cap (official): the last warmdown_iters of `iterations`.
    The budget is budget_ms(cfg, reserve_seconds). The multiplier never drops below train.min_lr
    (the 1.06108 record's max((1 - frac) / warmdown_frac, min_lr) in the warmdown; 1 before it).
    """
    return max(_warmdown(step, elapsed_ms, cfg, reserve_seconds), cfg.min_lr)


def _warmdown(step: int, elapsed_ms: float, cfg: TrainConfig, reserve_seconds: float) -> float:
    cap_ms = budget_ms(cfg, reserve_seconds)
    if cfg.warmdown_frac > 0:
        if cap_ms is not None:
            warmdown_ms = cfg.warmdown_frac * cap_ms
            remaining_ms = max(cap_ms - elapsed_ms, 0.0)
            return remaining_ms / warmdown_ms if remaining_ms <= warmdown_ms else 1.0
        return _iteration_warmdown(step, cfg.iterations, round(cfg.warmdown_frac * cfg.iterations))
    if cfg.warmdown_iters <= 0:
        return 1.0
    if cap_ms is None:
        return _iteration_warmdown(step, cfg.iterations, cfg.warmdown_iters)
    step_ms = elapsed_ms / max(step, 1)
    warmdown_ms = cfg.warmdown_iters * step_ms
    remaining_ms = max(cap_ms - elapsed_ms, 0.0)
    return remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0


def _iteration_warmdown(step: int, iterations: int, warmdown: int) -> float:
    if warmdown <= 0:
        return 1.0
    start = max(iterations - warmdown, 0)
    return max((iterations - step) / warmdown, 0.0) if start <= step < iterations else 1.0
