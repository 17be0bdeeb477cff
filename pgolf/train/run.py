"""One training run from start to finish: create (or resume) the run directory, train, export the
artifact, score the roundtrip, and write the summary."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from pgolf.compress.accounting import check_size
from pgolf.compress.container import ArtifactError
from pgolf.config import Config, config_from_dict
from pgolf.model.gpt import count_parameters, mlp_hidden_size
from pgolf.rules import EXIT_TERMINATED
from pgolf.runs import (RunDir, RunError, RunHooks, RunLock, RunLogger, checkpoint_step, create_run_dir,
                        find_run_dir, latest_checkpoint, read_json, write_json)
from pgolf.runtime.distributed import DistInfo, setup_distributed, teardown_distributed
from pgolf.runtime.interrupts import InterruptGuard, Interrupted
from pgolf.runtime.sdpa import attention_shape, sdpa_backend
from pgolf.train.checkpoint import load_checkpoint
from pgolf.train.export import export_and_roundtrip, size_to_dict
from pgolf.train.trainer import Trainer, configure_backends, prepare_data, run_loop, save_good_checkpoint


def load_resumable_config(run_dir: Path) -> Config:
    summary = RunDir(run_dir).read_summary()
    if summary.get("status") in ("done", "over_cap"):
        raise RunError(f"run {run_dir} already finished; start a new run instead of resuming it")
    return config_from_dict(read_json(RunDir(run_dir).config)["config"])


def run_training(
    cfg: Config,
    *,
    resume: str | None = None,
    preset: str | None = None,
    env_applied: list[str] | None = None,
    interrupt_at_step: int | None = None,
    console: bool = True,
    hooks: RunHooks = RunHooks(),
    other_runs: int = 0,
) -> dict:
    """Train, export and verify one run; returns its summary (also saved as summary.json).

    With resume (a run id or directory) the run's saved config is used unchanged.
    interrupt_at_step stops the loop after that step as if the process were killed (tests).
    other_runs: other pgolf runs training on this host (the caller counts them: the lab's ledger);
    with run.threads=0 the cores are divided among them and this run (apply_threads).

    Rank 0 holds the run directory's lock (RunLock) while it runs: a second writer is refused.
    SIGINT (Ctrl-C) and SIGTERM stop it alike: the step reached is checkpointed, the summary
    says `interrupted`; SIGINT propagates as KeyboardInterrupt (exit status 130), SIGTERM as
    SystemExit(EXIT_TERMINATED), 143, as a process ended by SIGTERM reports.
    """
    resume_dir = find_run_dir(resume, cfg.run.runs_dir) if resume else None
    if resume_dir is not None:
        cfg = load_resumable_config(resume_dir)

    def open_run(info: DistInfo) -> tuple[Path, RunLock]:
        if resume_dir is not None:
            return resume_dir, info.main_only(RunLock.acquire, resume_dir)
        return _create_run(cfg, info, preset, env_applied or [], RunLock.acquire)

    return _session(cfg, open_run, _restore_latest if resume_dir is not None else None, env_applied or [],
                    interrupt_at_step, console, hooks, other_runs)


def run_new(cfg: Config, preset: str, env_applied: list[str]) -> dict:
    """A new run as a shipped train_gpt.py trains it: the same training as run_training, in a
    run directory of its own that nothing else resumes, so without its lock."""
    return _session(cfg, lambda info: _create_run(cfg, info, preset, env_applied), None, env_applied,
                    None, True, RunHooks(), 0)


def _session(cfg: Config, open_run, restore, env_applied: list[str], interrupt_at_step, console, hooks: RunHooks,
             other_runs: int) -> dict:
    """The process around a run: distributed setup, threads, signals; open_run(info) gives the
    run directory and its lock (or None), restore (or None) continues a resumed run."""
    info = setup_distributed(cfg.train.device)
    threads_note = apply_threads(cfg.run.threads, other_runs)
    interrupts = InterruptGuard()
    try:
        with interrupts:  # the previous handlers return when the run ends, however it ends
            configure_backends(info.device)
            run_dir, lock = open_run(info)
            cfg.run.run_id = run_dir.name
            try:
                summary = _run(cfg, info, run_dir, restore, env_applied, interrupt_at_step, console, hooks,
                               interrupts, lock, threads_note)
                info.barrier()  # on success, no rank tears down while another still has collectives in flight
            finally:
                if info.is_main and lock is not None:
                    lock.release()
            return summary
    except Interrupted as exc:
        if exc.signum == signal.SIGTERM:
            raise SystemExit(EXIT_TERMINATED) from exc
        raise
    finally:
        teardown_distributed(info)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def thread_count(requested: int, other_runs: int, cores: int) -> int | None:
    """run.threads -> the thread count to set, or None to leave torch's default: N > 0 exactly;
    0 (auto) with no other run on the host the default, else the cores shared fairly, at least 1."""
    if requested > 0:
        return requested
    if other_runs <= 0:
        return None
    return max(1, cores // (other_runs + 1))


def apply_threads(requested: int, other_runs: int) -> str:
    """Set torch's intra-op threads (before any model is built) and return the line to log."""
    import torch

    threads = thread_count(requested, other_runs, available_cores())
    if threads is not None:
        torch.set_num_threads(threads)
    how = "run.threads" if requested > 0 else ("auto" if threads is not None else "torch's default")
    return (f"threads: {torch.get_num_threads()} ({other_runs} other pgolf runs training on this host; {how}, "
            f"{available_cores()} cores)")


def _create_run(cfg: Config, info: DistInfo, preset, env_applied, acquire=None) -> tuple[Path, RunLock | None]:
    """A new run directory with its config.json, locked by acquire(run_dir) when given."""
    def create() -> tuple[str, RunLock | None]:
        run_dir = create_run_dir(cfg)
        lock = acquire(run_dir) if acquire else None  # before config.json: a resume cannot find the run unlocked
        cfg.run.run_id = run_dir.name
        write_json(RunDir(run_dir).config, {"config": cfg.to_dict(), "preset": preset, "env": env_applied})
        return str(run_dir), lock

    run_dir, lock = info.main_only(create)
    return Path(run_dir), lock


def _run(cfg: Config, info: DistInfo, run_dir: Path, restore, env_applied, interrupt_at_step,
         console, hooks: RunHooks, interrupts: InterruptGuard, lock: RunLock | None, threads_note: str = "") -> dict:
    logger = RunLogger(run_dir, enabled=info.is_main, console=console)
    if threads_note:
        logger.log(threads_note)
    summary_path = RunDir(run_dir).summary
    if info.is_main:
        if lock is not None and (note := lock.takeover_message()):
            logger.log(note)
            logger.event("lock_takeover", previous_owner=lock.taken_over_from)
        write_json(summary_path, {"status": "running", "run_id": run_dir.name})
        hooks.run_started(run_dir, info.device, info.world_size)
    try:
        with sdpa_backend(cfg.train.sdpa_backend, info.device, attention_shape(cfg), logger.log, info.broadcast_object):
            return _train_export(cfg, info, run_dir, logger, restore, env_applied, interrupt_at_step, interrupts)
    except KeyboardInterrupt as exc:
        if info.is_main:
            by = exc.signal_name if isinstance(exc, Interrupted) else "SIGINT"
            message = _interrupted_message(run_dir, by)
            write_json(summary_path, {"status": "interrupted", "run_id": run_dir.name, "stop_reason": by,
                                      "checkpoint_step": _latest_step(run_dir), "message": message})
            logger.error(message)
        raise
    except Exception as exc:
        if info.is_main:
            write_json(summary_path, {"status": "failed", "run_id": run_dir.name, "error": str(exc)})
            logger.event("error", message=str(exc))
        raise
    finally:
        if info.is_main:
            hooks.run_ended(run_dir)


def _restore_latest(trainer: Trainer, run_dir: Path, logger: RunLogger) -> None:
    """Continue a resumed run from its latest checkpoint (after the warmup, which restores the
    initial state it started from)."""
    path = latest_checkpoint(RunDir(run_dir).checkpoints)
    if path is None:
        raise RunError(f"run {run_dir} has no checkpoint to resume from; it must be started again")
    info = trainer.info
    trainer.restore(load_checkpoint(path, info.rank, info.world_size, map_location=info.device))
    logger.log(f"resumed from {path.name} at step {trainer.step} ({trainer.training_time_ms:.0f} ms trained)")
    logger.event("resume", step=trainer.step, checkpoint=path.name)


def _latest_step(run_dir: Path) -> int | None:
    last = RunDir(run_dir).latest_checkpoint()
    return checkpoint_step(last) if last else None


def _interrupted_message(run_dir: Path, by: str) -> str:
    last = RunDir(run_dir).latest_checkpoint()
    return (f"interrupted by {by}; continue from {last.name} with `pgolf train --resume {run_dir}`" if last
            else f"interrupted by {by} before any step was checkpointed; start the run again")


def _train_export(cfg, info: DistInfo, run_dir: Path, logger: RunLogger, restore, env_applied,
                  interrupt_at_step, interrupts: InterruptGuard) -> dict:
    summary_path = RunDir(run_dir).summary
    logger.log(f"run: {run_dir}  device: {info.device}  world_size: {info.world_size}  "
               f"grad_accum_steps: {info.grad_accum_steps}")
    if env_applied:
        logger.log("official environment variables applied: " + " ".join(env_applied))
    data = prepare_data(cfg, info, logger)
    trainer = Trainer(cfg, info, data, logger)
    model = trainer.base_model
    logger.log(f"model_params: {count_parameters(model):,}  layers: {cfg.model.num_layers}  "
               f"dim: {cfg.model.model_dim}  heads: {cfg.model.num_heads}/{cfg.model.num_kv_heads}  "
               f"compile: {trainer.compiled}")
    muon = trainer.optimizers.muon
    logger.log(f"speed: muon {type(muon).__name__} (batched_ns {muon.batched})  prefetch: {trainer.loader.prefetch}  "
               f"fused_loss: {trainer.fused_loss}")
    logger.log(f"architecture: mlp {cfg.model.mlp} (hidden {mlp_hidden_size(cfg.model)})  unique_depth: "
               f"{model.unique_depth}  effective_depth: {model.effective_depth}")
    ckpt_dir = RunDir(run_dir).checkpoints
    trainer.warmup(cfg.train.warmup_steps)
    if restore is not None:
        restore(trainer, run_dir, logger)

    if cfg.export.gptq or cfg.export.allocate:  # the export calibrates: its reserve is off the stop and the schedule
        from pgolf.train.calibration import calibration_reserve

        trainer.reserve_s = calibration_reserve(trainer, cfg, logger.log)
    status, stop_reason = run_loop(trainer, cfg, info, logger, ckpt_dir, interrupt_at_step, interrupts)
    trainer.loader.close()  # training consumed its last batch: stop the prefetch thread
    summary = {"status": status, "run_id": run_dir.name, "steps": trainer.step,
               "train_time_ms": round(trainer.training_time_ms, 1), "stop_reason": stop_reason}
    if status != "trained":
        if info.is_main:
            write_json(summary_path, summary)
        return summary

    trainer.before_export()  # the callbacks leave the weights to export (QAT off, EMA applied)
    save_good_checkpoint(trainer, ckpt_dir, logger)
    pre = trainer.validate()
    logger.log(f"final pre-quant val_loss:{pre.val_loss:.4f} val_bpb:{pre.val_bpb:.4f}")
    result = export_and_roundtrip(trainer, cfg, run_dir, logger)
    summary.update(
        status="done" if result.size.fits else "over_cap",
        pre_quant=pre.to_dict(),
        roundtrip=result.roundtrip.to_dict(),
        roundtrip_stride=result.stride,
        size=size_to_dict(result.size),
        val_tokens_scored=data.val_tokens.numel() - 1,
        val_tokens_total=data.val_tokens_total,
        **({"calibration": result.calibration} if result.calibration else {}),
    )
    if info.is_main:
        write_json(summary_path, summary)
    _print_final(logger, summary, trainer, cfg, result)
    return summary


def _print_final(logger: RunLogger, summary: dict, trainer: Trainer, cfg: Config, result) -> None:
    steps, ms = summary["steps"], summary["train_time_ms"]
    pre, rt = summary["pre_quant"], summary["roundtrip"]
    logger.log("=" * 72)
    logger.log(f"steps: {steps}/{cfg.train.iterations} (stopped by {summary['stop_reason']})")
    logger.log(f"train_time: {ms / 1000:.1f} s  step_avg: {ms / max(steps, 1):.2f} ms")
    logger.log(f"pre-quant  val_loss: {pre['val_loss']:.4f}  val_bpb: {pre['val_bpb']:.4f}")
    for line in result.size.lines():
        logger.log(line)
    logger.log(f"roundtrip  val_loss: {rt['val_loss']:.4f}  val_bpb: {rt['val_bpb']:.4f}  "
               f"(artifact reloaded from {result.path.name}, window stride {result.stride})")
    logger.log(f"final_roundtrip_exact val_loss:{rt['val_loss']:.8f} val_bpb:{rt['val_bpb']:.8f}")
    if summary["val_tokens_scored"] < summary["val_tokens_total"]:
        logger.log(f"note: scored {summary['val_tokens_scored']:,} of {summary['val_tokens_total']:,} val tokens "
                   f"(train.val_max_tokens); set it to 0 for the official full-split metric")
    if not result.size.fits:
        try:
            check_size(result.size)
        except ArtifactError as exc:
            logger.error(str(exc))
    sys.stdout.flush()
