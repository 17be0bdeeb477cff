"""The training config sections: [train], [optim], [qat], [ema], [swa], [run]."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    seed: int = 1337
    iterations: int = 20000
    # Warmdown: a linear decay of every learning rate to zero at the end of training.
    # warmdown_frac > 0 gives it as a fraction of the wall-clock budget (the seeds' form);
    # otherwise warmdown_iters, with the official meaning.
    warmdown_iters: int = 1200
    warmdown_frac: float = 0.0
    # Floor of the warmdown's lr multiplier, a fraction of each base lr (0: decay to zero; the 1.06108
    # record uses 0.1 with warmdown_frac): applied to either warmdown form.
    min_lr: float = 0.0
    # Untimed steps that prime compilation; weights, optimizer and data are then restored.
    warmup_steps: int = 20
    train_batch_tokens: int = 524_288
    train_seq_len: int = 1024
    max_wallclock_seconds: float = 600.0
    val_batch_size: int = 524_288
    val_loss_every: int = 1000
    # 0 = the whole validation split (the official metric); >0 caps it for quick runs.
    val_max_tokens: int = 0
    # Window stride of the final (roundtrip) evaluation: 0 = train_seq_len, the standard
    # evaluation; smaller slides the windows, scoring each token with more context.
    eval_stride: int = 0
    train_log_every: int = 200
    grad_clip_norm: float = 0.0
    # What the clip's norm covers with several processes: synced = the averaged gradient (one
    # process: the same); per_rank = each rank's local gradient, clipped before the cross-rank
    # average (the #549 records' form: their gradients are synchronised after the clip).
    grad_clip_mode: str = "synced"
    checkpoint_every: int = 0
    # Divergence that stays finite (pgolf.train.trainer): every N steps (and at validation,
    # checkpoints and the end) one fused reduction checks that no weight is non-finite or beyond
    # fp16's 65504, the range the export stores small tensors and scales in (0: only at those points).
    weight_check_every: int = 100
    # A loss that never moved: after max(stall_check_steps, iterations // 10) steps the mean of
    # the last 10 losses must be at least stall_min_drop nats below both the first 10 steps' mean
    # and ln(vocab_size), else the run stops as failed (0: no stall check).
    stall_check_steps: int = 50
    stall_min_drop: float = 0.05
    # Off a terminal (piped to a file), a progress line (step, loss, tokens/s, ETA) at least this
    # often in wall-clock seconds; a terminal shows the progress bar instead (0: no lines).
    progress_every_seconds: float = 30.0
    # Step checkpoints kept on disk: the newest N (0 = all); older ones go once a new one is complete.
    keep_checkpoints: int = 2
    device: str = "auto"  # auto | cpu | cuda
    compile: str = "auto"  # auto (on for CUDA) | on | off
    # Softcapped cross-entropy computed in token chunks, never holding fp32 logits for the
    # whole batch (pgolf.train.losses): auto (on for CUDA) | on | off. Off by default until its
    # speed is measured on a GPU: it recomputes the head matmul in backward.
    fused_loss: str = "off"
    # Attention kernel: auto (the fastest measured on CUDA) | flash | cudnn | efficient | math
    sdpa_backend: str = "auto"


@dataclass
class OptimConfig:
    embed_lr: float = 0.6
    head_lr: float = 0.008
    tied_embed_lr: float = 0.05
    matrix_lr: float = 0.04
    scalar_lr: float = 0.04
    muon_momentum: float = 0.95
    muon_backend_steps: int = 5
    muon_momentum_warmup_start: float = 0.85
    muon_momentum_warmup_steps: int = 500
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    # Decoupled weight decay p <- p (1 - lr wd) with each group's scheduled lr; 0 = off (official).
    muon_wd: float = 0.0
    adam_wd: float = 0.0  # the Adam groups: head, control scalars, add-on matrices (and the tables, below)
    # The embedding tables' (token, bigram, value-embedding) weight decay; -1: the same as adam_wd.
    embed_wd: float = -1.0
    # Newton-Schulz on stacks of same-shape matrices in one batched call: auto (on for CUDA) | on | off
    batched_ns: str = "auto"
    # With several processes: reduce-scatter the matrix gradients, each rank orthogonalises its
    # share, all-gather the updates (pgolf.train.parallel_muon): auto (on for CUDA, world size > 1) | on | off.
    # Off by default until it is measured over NCCL on GPUs (verified on CPU/gloo only).
    parallel_muon: str = "off"
    # Parallel Muon (#549's form): reduce-scatter the gradients, keep the momentum and all-gather
    # the updates in bf16 (pgolf.train.parallel_muon); no effect with one process.
    parallel_muon_bf16: bool = False
    # Newton-Schulz coefficients (pgolf.train.muon): classic (one fixed quintic) | polar_express
    # (Polar Express's per-iteration ones, the 1.06108 record's).
    muon_ns: str = "classic"
    # MuonEq-R (the 1.06108 record's): each row of the Nesterov direction divided by its L2 norm before Newton-Schulz.
    muon_row_norm: bool = False


@dataclass
class QATConfig:
    enabled: bool = False
    # Switch on once this fraction of the wall-clock budget (or of the iterations) has passed.
    start_frac: float = 0.85
    bits: int = 6
    mode: str = "ste"  # ste | noise
    pattern: str = r"^blocks\."  # regex over parameter names of the linear layers it applies to


@dataclass
class EMAConfig:
    # An exponential moving average of the weights, evaluated and exported in their place
    # (pgolf.train.averaging): ema <- decay * ema + (1 - decay) * w after every step.
    enabled: bool = False
    decay: float = 0.997  # the #549 record's

    def problems(self) -> list[str]:
        return [] if 0.0 < self.decay < 1.0 else [f"ema.decay must be within (0, 1), got {self.decay}"]


@dataclass
class SWAConfig:
    # Stochastic weight averaging (pgolf.train.swa): every `every` steps while the lr multiplier is
    # below start_scale a snapshot of the weights joins a uniform mean, which replaces the weights
    # for evaluation and export. Cannot be combined with [ema].
    enabled: bool = False
    every: int = 50  # the #549 record's
    start_scale: float = 0.2  # the #549 record's


@dataclass
class RunConfig:
    name: str = "run"
    runs_dir: str = "runs"
    run_id: str = ""  # empty: derived from the time, name and seed
    # Runs of one claim (e.g. the seeds of `pgolf run --seeds`) share a group id.
    group: str = ""
    # CPU threads of this process (torch.set_num_threads, before the model is built): 0 = auto,
    # torch's default alone, else the cores divided among the pgolf runs training on this host
    # (the CLI counts them in the ledger), at least 1; N > 0: exactly N.
    threads: int = 0
