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
                               resolve_shards, validation_bytes)
from pgolf.data.tokenizer import check_bos, check_vocab, load_tokenizer
from pgolf.eval.windows import EvalResult, autocast_for, evaluate_bpb
from pgolf.model.gpt import GPT, build_model
from pgolf.runs import RunLogger, checkpoint_step, latest_checkpoint
from pgolf.runtime.compile_check import RecompileWatch
from pgolf.runtime.distributed import DistInfo
from pgolf.runtime.interrupts import InterruptGuard, Interrupted
from pgolf.train.checkpoint import Checkpoint, prune_checkpoints, save_checkpoint
from pgolf.train.lr import budget_ms, lr_scale
from pgolf.train.muon import orthogonalize
from pgolf.train.optim import Optimizers, build_optimizers, muon_momentum_at, resolve_switch, use_parallel_muon
from pgolf.train.progress import TrainProgress
from pgolf.train.callbacks import CALLBACKS, TrainCallback


class TrainingDiverged(RuntimeError):
    """Training went wrong beyond recovery: the loss became NaN or infinite, the weights left the
    range the export can store, or the loss never moved. `reason` is the run's stop reason."""

    def __init__(self, message: str, reason: str = "non_finite_loss"):
        super().__init__(message)
        self.reason = reason


# The largest finite fp16: the export stores small tensors and the int8 scales in fp16.
FP16_MAX = 65504.0
# Losses averaged for the stall check: the first steps' and the latest steps'.
STALL_WINDOW = 10


@dataclass
class TrainData:
    train_files: list[Path]
    val_tokens: Tensor
    luts: tuple[Tensor, Tensor, Tensor] | Tensor  # byte tables, or a byte sidecar (validation_bytes)
    tokenizer_name: str
    val_tokens_total: int


def prepare_data(cfg: Config, info: DistInfo, logger: RunLogger) -> TrainData:
    if cfg.data.source == "synthetic":
        from pgolf.data.synthetic import ensure_synthetic_corpus

        info.main_only(ensure_synthetic_corpus, cfg.data, log=logger.log)
    tokenizer = load_tokenizer(cfg.data.tokenizer_path)
    check_vocab(tokenizer, cfg.model.vocab_size)
    bos_users = [name for name, on in (("model.doc_mask", cfg.model.doc_mask), ("model.embed=smear_bos",
                 "smear_bos" in cfg.model.embed), ("data.doc_packing", cfg.data.doc_packing)) if on]
    if bos_users:
        check_bos(tokenizer, cfg.model.bos_id, " and ".join(bos_users))
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
    luts = validation_bytes(cfg, tokenizer, val_tokens.numel(), info.device)
    logger.log(f"data: {len(train_files)} train shards from {cfg.train_files()}; tokenizer {tokenizer.name}")
    if isinstance(luts, Tensor):
        logger.log(f"val bytes: from the byte sidecars beside {cfg.val_files()} ({int(luts[1:].sum()):,} bytes)")
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
    if CALLBACKS["swa"][1](cfg):
        from pgolf.train.swa import SWACallback

        callbacks.append(SWACallback(cfg.swa))
    if CALLBACKS["loop"][1](cfg):
        from pgolf.train.looping import LoopSwitch

        callbacks.append(LoopSwitch(cfg.model.loop_start_frac))
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
        self.parallel_muon = parallel_muon = use_parallel_muon(cfg.optim.parallel_muon, info.device, info.world_size)
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
                                             prefetch=resolve_switch(cfg.data.prefetch, info.device.type == "cuda"),
                                             bos_id=cfg.model.bos_id if cfg.data.doc_packing else None)
        # Tokens per row of a micro-batch: data.packed_row makes it one row of all of them (#1855's
        # varlen row), so document-masked segments start only at BOS and every model.max_span tokens.
        self.row_tokens = (cfg.train.train_batch_tokens // (info.world_size * info.grad_accum_steps)
                           if cfg.data.packed_row else cfg.train.train_seq_len)
        self.step = 0
        self.training_time_ms = 0.0
        self.callbacks = build_callbacks(cfg)  # QAT, EMA, ...: pgolf.train.callbacks
        self.exporting = False  # set by before_export
        # Seconds the export's calibration takes off the wall-clock budget (set by pgolf.train.calibration).
        self.reserve_s = cfg.export.gptq_reserve_seconds
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
        self.lr_scale = scale  # the step's lr multiplier, for the callbacks (SWA)
        # per_rank: every rank clips its local gradient, which is averaged after (pgolf.train.clipping)
        per_rank = cfg.grad_clip_norm > 0 and cfg.grad_clip_mode == "per_rank" and self.info.distributed
        self.optimizers.zero_grad()
        total = torch.zeros((), device=self.info.device)
        for micro in range(accum):
            if self.info.distributed:
                self.model.require_backward_grad_sync = sync = micro == accum - 1 and not per_rank
                self.optimizers.arm_backward_sync(sync)
            x, y = self.loader.next_batch(cfg.train_batch_tokens, self.row_tokens, accum)
            with autocast_for(self.info.device):
                loss = self.model(x, y)
            total += loss.detach()
            (loss / accum).backward()
        self.optimizers.set_muon_momentum(muon_momentum_at(self.step, self.cfg.optim))
        self.optimizers.set_lr_scale(scale)
        if cfg.grad_clip_norm > 0 and (per_rank or self.parallel_muon):
            from pgolf.train.clipping import clip_gradients  # optional: shipped only for these modes

            clip_gradients(self.base_model, self.optimizers.muon, cfg.grad_clip_norm, per_rank)
        elif cfg.grad_clip_norm > 0:
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
        for callback in self.callbacks:  # the model forms a callback switches to later (a second graph)
            callback.on_warmup(self, steps)
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


