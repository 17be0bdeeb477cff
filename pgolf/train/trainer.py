"""The training loop: a Trainer owns the model, optimizers and data stream of one run and steps
them under a wall-clock cap, checkpointing and validating on the way.

One code path for every device: CUDA runs bf16 autocast and torch.compile, CPU runs fp32
eager; under torchrun each of N ranks takes 8 // N micro-batches per step, so a step sees
the same tokens whatever N is.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel as DDP

from pgolf.config import Config
from pgolf.data.shards import (DistributedTokenLoader, check_token_range, load_validation_tokens, read_shard_header,
                               resolve_shards)
from pgolf.data.tokenizer import check_vocab, load_tokenizer
from pgolf.eval.windows import EvalResult, autocast_for, evaluate_bpb
from pgolf.model.gpt import GPT, build_model
from pgolf.runs import RunLogger, checkpoint_step, latest_checkpoint
from pgolf.runtime.compile_check import RecompileWatch
from pgolf.runtime.distributed import DistInfo
from pgolf.runtime.interrupts import InterruptGuard, Interrupted
from pgolf.train.checkpoint import Checkpoint, prune_checkpoints, save_checkpoint
from pgolf.train.lr import lr_scale
from pgolf.train.muon import orthogonalize
from pgolf.train.optim import Optimizers, build_optimizers, muon_momentum_at, resolve_switch, use_parallel_muon
from pgolf.train.progress import TrainProgress
from pgolf.train.callbacks import CALLBACKS, TrainCallback


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainData:
    train_files: list[Path]
    val_tokens: Tensor
    luts: tuple[Tensor, Tensor, Tensor]
    tokenizer_name: str
    val_tokens_total: int


def prepare_data(cfg: Config, info: DistInfo, logger: RunLogger) -> TrainData:
    if cfg.data.source == "synthetic":
        from pgolf.data.synthetic import ensure_synthetic_corpus

        info.main_only(ensure_synthetic_corpus, cfg.data, log=logger.log)
    tokenizer = load_tokenizer(cfg.data.tokenizer_path)
    check_vocab(tokenizer, cfg.model.vocab_size)
    train_files = resolve_shards(cfg.train_files())
    for path in train_files:  # a corrupt shard fails now, not minutes into the run
        read_shard_header(path)
    seq_len = cfg.train.train_seq_len
    val_tokens = load_validation_tokens(cfg.val_files(), seq_len)
    check_token_range(val_tokens, cfg.model.vocab_size, f"validation shards {cfg.val_files()}")
    total = val_tokens.numel() - 1
    if cfg.train.val_max_tokens and cfg.train.val_max_tokens < total:
        usable = max(cfg.train.val_max_tokens // seq_len, 1) * seq_len
        val_tokens = val_tokens[: usable + 1]
    luts = tokenizer.byte_luts(cfg.model.vocab_size).to_torch(info.device)
    logger.log(f"data: {len(train_files)} train shards from {cfg.train_files()}; tokenizer {tokenizer.name}")
    logger.log(f"val: {val_tokens.numel() - 1:,} of {total:,} tokens scored from {cfg.val_files()}")
    return TrainData(train_files, val_tokens, luts, tokenizer.name, total)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def use_compile(cfg: Config, device: torch.device) -> bool:
    return cfg.train.compile == "on" or (cfg.train.compile == "auto" and device.type == "cuda")


def configure_backends(device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def build_callbacks(cfg) -> list[TrainCallback]:
    """The callbacks cfg switches on, in CALLBACKS order. The imports are written out (not
    computed) so the bundler can read them."""
    callbacks: list[TrainCallback] = []
    if CALLBACKS["qat"][1](cfg):
        from pgolf.train.qat import QATCallback

        callbacks.append(QATCallback(cfg.qat))
    if CALLBACKS["ema"][1](cfg):
        from pgolf.train.averaging import EMACallback

        callbacks.append(EMACallback(cfg.ema))
    return callbacks


class Trainer:
    """Owns the model, optimizers and data stream of one run and steps them."""

    def __init__(self, cfg: Config, info: DistInfo, data: TrainData, logger: RunLogger):
        self.cfg, self.info, self.data, self.logger = cfg, info, data, logger
        seed_everything(cfg.train.seed)
        self.base_model: GPT = build_model(cfg.model, info.device)
        self.compiled = compiled = use_compile(cfg, info.device)
        # What training and validation call: the model, its loss chunked (pgolf.train.losses), compiled.
        # auto is on for CUDA, where fp32 logits for the whole batch cost memory and bandwidth.
        self.fused_loss = resolve_switch(cfg.train.fused_loss, info.device.type == "cuda")
        loss_model = self.base_model
        if self.fused_loss:  # an optional module: shipped only when train.fused_loss allows it
            from pgolf.train.losses import ChunkedLossModel

            loss_model = ChunkedLossModel(self.base_model)
        if compiled:
            self.fast_model = torch.compile(loss_model, dynamic=False, fullgraph=True)
        else:
            self.fast_model = loss_model
        parallel_muon = use_parallel_muon(cfg.optim.parallel_muon, info.device, info.world_size,
                                          cfg.train.grad_clip_norm)
        self.optimizers: Optimizers = build_optimizers(self.base_model, cfg.optim, info.device, parallel_muon)
        if parallel_muon:  # Parallel Muon reduce-scatters the matrices' gradients itself, not DDP
            from pgolf.train.parallel_muon import ddp_ignore

            ddp_ignore(self.fast_model, self.optimizers.muon.param_groups[0]["params"])
        self.model = (
            DDP(self.fast_model, device_ids=[info.local_rank] if info.device.type == "cuda" else None,
                broadcast_buffers=False)
            if info.distributed else self.fast_model
        )
        if compiled:
            self.optimizers.muon.orthogonalize = torch.compile(orthogonalize)
        self.loader = DistributedTokenLoader(data.train_files, info.rank, info.world_size, info.device,
                                             vocab_size=cfg.model.vocab_size,
                                             prefetch=resolve_switch(cfg.data.prefetch, info.device.type == "cuda"))
        self.step = 0
        self.training_time_ms = 0.0
        self.callbacks = build_callbacks(cfg)  # QAT, EMA, ...: pgolf.train.callbacks
        self.exporting = False  # set by before_export
        for callback in self.callbacks:
            callback.on_train_start(self)

    # --- state -----------------------------------------------------------------------------
    def checkpoint(self) -> Checkpoint:
        return Checkpoint(self.step, self.training_time_ms, self.base_model.state_dict(),
                          self.optimizers.state_dict(), self.loader.state_dict(), self.info.world_size,
                          {cb.name: cb.state_dict() for cb in self.callbacks})

    def restore(self, ckpt: Checkpoint) -> None:
        self.base_model.load_state_dict(ckpt.model, strict=True)
        self.optimizers.load_state_dict(ckpt.optimizers)
        self.loader.load_state_dict(ckpt.loader)
        self.step, self.training_time_ms = ckpt.step, ckpt.training_time_ms
        for callback in self.callbacks:
            if callback.name in ckpt.callbacks:
                callback.load_state_dict(ckpt.callbacks[callback.name])
            elif callback.state_dict():
                raise RuntimeError(f"checkpoint at step {ckpt.step} has no state for '{callback.name}', which this run "
                                   f"uses; resume with the config the checkpoint was written with")

    # --- steps -----------------------------------------------------------------------------
    def train_step(self, scale: float) -> Tensor:
        """One optimizer step over 8 // world_size micro-batches; returns the mean loss."""
        cfg, accum = self.cfg.train, self.info.grad_accum_steps
        self.optimizers.zero_grad()
        total = torch.zeros((), device=self.info.device)
        for micro in range(accum):
            if self.info.distributed:
                self.model.require_backward_grad_sync = micro == accum - 1
                self.optimizers.arm_backward_sync(micro == accum - 1)
            x, y = self.loader.next_batch(cfg.train_batch_tokens, cfg.train_seq_len, accum)
            with autocast_for(self.info.device):
                loss = self.model(x, y)
            total += loss.detach()
            (loss / accum).backward()
        self.optimizers.set_muon_momentum(muon_momentum_at(self.step, self.cfg.optim))
        self.optimizers.set_lr_scale(scale)
        if cfg.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.base_model.parameters(), cfg.grad_clip_norm)
        self.optimizers.step()
        self.optimizers.zero_grad()
        return total / accum

    def warmup(self, steps: int) -> None:
        """Prime compilation and allocator with real steps, then restore the exact prior state."""
        if steps <= 0:
            return
        saved = copy.deepcopy(self.checkpoint())  # clones every tensor of the state dicts
        for i in range(steps):
            self.train_step(1.0)
            if steps <= 20 or (i + 1) % 10 == 0 or i + 1 == steps:
                self.logger.log(f"warmup_step:{i + 1}/{steps}")
        self.restore(saved)
        self.optimizers.zero_grad()

    def validate(self, stride: int | None = None) -> EvalResult:
        """Score the weights the callbacks say (the plain weights under QAT, the average under
        EMA) during training; after before_export, the model's weights as they are (the weights
        exported, then the artifact reloaded into the model). stride None is the standard
        evaluation; smaller slides the windows."""
        with contextlib.ExitStack() as stack:
            for callback in self.callbacks if not self.exporting else ():
                stack.enter_context(callback.eval_weights(self))
            return self._validate(stride)

    def before_export(self) -> None:
        """The training is over: the callbacks leave in the model the weights to export, and
        stop swapping weights for evaluation."""
        for callback in self.callbacks:
            callback.before_export(self)
        self.exporting = True

    def _validate(self, stride: int | None = None) -> EvalResult:
        return evaluate_bpb(self.fast_model, self.data.val_tokens, self.data.luts, self.cfg.train.train_seq_len,
                            self.cfg.train.val_batch_size // (self.info.world_size * self.info.grad_accum_steps),
                            self.info.device, self.info.rank, self.info.world_size, stride=stride)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TrainClock:
    """Training wall time: runs during steps, paused for validation and checkpoints.

    Readings are taken after the device finished its queued work and maximised over ranks,
    so every rank derives the same learning-rate scale and stop decision from the same time."""

    def __init__(self, info: DistInfo, start_ms: float):
        self.info = info
        self.base_ms = start_ms
        self.t0: float | None = None

    def start(self) -> None:
        _sync(self.info.device)
        self.t0 = time.perf_counter()

    def local_ms(self) -> float:
        _sync(self.info.device)
        return self.base_ms + (1000.0 * (time.perf_counter() - self.t0) if self.t0 is not None else 0.0)

    def pause(self) -> float:
        self.base_ms = self.info.max_all([self.local_ms()])[0]
        self.t0 = None
        return self.base_ms


