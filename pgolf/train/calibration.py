"""The export's calibration (GPTQ's and the allocator's Hessians) against the wall-clock budget:
how long before the cap training stops so that it fits (export.gptq_calibration=train_reserved),
and the summary's account of where its sequences came from and whether training data was read
past the budget. Shipped only when export.gptq or export.allocate is on."""

from __future__ import annotations

from pgolf.compress.gptq import calibrate
from pgolf.config import ConfigError

# The measured reserve (export.gptq_calibration=train_reserved, gptq_reserve_seconds=0): the
# calibration timed before training, times RESERVE_FACTOR, plus RESERVE_PAD_S seconds.
RESERVE_FACTOR, RESERVE_PAD_S = 2.0, 1.0


def calibration_reserve(trainer, cfg, log) -> float:
    """Seconds training stops before train.max_wallclock_seconds so that the export's calibration
    fits in the budget: export.gptq_reserve_seconds when > 0; else, for gptq_calibration=
    train_reserved under a cap, measured: the export's own calibration (calibrate: the same
    training sequences, reading included) on the weights before training, its Hessians discarded,
    timed on the slowest rank, x RESERVE_FACTOR + RESERVE_PAD_S. Otherwise 0."""
    e, cap = cfg.export, cfg.train.max_wallclock_seconds
    if e.gptq_reserve_seconds > 0 or not (e.gptq or e.allocate) or e.gptq_calibration != "train_reserved" or cap <= 0:
        return e.gptq_reserve_seconds
    _, seconds, _ = calibrate(trainer.base_model, cfg, trainer.data.train_files, trainer.info.device)
    measured = trainer.info.max_all([seconds])[0]
    reserve = RESERVE_FACTOR * measured + RESERVE_PAD_S
    if reserve >= cap:
        raise ConfigError(f"the calibration takes {measured:.1f} s, so its reserve ({reserve:.1f} s) leaves no training "
                          f"in train.max_wallclock_seconds={cap:g}: lower export.gptq_seqs, or set "
                          f"export.gptq_calibration=self_generated")
    log(f"calibration reserve: {reserve:.1f} s = {RESERVE_FACTOR:g} x {measured:.2f} s (the export's calibration, timed "
        f"before training) + {RESERVE_PAD_S:g} s; training stops at {cap - reserve:.1f} s so that the calibration "
        f"reads the training data inside the {cap:g} s budget")
    return reserve


def calibration_record(cfg, train_ms: float, seconds: float, reserve: float) -> dict:
    """The summary's account of the calibration: its source and seconds, the reserve and how it was
    set, and whether training data was read past the budget: training time plus the calibration
    over train.max_wallclock_seconds, for the sources that read it (None: no cap)."""
    e, cap = cfg.export, cfg.train.max_wallclock_seconds
    used = train_ms / 1000 + seconds
    return {"source": e.gptq_calibration, "seconds": round(seconds, 3), "reserve_seconds": round(reserve, 3),
            "reserve": "given" if e.gptq_reserve_seconds > 0 else "measured" if reserve > 0 else "none",
            "train_plus_calibration_seconds": round(used, 3),
            "training_data_after_budget": None if cap <= 0 else e.gptq_calibration != "self_generated" and used > cap}


def log_calibration(r: dict, cfg, logger) -> None:
    """Log calibration_record r: an error when train_reserved read training data past the budget."""
    cap, after = cfg.train.max_wallclock_seconds, r["training_data_after_budget"]
    verdict = ("reads no training data" if r["source"] == "self_generated" else "no wall-clock budget" if after is None
               else f"{'training data read PAST' if after else 'inside'} the {cap:g} s budget")
    line = (f"calibration: {r['source']}, {r['seconds']:.2f} s; training + calibration "
            f"{r['train_plus_calibration_seconds']:.1f} s (reserve {r['reserve_seconds']:.1f} s, {r['reserve']}): {verdict}")
    if after and r["source"] == "train_reserved":
        logger.error(f"{line}; not record-legal: raise export.gptq_reserve_seconds or set "
                     f"export.gptq_calibration=self_generated")
    else:
        logger.log(line + (" (export.gptq_calibration=train_after_budget: a non-record run)" if after else ""))