def weight_abs_max(model: torch.nn.Module) -> float:
    """The largest |w| over the model's parameters, NaN if any is NaN: one fused reduction
    (a multi-tensor inf-norm) and one read of the result."""
    params = [p.detach() for p in model.parameters() if p.numel()]  # an empty one has no max
    if not params:
        return 0.0
    norms = torch._foreach_norm(params, float("inf"))
    return float(torch.stack([n.float() for n in norms]).max())


def weights_bad(abs_max: float) -> bool:
    """Non-finite, or beyond the fp16 range the export stores small tensors and scales in."""
    return not abs_max <= FP16_MAX  # NaN compares False


def _weights_problem(abs_max: float) -> str:
    if not math.isfinite(abs_max):
        return f"the weights became non-finite (max |w| = {abs_max})"
    return (f"the weights grew to max |w| = {abs_max:.4g}, beyond fp16's {FP16_MAX:.0f} that the export stores "
            f"small tensors and scales in")


def save_good_checkpoint(trainer: Trainer, ckpt_dir: Path, logger: RunLogger) -> None:
    """Save only weights that are finite and within the export's fp16 range, so the latest
    checkpoint is always a good one."""
    abs_max = weight_abs_max(trainer.base_model)
    if trainer.info.max_all([float(weights_bad(abs_max))])[0] != 0.0:
        what = _weights_problem(abs_max) if weights_bad(abs_max) else "another rank's weights went out of range"
        raise TrainingDiverged(_divergence_message(trainer.step, what, ckpt_dir, trainer.cfg.train.checkpoint_every),
                               "weights_out_of_range")
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
    # Time reserved for the export's calibration comes off the budget: the stop, the schedule and progress.
    cap_ms = budget_ms(tcfg, trainer.reserve_s)
    progress = TrainProgress(tcfg.iterations, enabled=info.is_main and logger.console, logger=logger,
                             every_seconds=tcfg.progress_every_seconds, batch_tokens=tcfg.train_batch_tokens,
                             cap_ms=cap_ms, start_step=trainer.step, start_ms=trainer.training_time_ms)
    stall = StallCheck(cfg, trainer.step)
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
                        callback.on_step_start(trainer, _progress(trainer.step, now_ms, cap_ms, tcfg.iterations))
                    scale = lr_scale(trainer.step, now_ms, tcfg, trainer.reserve_s)
                    recompiles.before_step()
                    loss_value = trainer.train_step(scale).item()
                    for callback in trainer.callbacks:
                        callback.on_step_end(trainer)
                    trainer.step += 1
                    # Divergence that stays finite: the weights' range on the steps due, the loss
                    # against its start once (both cheap; neither changes the training).
                    abs_max = weight_abs_max(trainer.base_model) if _weight_check_due(trainer.step, tcfg) else 0.0
                    stall.record(loss_value)
                    stalled = stall.due(trainer.step) and stall.stalled()
                    # One collective per step: the shared clock reading, any rank's divergence,
                    # any rank's pending signal (so every rank stops after this same step), and
                    # any rank's out-of-range weights or stalled loss.
                    now_ms, diverged, signum, bad_weights, any_stalled = info.max_all(
                        [clock.local_ms(), float(not math.isfinite(loss_value)), float(interrupts.pending or 0),
                         float(weights_bad(abs_max)), float(stalled)])
                    trainer.training_time_ms = now_ms
                    mid_step = False
                if new_graphs := recompiles.after_step():
                    logger.log(f"recompile: step {trainer.step} compiled {new_graphs} new graph(s) after warmup "
                               f"(a shape or guard changed; the step stalled while compiling)")
                    logger.event("recompile", step=trainer.step, graphs=new_graphs)
                if diverged:
                    raise TrainingDiverged(_divergence_message(trainer.step, f"loss became {loss_value}", ckpt_dir,
                                                               tcfg.checkpoint_every))
                _raise_if_unhealthy(trainer, ckpt_dir, abs_max, bad_weights, stall, stalled, any_stalled)
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
        return "failed", exc.reason
    except KeyboardInterrupt:
        # A step cut short leaves a half-updated state: never saved. With several processes the
        # checkpoint's collectives need every rank, so only a stop they agreed on saves one.
        if not mid_step and (agreed_stop or not info.distributed):
            save_interruption_checkpoint(trainer, ckpt_dir, logger)
        raise
    if signum := interrupts.take_pending():  # held back after the last step (several processes)
        raise Interrupted(signum)
    trainer.training_time_ms = clock.pause()
    try:  # the weights about to be exported, and a loss that never moved in a run too short to check before
        abs_max = weight_abs_max(trainer.base_model)
        stalled = stall.due(trainer.step, final=True) and stall.stalled()
        bad_weights, any_stalled = info.max_all([float(weights_bad(abs_max)), float(stalled)])
        _raise_if_unhealthy(trainer, ckpt_dir, abs_max, bad_weights, stall, stalled, any_stalled)
    except TrainingDiverged as exc:
        logger.error(str(exc))
        return "failed", exc.reason
    if stop_reason == "wallclock_cap":
        logger.log(f"stopping_early: wallclock_cap train_time:{trainer.training_time_ms:.0f}ms "
                   f"step:{trainer.step}/{tcfg.iterations}")
    return "trained", stop_reason