def save_good_checkpoint(trainer: Trainer, ckpt_dir: Path, logger: RunLogger) -> None:
    """Save only finite weights, so the latest checkpoint is always a good one."""
    finite = torch.stack([torch.isfinite(p).all() for p in trainer.base_model.parameters()]).all()
    if not trainer.info.max_all([float(not bool(finite))])[0] == 0.0:
        raise TrainingDiverged(_divergence_message(trainer.step, "the weights became non-finite", ckpt_dir))
    path = save_checkpoint(ckpt_dir, trainer.checkpoint(), trainer.info.rank, trainer.info.barrier)
    trainer.info.barrier()  # every rank continues only once the checkpoint is complete
    pruned = prune_checkpoints(ckpt_dir, trainer.cfg.train.keep_checkpoints) if trainer.info.is_main else []
    logger.event("checkpoint", step=trainer.step, path=path.name,
                 **({"deleted": sorted(p.name for p in pruned)} if pruned else {}))


def save_interruption_checkpoint(trainer: Trainer, ckpt_dir: Path, logger: RunLogger) -> None:
    """Checkpoint the step reached, unless none was trained or it is saved already. Call only
    at a step boundary, where model, optimizers, data stream and callbacks all hold that step."""
    last = latest_checkpoint(ckpt_dir)
    if trainer.step == 0 or (last is not None and checkpoint_step(last) == trainer.step):
        return
    try:
        save_good_checkpoint(trainer, ckpt_dir, logger)
    except TrainingDiverged as exc:  # non-finite weights are never saved; the interruption goes on
        logger.error(str(exc))


