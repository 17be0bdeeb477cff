"""Score-first test-time training (the protocol the challenge accepts), with a receipt.

The validation targets are split into chunks of `chunk_tokens`. For each chunk in order:
first score it (no gradients, sliding windows) and add it to the totals; then, unless it is
the last chunk, adapt on that already-scored chunk: SGD with momentum, a learning rate that
decays over chunks on a cosine, `epochs` passes, the first `freeze_blocks` blocks frozen,
gradient-norm clipping. Chunk n is therefore scored by a model adapted only on chunks < n.
Defaults are those of the leaderboard record that introduced it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from pgolf.eval.windows import ScoreSums, autocast_for, score_windows, window_plan
from pgolf.model.gpt import GPT
from pgolf.eval.receipt import Receipt, state_fingerprint


@dataclass
class TTTConfig:
    chunk_tokens: int = 32768
    lr: float = 0.002
    momentum: float = 0.9
    epochs: int = 3
    freeze_blocks: int = 0
    grad_clip: float = 1.0
    batch_seqs: int = 32  # training sequences per adaptation step (split over ranks)


def chunk_lr(cfg: TTTConfig, chunk: int, num_chunks: int) -> float:
    """Cosine decay from lr (first chunk) to 0 (the last chunk, which is never trained on)."""
    if num_chunks <= 1:
        return cfg.lr
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * chunk / (num_chunks - 1)))


def _trainable(model: GPT, freeze_blocks: int) -> list[torch.nn.Parameter]:
    frozen = {id(p) for block in model.blocks[:freeze_blocks] for p in block.parameters()}
    return [p for p in model.parameters() if id(p) not in frozen]


def shared_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, params: list, seqs: Tensor | None,
                step_targets: int, device: torch.device, distributed: bool, clip: float) -> None:
    """One optimizer step on a batch of sequences split over ranks: this rank's share `seqs`
    (None: it has none), its summed loss divided by the whole step's `step_targets` so the ranks'
    shares add up to the step's mean; gradients summed over ranks, then clipped (clip > 0)."""
    optimizer.zero_grad(set_to_none=False)
    if seqs is not None:
        with autocast_for(device):
            loss = model(seqs[:, :-1], seqs[:, 1:], reduction="sum")
        (loss / step_targets).backward()
    if distributed:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()


def adapt_on_chunk(model: torch.nn.Module, tokens: Tensor, lo: int, hi: int, seq_len: int, cfg: TTTConfig,
                   optimizer: torch.optim.Optimizer, params: list, device: torch.device,
                   rank: int, world_size: int) -> None:
    """Train on tokens[lo..hi] (inputs lo..hi-1, targets lo+1..hi): already-scored tokens only."""
    span = tokens[lo: hi + 1].to(device=device, dtype=torch.int64)
    # Non-overlapping training sequences inside the chunk (one shorter one if the chunk is short).
    length = min(seq_len, hi - lo)
    starts = [i * length for i in range(max((hi - lo) // seq_len, 1))]
    n_seqs = len(starts)
    distributed = world_size > 1 and dist.is_available() and dist.is_initialized()
    model.train()
    for _ in range(cfg.epochs):
        for b in range(0, n_seqs, cfg.batch_seqs):
            # A step is batch_seqs sequences whatever the number of ranks; each rank takes a share.
            step = starts[b: b + cfg.batch_seqs]
            mine = step[len(step) * rank // world_size: len(step) * (rank + 1) // world_size]
            idx = (torch.tensor(mine, device=device, dtype=torch.int64)[:, None]
                   + torch.arange(length + 1, device=device)[None, :])
            shared_step(model, optimizer, params, span[idx] if mine else None, len(step) * length, device,
                        distributed, cfg.grad_clip)
    model.eval()


def run_ttt(model: GPT, tokens: Tensor, luts, seq_len: int, stride: int, batch_windows: int, cfg: TTTConfig,
            device: torch.device, rank: int = 0, world_size: int = 1, progress=None,
            illegal_train_first: bool = False, runner: torch.nn.Module | None = None) -> tuple[ScoreSums, Receipt]:
    """Score-first TTT over all targets of `tokens`; returns the sums and the receipt.

    runner (e.g. torch.compile(model)) runs the forward passes; model owns the parameters.

    illegal_train_first adapts on each chunk *before* scoring it: a deliberately illegal variant
    that exists only so the audit can be shown to catch it. Never use it for a score."""
    runner = model if runner is None else runner
    total = tokens.numel() - 1
    bounds = list(range(0, total, cfg.chunk_tokens)) + [total]
    num_chunks = len(bounds) - 1
    params = _trainable(model, cfg.freeze_blocks)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
    settings = {"seq_len": seq_len, "stride": stride, **asdict(cfg), "chunks": num_chunks}
    receipt = Receipt("ttt", settings, total, state_fingerprint(model))
    sums = ScoreSums()

    def adapt(n: int, lo: int, hi: int) -> None:
        for group in optimizer.param_groups:
            group["lr"] = chunk_lr(cfg, n, num_chunks)
        before = state_fingerprint(model)
        adapt_on_chunk(runner, tokens, lo, hi, seq_len, cfg, optimizer, params, device, rank, world_size)
        receipt.add_update(lo, hi, before, state_fingerprint(model))

    for n in range(num_chunks):
        lo, hi = bounds[n], bounds[n + 1]
        if illegal_train_first:
            adapt(n, lo, hi)
        state = state_fingerprint(model)
        part = score_windows(runner, tokens, window_plan(total, seq_len, stride, lo, hi), luts, device,
                             batch_windows, rank, world_size)
        sums.add(part)
        receipt.add_score(lo, hi, state, part.loss_sum, part.tokens, part.bytes)
        if n < num_chunks - 1 and not illegal_train_first:
            adapt(n, lo, hi)
        if progress is not None:
            progress(n + 1, num_chunks, sums)
    for p in model.parameters():
        p.requires_grad_(True)
    receipt.finalize()
    return sums, receipt