def _weight_check_due(step: int, tcfg) -> bool:
    """Every train.weight_check_every steps and before each validation (checkpoints check their own)."""
    return ((tcfg.weight_check_every > 0 and step % tcfg.weight_check_every == 0)
            or (tcfg.val_loss_every > 0 and step % tcfg.val_loss_every == 0))


def _raise_if_unhealthy(trainer: Trainer, ckpt_dir: Path, abs_max: float, bad_weights: float,
                        stall: "StallCheck", stalled: bool, any_stalled: float) -> None:
    """Raise TrainingDiverged when any rank saw out-of-range weights or a stalled loss."""
    every = trainer.cfg.train.checkpoint_every
    if bad_weights:
        what = _weights_problem(abs_max) if weights_bad(abs_max) else "another rank's weights went out of range"
        raise TrainingDiverged(_divergence_message(trainer.step, what, ckpt_dir, every), "weights_out_of_range")
    if any_stalled:
        what = stall.problem() if stalled else "another rank's training loss has not moved from its start"
        raise TrainingDiverged(_divergence_message(
            trainer.step, what, ckpt_dir, every,
            cause="the learning rates are likely too high (or far too low), or the data or labels are broken"),
            "loss_stalled")


def _progress(step: int, elapsed_ms: float, cap_ms: float | None, iterations: int) -> float:
    """Fraction of training done: of the wall-clock budget (budget_ms) when capped, else of the iterations."""
    return elapsed_ms / cap_ms if cap_ms is not None else step / max(iterations, 1)