def run_loop(trainer: Trainer, cfg: Config, info: DistInfo, logger: RunLogger, ckpt_dir: Path,
             interrupt_at_step: int | None, interrupts: InterruptGuard | None = None) -> tuple[str, str]:
    """Train to the end; returns (status, stop reason). On an interruption (Interrupted or any
    KeyboardInterrupt) the step reached is checkpointed if it was whole, then it propagates.

    `interrupts` (installed by the caller) holds signals back during a step, so one lands
    only between steps. With several processes they are held back for the whole loop and the
    ranks agree, in each step's collective, to stop together after the same step."""
    interrupts = interrupts or InterruptGuard()
    tcfg = cfg.train
    # Time reserved for GPTQ comes off the training budget when it is charged to it.
    cap_ms = 1000.0 * (tcfg.max_wallclock_seconds - cfg.export.gptq_reserve_seconds) \
        if tcfg.max_wallclock_seconds > 0 else None
    progress = TrainProgress(tcfg.iterations, enabled=info.is_main and logger.console, logger=logger)
    clock = TrainClock(info, trainer.training_time_ms)
    recompiles = RecompileWatch(enabled=trainer.compiled)
    now_ms = trainer.training_time_ms
    mid_step = False  # True while the model, optimizers, stream and callbacks may disagree on the step
    agreed_stop = False  # every rank stops after the same step (a signal seen in the step's collective)
    try:
        with progress, interrupts.deferred() if info.distributed else contextlib.nullcontext():
            clock.start()
            while True:
                if trainer.step >= tcfg.iterations:
                    stop_reason = "iterations"
                    break
                if cap_ms is not None and now_ms >= cap_ms:
                    stop_reason = "wallclock_cap"
                    break
                if tcfg.val_loss_every > 0 and trainer.step % tcfg.val_loss_every == 0:
                    trainer.training_time_ms = now_ms = clock.pause()
                    res = trainer.validate()
                    logger.log(f"step:{trainer.step}/{tcfg.iterations} val_loss:{res.val_loss:.4f} "
                               f"val_bpb:{res.val_bpb:.4f} train_time:{now_ms:.0f}ms")
                    logger.event("val", step=trainer.step, train_time_ms=now_ms, **res.to_dict())
                    clock.start()
                with interrupts.deferred():
                    mid_step = True
                    for callback in trainer.callbacks:
                        callback.on_step_start(trainer, _progress(trainer.step, now_ms, cfg))
                    scale = lr_scale(trainer.step, now_ms, tcfg)
                    recompiles.before_step()
                    loss_value = trainer.train_step(scale).item()
                    for callback in trainer.callbacks:
                        callback.on_step_end(trainer)
                    trainer.step += 1
                    # One collective per step: the shared clock reading, any rank's divergence and
                    # any rank's pending signal (so every rank stops after this same step).
                    now_ms, diverged, signum = info.max_all(
                        [clock.local_ms(), float(not math.isfinite(loss_value)), float(interrupts.pending or 0)])
                    trainer.training_time_ms = now_ms
                    mid_step = False
                if new_graphs := recompiles.after_step():
                    logger.log(f"recompile: step {trainer.step} compiled {new_graphs} new graph(s) after warmup "
                               f"(a shape or guard changed; the step stalled while compiling)")
                    logger.event("recompile", step=trainer.step, graphs=new_graphs)
                if diverged:
                    raise TrainingDiverged(_divergence_message(trainer.step, f"loss became {loss_value}", ckpt_dir))
                progress.update(trainer.step, loss_value, now_ms)
                if tcfg.train_log_every > 0 and (trainer.step <= 10 or trainer.step % tcfg.train_log_every == 0):
                    logger.log(f"step:{trainer.step}/{tcfg.iterations} train_loss:{loss_value:.4f} "
                               f"train_time:{now_ms:.0f}ms step_avg:{now_ms / trainer.step:.2f}ms", console=False)
                    logger.event("train", step=trainer.step, train_loss=loss_value, train_time_ms=now_ms,
                                 lr_scale=scale)
                if signum:  # after the step's records: the checkpoint's step is the last one logged
                    interrupts.take_pending()
                    agreed_stop = True
                    raise Interrupted(int(signum))
                if tcfg.checkpoint_every > 0 and trainer.step % tcfg.checkpoint_every == 0:
                    trainer.training_time_ms = now_ms = clock.pause()
                    save_good_checkpoint(trainer, ckpt_dir, logger)
                    clock.start()
                if interrupt_at_step is not None and trainer.step >= interrupt_at_step:
                    return "interrupted", "interrupt_at_step"
    except TrainingDiverged as exc:
        logger.error(str(exc))
        return "failed", "non_finite_loss"
    except KeyboardInterrupt:
        # A step cut short leaves a half-updated state: never saved. With several processes the
        # checkpoint's collectives need every rank, so only a stop they agreed on saves one.
        if not mid_step and (agreed_stop or not info.distributed):
            save_interruption_checkpoint(trainer, ckpt_dir, logger)
        raise
    if signum := interrupts.take_pending():  # held back after the last step (several processes)
        raise Interrupted(signum)
    trainer.training_time_ms = clock.pause()
    if stop_reason == "wallclock_cap":
        logger.log(f"stopping_early: wallclock_cap train_time:{trainer.training_time_ms:.0f}ms "
                   f"step:{trainer.step}/{tcfg.iterations}")
    return "trained", stop_reason


def _progress(step: int, elapsed_ms: float, cfg: Config) -> float:
    """Fraction of training done: of the wall-clock budget when capped, else of the iterations."""
    if cfg.train.max_wallclock_seconds > 0:
        return elapsed_ms / (1000.0 * cfg.train.max_wallclock_seconds)
    return step / max(cfg.train.iterations, 1)


def _divergence_message(step: int, what: str, ckpt_dir: Path) -> str:
    last = latest_checkpoint(ckpt_dir)
    fix = "lower the learning rates or set train.grad_clip_norm and start a new run"
    where = (f"the last good checkpoint {last} is kept (its weights are finite); {fix}" if last
             else f"no checkpoint had been written (train.checkpoint_every=0); {fix}")
    return f"training stopped: {what} at step {step}; {where}"