def _divergence_message(step: int, what: str, ckpt_dir: Path, checkpoint_every: int,
                        cause: str = "the learning rates are likely too high") -> str:
    last = latest_checkpoint(ckpt_dir)
    fix = "lower the learning rates or set train.grad_clip_norm and start a new run"
    if last is not None:
        where = (f"the last good checkpoint {last} is kept (its weights are finite and within fp16 range; "
                 f"train.checkpoint_every={checkpoint_every})")
    elif checkpoint_every > 0:
        where = (f"no checkpoint had been written yet (train.checkpoint_every={checkpoint_every}: "
                 f"the first is due at step {checkpoint_every})")
    else:
        where = "no checkpoint is kept (train.checkpoint_every=0: checkpoints are off)"
    return f"training stopped: {what} at step {step}; {cause}; {where}; {fix}"


class StallCheck:
    """Spots a loss that never moved from its start (e.g. a learning rate so high the model sits
    at the uniform prediction, loss ln(vocab), while its weights grow).

    The rule: once max(train.stall_check_steps, iterations // 10) steps are trained (or at the end
    of a run shorter than that but of at least stall_check_steps steps), the mean of the last
    STALL_WINDOW losses must be at least train.stall_min_drop nats below the reference, the lower
    of ln(vocab_size) and the mean of the first STALL_WINDOW losses (when this process trained
    them from step 0). A healthy run is far below both by then (on the smoke preset the mean drops over
    3 nats by step 50, on the FineWeb sample tiny config about 1), and runs shorter than
    stall_check_steps are never checked. Checked once per run; each rank checks its own losses."""

    def __init__(self, cfg: Config, start_step: int):
        tcfg = cfg.train
        self.enabled = tcfg.stall_check_steps > 0
        self.min_steps = tcfg.stall_check_steps
        self.at_step = max(tcfg.stall_check_steps, tcfg.iterations // 10)
        self.min_drop = tcfg.stall_min_drop
        self.ln_vocab = math.log(cfg.model.vocab_size)
        self.from_start = start_step == 0
        self.first: list[float] = []
        self.recent: list[float] = []
        self.done = False

    def record(self, loss: float) -> None:
        if not self.enabled or self.done:
            return
        if self.from_start and len(self.first) < STALL_WINDOW:
            self.first.append(loss)
        self.recent = (self.recent + [loss])[-STALL_WINDOW:]

    def due(self, step: int, final: bool = False) -> bool:
        if not self.enabled or self.done or len(self.recent) < STALL_WINDOW:
            return False
        return step == self.at_step or (final and step >= self.min_steps)

    def stalled(self) -> bool:
        """Marks the check done; True when the loss has not dropped from its reference."""
        self.done = True
        return self.recent_mean() > self.reference() - self.min_drop

    def reference(self) -> float:
        first = sum(self.first) / len(self.first) if len(self.first) == STALL_WINDOW else math.inf
        return min(first, self.ln_vocab)

    def recent_mean(self) -> float:
        return sum(self.recent) / len(self.recent)

    def problem(self) -> str:
        return (f"the training loss has not moved: mean {self.recent_mean():.4f} over the last {STALL_WINDOW} steps, "
                f"not {self.min_drop:g} below its start {self.reference():.4f} (ln(vocab_size) = {self.ln_vocab:.4f}; "
                f"rule: train.stall_check_steps, train.stall_min_drop)")
